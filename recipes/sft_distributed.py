"""Supervised fine-tuning, distributed (FSDP2): a thin entry point over :mod:`tune_losses.training`.

    tune run --nproc_per_node 2 recipes/sft_distributed.py --config configs/tiny/sft.yaml

Any loss is chosen by YAML `loss._component_`; see tune_losses.training.LossRecipe for the config keys.
"""

import sys

from tune_losses.training.entry import build_recipe

SFTRecipeDistributed, recipe_main = build_recipe("sft", distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
