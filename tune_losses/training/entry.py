"""The recipes' entry points, built once: a recipe class and an ``@config.parse`` main per task and placement.

torchtune's recipe convention, which ``tune run`` relies on: a recipe file defines a class
(``__init__(cfg)``, ``setup(cfg)``, ``train()``, ``save_checkpoint(epoch)``, ``cleanup()``) and a
``recipe_main(cfg)`` decorated with :func:`torchtune.config.parse` (it reads ``--config`` and the
``key=value`` overrides into a ``DictConfig``), called under ``if __name__ == "__main__"``:
``tune run recipes/x.py`` runs the module ``recipes.x`` as ``__main__`` (through torchrun with
``--nproc_per_node``).

Ours keep that shape, and every file under recipes/ that trains states only its task and whether
it shards; the class and the main come from :func:`build_recipe`::

    SFTRecipeSingleDevice, recipe_main = build_recipe("sft", distributed=False)

    if __name__ == "__main__":
        sys.exit(recipe_main())

The classes are subclasses of :class:`tune_losses.training.LossRecipe` (``sft``, ``kd``),
:class:`tune_losses.training.dpo.DPORecipe` (``dpo``) or
:class:`tune_losses.training.offline_kd.OfflineKDRecipe` (``kd_offline``) whose ``__init__(cfg)`` fixes the
task and the placement; ``recipe_main`` is :func:`tune_losses.training.run` over that class.
recipes/cache_teacher.py writes a cache rather than training, so it keeps its own main.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Dict, Tuple

from omegaconf import DictConfig
from torchtune import config

from tune_losses.training.loop import run

# task -> (module of tune_losses.training, its recipe class, the class-name prefix, fixed __init__ arguments)
_TASKS: Dict[str, Tuple[str, str, str, Dict[str, Any]]] = {
    "sft": ("loop", "LossRecipe", "SFT", {"task": "sft"}),
    "kd": ("loop", "LossRecipe", "KD", {"task": "kd"}),
    "dpo": ("dpo", "DPORecipe", "DPO", {}),
    "kd_offline": ("offline_kd", "OfflineKDRecipe", "KDOffline", {}),
}


def build_recipe(task: str, *, distributed: bool) -> Tuple[type, Callable[..., Any]]:
    """``(RecipeClass, recipe_main)`` for ``task`` (``"sft"``, ``"kd"``, ``"dpo"`` or ``"kd_offline"``),
    single device or ``distributed`` (FSDP2 under torchrun).

    ``RecipeClass(cfg)`` is the task's recipe class with the task and placement fixed, named as torchtune
    names its recipes (``KDRecipeDistributed``, ``DPORecipeSingleDevice``, ...: the name
    :func:`torchtune.config.log_config` prints); ``recipe_main()`` is its ``@config.parse`` entry point.
    """
    if task not in _TASKS:
        raise ValueError(f"task: expected one of {sorted(_TASKS)}, got {task!r}")
    module, base_name, prefix, fixed = _TASKS[task]
    base = getattr(import_module(f"tune_losses.training.{module}"), base_name)
    placement = "distributed (FSDP2)" if distributed else "single device"

    def __init__(self, cfg: DictConfig) -> None:
        base.__init__(self, cfg, distributed=distributed, **fixed)

    name = f"{prefix}Recipe{'Distributed' if distributed else 'SingleDevice'}"
    doc = f"The {task} recipe, {placement}: setup / train / save_checkpoint / cleanup from {base_name}."
    recipe_cls = type(name, (base,), {"__init__": __init__, "__doc__": doc})

    def recipe_main(cfg: DictConfig) -> None:
        run(recipe_cls, cfg)

    # config.parse shows the decorated function's docstring as the command's --help description.
    recipe_main.__doc__ = f"{name}: {placement} {task} recipe (tune run ... --config FILE [key=value ...])."
    return recipe_cls, config.parse(recipe_main)
