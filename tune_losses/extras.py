"""Optional dependencies: a part of the package that needs an extra says which one when it is missing.

The losses need torch alone; ``tune_losses.training``, ``tune_losses.tiny`` and
``tune_losses.distill_cache`` need the ``train`` extra, ``tune_losses.integrations.trl`` the ``hf`` extra. Checking with ``importlib.util.find_spec``
imports nothing, so a present library costs no import time here.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence


def require_extra(extra: str, part: str, modules: Sequence[str]) -> None:
    """Raise ImportError naming ``extra`` when any of ``modules`` (top-level names) is not installed.

    Args:
        extra: the extra that installs them (``"train"``, ``"hf"``, ``"torchtune"``).
        part: the module that needs them, for the message.
        modules: importable top-level module names, e.g. ``("omegaconf", "torchtune")``.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{part} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'tune-losses[{extra}]'"
        )


def missing_extra(extra: str, part: str, err: ModuleNotFoundError) -> ImportError:
    """The ImportError to raise from ``except ModuleNotFoundError as err`` around a module-level import
    of an optional library: it names the missing module and the extra that installs it."""
    return ImportError(f"{part} needs {err.name}, which is not installed: pip install 'tune-losses[{extra}]'")
