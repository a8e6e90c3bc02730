"""Knowledge distillation, single device: a thin entry point over :mod:`tune_losses.training`.

    tune run recipes/kd_single_device.py --config configs/tiny/kd.yaml

Any loss is chosen by YAML `loss._component_`; see tune_losses.training.LossRecipe for the config keys.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import LossRecipe, run


class KDRecipeSingleDevice(LossRecipe):
    """Knowledge distillation recipe (single device): setup / train / save_checkpoint / cleanup from LossRecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, task="kd", distributed=False)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(KDRecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
