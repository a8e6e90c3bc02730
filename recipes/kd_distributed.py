"""Knowledge distillation, distributed: a thin entry point over recipes/train_loop.py.

    tune run --nproc_per_node 2 recipes/kd_distributed.py --config configs/tiny/kd.yaml

Any loss is chosen by YAML `loss._component_`; see train_loop.LossRecipe for the config keys.
"""

import os
import sys

# `tune run` executes this file by path; make its sibling modules importable (torchtune ships its own
# top-level `recipes` package, so we import our modules by their own names, not as recipes.*).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from omegaconf import DictConfig  # noqa: E402
from torchtune import config  # noqa: E402

from train_loop import LossRecipe, run  # noqa: E402


class KDRecipeDistributed(LossRecipe):
    """Knowledge distillation recipe (distributed): setup / train / save_checkpoint / cleanup from LossRecipe."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg, task="kd", distributed=True)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run(KDRecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
