"""Knowledge distillation, distributed (FSDP2): a thin entry point over :mod:`tune_losses.training`.

    tune run --nproc_per_node 2 recipes/kd_distributed.py --config configs/tiny/kd.yaml

Any loss is chosen by YAML `loss._component_`; see tune_losses.training.LossRecipe for the config keys.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import LossRecipe, run


class KDRecipeDistributed(LossRecipe):
    """Knowledge distillation recipe (distributed): setup / train / save_checkpoint / cleanup from LossRecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, task="kd", distributed=True)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(KDRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
