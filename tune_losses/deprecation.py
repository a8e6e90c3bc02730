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
from typing import Optional

import torch

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
