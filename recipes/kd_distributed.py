"""Knowledge distillation, distributed (FSDP2): a thin entry point over :mod:`tune_losses.training`.

    tune run --nproc_per_node 2 recipes/kd_distributed.py --config configs/tiny/kd.yaml

Any loss is chosen by YAML `loss._component_`; see tune_losses.training.LossRecipe for the config keys.
"""

import sys

from tune_losses.training.entry import build_recipe

KDRecipeDistributed, recipe_main = build_recipe("kd", distributed=True)

if __name__ == "__main__":
    sys.exit(recipe_main())
