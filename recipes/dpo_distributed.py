"""Preference optimization (DPO family), distributed (FSDP2): recipes/dpo_single_device.py's recipe, sharded.

    tune run --nproc_per_node 2 recipes/dpo_distributed.py --config configs/tiny/dpo.yaml

The same YAML and loss choice as the single-device recipe (tune_losses.training.dpo.DPORecipe lists the
config keys), run over the ranks with FSDP2.
"""

import sys

from tune_losses.training.entry import build_recipe

DPORecipeDistributed, recipe_main = build_recipe("dpo", distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
