"""Preference optimization (DPO family), distributed (FSDP2): a thin entry point over :mod:`tune_losses.training`.

    tune run --nproc_per_node 2 recipes/dpo_distributed.py --config configs/tiny/dpo.yaml

Any preference loss is chosen by YAML `loss._component_` (fused `tune_losses.LinearPreferenceLoss`, or
torchtune's `torchtune.rlhf.loss.DPOLoss` on full logits); see tune_losses.training.dpo.DPORecipe for the
config keys.
"""

import sys

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training import run
from tune_losses.training.dpo import DPORecipe


class DPORecipeDistributed(DPORecipe):
    """DPO recipe (distributed (FSDP2)): setup / train / save_checkpoint / cleanup from DPORecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, distributed=True)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(DPORecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
