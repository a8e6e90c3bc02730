"""Old flat keyword arguments folded into the options objects that replaced them.

A public function that moved some of its keywords into an options object (``options=``,
``parallel=``, ``execution=``, ``reference=``) still takes the old keywords through ``**deprecated``:
:func:`take` picks a group of them out, :func:`options_object` builds the object once from them (with
a DeprecationWarning that names the new form) or checks the object given, and :func:`no_more` rejects
whatever keyword is left. The object's own checks (``__post_init__``) are the only checks: nothing
is validated twice.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch

from tune_losses.options import ArgumentTypeError


def take(legacy: Dict[str, object], names: Sequence[str]) -> Dict[str, object]:
    """Remove and return the keywords of ``legacy`` named in ``names``."""
    return {k: legacy.pop(k) for k in names if k in legacy}


def no_more(fn: str, legacy: Dict[str, object]) -> None:
    """A TypeError naming the keywords left in ``legacy`` (as Python's for an unknown keyword)."""
    if legacy:
        raise TypeError(f"{fn}() got unexpected keyword arguments {sorted(legacy)}")


def warn_deprecated(fn: str, names: Sequence[str], replacement: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning: ``fn(names=...)`` is deprecated, use ``replacement``. None inside a
    ``torch.compile`` trace (a warning there would break the graph)."""
    if names and not torch.compiler.is_compiling():
        given = ", ".join(f"{k}=" for k in names)
        warnings.warn(f"{fn}({given}...) is deprecated: pass {replacement} instead", DeprecationWarning, stacklevel)


def options_object(
    fn: str,
    param: str,
    cls: type,
    given,
    flat: Dict[str, object],
    current: Optional[Dict[str, object]] = None,
    stacklevel: int = 4,
):
    """The options object of parameter ``param``.

    Args:
        fn, param: the public function and its parameter, for messages.
        cls: the options class.
        given: the object the caller passed (an instance of ``cls``, checked when it was made), or None.
        flat: old flat keywords for ``cls``'s fields: with ``given`` an error (said twice), else the
            object is made from them with a DeprecationWarning naming ``param=cls(...)``.
        current: current flat keywords that are also fields of ``cls`` (e.g. ``ignore_index``): None
            values are left out; given ones must agree with ``given``.
        stacklevel: of the warning; the default points at the caller of a public function that
            calls this directly.
    """
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
    names = ", ".join(f"{k}=" for k in flat)
    warn_deprecated(fn, list(flat), f"{param}={cls.__name__}({names}...)", stacklevel)
    return cls(**flat, **current)
