"""The one way tune-losses says that a form of a call is deprecated.

Every deprecated form (an old flat keyword argument, ...) warns through :func:`warn_deprecated`: a
:class:`TuneLossesDeprecationWarning` whose message starts with :data:`PREFIX` and names the form to
use instead. Users can silence or escalate exactly these warnings (by class, or by the message prefix
in a ``-W`` / pytest ``filterwarnings`` entry); the project's own tests turn them into errors, so the
package never calls itself in a form it deprecates.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any, Dict, Optional, Sequence

import torch

from tune_losses.options import ArgumentTypeError

PREFIX = "tune-losses deprecates "
"""Start of every deprecation message of this package (no ``:``, so it fits a ``-W`` filter)."""

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class TuneLossesDeprecationWarning(DeprecationWarning):
    """A form of a tune-losses call that still works but will go; the message names its replacement."""


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` of the first caller outside this package, so the warning points at user code
    however many of the package's own frames (helpers, wrappers) lie between."""
    level = 1
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def warn_deprecated(old: str, new: str) -> None:
    """Warn that ``old`` (e.g. ``"linear_cross_entropy(z_loss=...)"``) is deprecated in favour of ``new``.

    Not under ``torch.compile``: a warning inside a user's trace would break the graph.
    """
    if torch.compiler.is_compiling():
        return
    warnings.warn(
        f"{PREFIX}{old}: pass {new} instead", TuneLossesDeprecationWarning, stacklevel=_stacklevel_outside_package()
    )


# ------------------------------------------------------------- old flat keywords into options objects
# A public function that moved keywords into an options object (``options=``, ``parallel=``,
# ``execution=``, ...) takes the old ones through ``**deprecated``: :func:`take` picks a group out,
# :func:`options_object` builds the object once from them (warning) or checks the one given, and
# :func:`no_more` rejects what is left. The object's own ``__post_init__`` is the only check.


def take(legacy: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    """Remove and return the keywords of ``legacy`` named in ``names`` (values of any type)."""
    return {k: legacy.pop(k) for k in names if k in legacy}


def no_more(fn: str, legacy: Dict[str, object]) -> None:
    """A TypeError naming the keywords left in ``legacy`` (as Python's for an unknown keyword)."""
    if legacy:
        raise TypeError(f"{fn}() got unexpected keyword arguments {sorted(legacy)}")


def options_object(
    fn: str,
    param: str,
    cls: type,
    given,
    flat: Dict[str, object],
    current: Optional[Dict[str, object]] = None,
):
    """The options object of parameter ``param`` of ``fn``: ``given`` (an instance of ``cls``, already
    checked when it was made), or one made once from the old flat keyword arguments ``flat`` (with a
    deprecation warning naming ``param=cls(...)``) and the current flat ones ``current`` (e.g.
    ``ignore_index``; None values left out). Old flat keywords together with ``param`` are an error
    (said twice); a current one must agree with ``given``. A class of nested objects (e.g.
    ``DistillationOptions``) says how the flat keywords make one (its ``from_flat``) and how it is
    written in the warning (its ``form()``)."""
    current = {k: v for k, v in (current or {}).items() if v is not None}
    if given is not None:
        if not isinstance(given, cls):
            raise ArgumentTypeError(f"{param}: expected a {cls.__name__} or None, got {type(given).__name__}")
        if flat:
            names = ", ".join(f"{k}=" for k in flat)
            raise TypeError(f"{fn}: {names} and {param}= both given; put them in {param}={cls.__name__}(...)")
        for k, v in current.items():
            if getattr(given, k) != v:
                raise ValueError(f"{k}: got {v!r}, but {param}.{k} is {getattr(given, k)!r}; give it once")
        return given
    if flat:
        names = ", ".join(f"{k}=" for k in flat)
        form = cls.form() if hasattr(cls, "form") else f"{cls.__name__}({names}...)"
        warn_deprecated(f"{fn}({names}...)", f"{param}={form}")
    return getattr(cls, "from_flat", cls)(**flat, **current)
