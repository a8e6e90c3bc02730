"""Knowledge distillation from a teacher cache, distributed (FSDP2): no teacher in memory.

    tune run --nproc_per_node 2 recipes/kd_offline_distributed.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR

The cache comes from recipes/cache_teacher.py; the loss from YAML `loss._component_`
(tune_losses.SparseDistillationLoss). See tune_losses.training.offline_kd for the data alignment.
"""

import sys

from tune_losses.training.entry import build_recipe

KDOfflineRecipeDistributed, recipe_main = build_recipe("kd_offline", distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
