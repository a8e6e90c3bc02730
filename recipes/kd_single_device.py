"""Knowledge distillation, single device: a thin entry point over :mod:`tune_losses.training`.

    tune run recipes/kd_single_device.py --config configs/tiny/kd.yaml

Any loss is chosen by YAML `loss._component_`; see tune_losses.training.LossRecipe for the config keys.
"""

import sys

from tune_losses.training.entry import build_recipe

KDRecipeSingleDevice, recipe_main = build_recipe("kd", distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
