"""The training loop behind the recipes, importable: ``from tune_losses.training import LossRecipe, run``.

Modules, one job each: ``entry`` (the recipes' entry points in torchtune's convention, a recipe class and
an ``@config.parse`` main per task and placement: :func:`build_recipe`), ``loop`` (the recipe class:
setup / train / save_checkpoint / cleanup),
``protocol`` (what the loop needs from a loss), ``settings`` (config keys, checked), ``data``,
``model``, ``distributed``, ``gradients``, ``checkpointing``, ``progress``, ``memory`` (the loss's
peak memory) and ``metrics`` (reading logged metrics back). Names are loaded on first use, so reading
metrics does not import torchtune.
"""

from importlib import import_module

from tune_losses.extras import require_extra

require_extra("train", "tune_losses.training", ("omegaconf", "torchtune", "torchdata", "tqdm"))

_EXPORTS = {
    "LossRecipe": "loop",
    "run": "loop",
    "build_recipe": "entry",
    "NonFiniteTrainingError": "loop",
    "DPORecipe": "dpo",
    "TrainingLoss": "protocol",
    "SumAndCountLoss": "protocol",
    "ModelOutputLoss": "protocol",
    "TeacherOutputLoss": "protocol",
    "LoopSettings": "settings",
    "read_metrics": "metrics",
    "peak_memory_of": "memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
