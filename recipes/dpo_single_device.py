"""Preference optimization (DPO family), single device: a thin entry point over :mod:`tune_losses.training`.

    tune run recipes/dpo_single_device.py --config configs/tiny/dpo.yaml

Any preference loss is chosen by YAML `loss._component_` (fused `tune_losses.LinearPreferenceLoss`, or
torchtune's `torchtune.rlhf.loss.DPOLoss` on full logits); see tune_losses.training.dpo.DPORecipe for the
config keys.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import run
from tune_losses.training.dpo import DPORecipe


class DPORecipeSingleDevice(DPORecipe):
    """DPO recipe (single device): setup / train / save_checkpoint / cleanup from DPORecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, distributed=False)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(DPORecipeSingleDevice, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
