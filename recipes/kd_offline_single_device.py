"""Knowledge distillation from a teacher cache, single device: no teacher in memory.

    tune run recipes/kd_offline_single_device.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR

The cache comes from recipes/cache_teacher.py; the loss from YAML `loss._component_`
(tune_losses.SparseDistillationLoss). See tune_losses.training.offline_kd for the data alignment.
"""

import sys

from tune_losses.training.entry import build_recipe

KDOfflineRecipeSingleDevice, recipe_main = build_recipe("kd_offline", distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
