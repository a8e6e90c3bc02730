"""Knowledge distillation from a teacher cache, distributed (FSDP2): no teacher in memory.

    tune run --nproc_per_node 2 recipes/kd_offline_distributed.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR

The cache comes from recipes/cache_teacher.py; the loss from YAML `loss._component_`
(tune_losses.SparseDistillationLoss). See tune_losses.training.offline_kd for the data alignment.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import run
from tune_losses.training.offline_kd import OfflineKDRecipe


class KDOfflineRecipeDistributed(OfflineKDRecipe):
    """Offline KD recipe (distributed (FSDP2)): setup / train / save_checkpoint / cleanup from LossRecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, distributed=True)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(KDOfflineRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
