"""Preference optimization (DPO family), single device: a thin entry point over :mod:`tune_losses.training`.

    tune run recipes/dpo_single_device.py --config configs/tiny/dpo.yaml

Any preference loss is chosen by YAML `loss._component_` (fused `tune_losses.LinearPreferenceLoss`, or
torchtune's `torchtune.rlhf.loss.DPOLoss` on full logits); see tune_losses.training.dpo.DPORecipe for the
config keys.
"""

import sys

from tune_losses.training.entry import build_recipe

DPORecipeSingleDevice, recipe_main = build_recipe("dpo", distributed=False)

if __name__ == "__main__":
    sys.exit(recipe_main())
