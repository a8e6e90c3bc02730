"""Knowledge distillation from a teacher cache, single device: no teacher in memory.

    tune run recipes/kd_offline_single_device.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR

The cache comes from recipes/cache_teacher.py; the loss from YAML `loss._component_`
(tune_losses.SparseDistillationLoss). See tune_losses.training.offline_kd for the data alignment.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import run
from tune_losses.training.offline_kd import OfflineKDRecipe


class KDOfflineRecipeSingleDevice(OfflineKDRecipe):
    """Offline KD recipe (single device): setup / train / save_checkpoint / cleanup from LossRecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, distributed=False)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(KDOfflineRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
