"""The per-chunk elementwise math of the loss terms, compiled with TorchInductor where possible.

Between a chunk's matmuls the terms run a dozen elementwise passes and row reductions over the
``[n, V]`` logits (max, exp, sums, masks, gradients, scales). Eager PyTorch runs each as its own
pass over memory; Inductor fuses them into a few. The compiled function covers every term of a
loss and the sum of their gradients, so it is compiled once per (term set, V, dtype, chunk rows,
which outputs carry gradients); the engine pads the last, partial chunk to the full chunk's rows so
that it reuses the same code (no recompilation per batch or per chunk).

Compilation is an optimization only: the eager math is the same Python (:func:`terms_on_chunk`).
It is used when

* ``TUNE_LOSSES_COMPILE`` is not ``0`` (``1`` forces it; default ``auto``, which keeps cross-entropy
  alone eager on CPU, where that measured faster, and any term marked ``eager_in_auto``),
* the vocabulary is on one process (vocabulary-parallel math all-reduces mid-chunk: eager),
* the call is not itself being traced by a user's ``torch.compile`` (their graph then contains
  our eager math, which their compiler fuses), nor made under a user's ``TorchDispatchMode`` (a
  memory tracker, a profiler of operators): Dynamo compiles nothing under such a mode,
* and Inductor works here; otherwise the eager math runs and a warning says why, once per process.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch

from tune_losses.divergences import VocabReducer
from tune_losses.terms import Chunk, CrossEntropyTerm, Term

log = logging.getLogger(__name__)

_CACHE: Dict[tuple, Callable] = {}
_BROKEN: List[str] = []  # the reason compilation is off in this process, once found


def terms_on_chunk(
    terms: Sequence[Term],
    red: VocabReducer,
    z: torch.Tensor,
    zt: Optional[torch.Tensor],
    labels: torch.Tensor,
    valid: torch.Tensor,
    weights: Sequence,
    consume: bool,
    inputs: Optional[Dict[str, torch.Tensor]] = None,
):
    """Every term on one chunk: ``(outputs [n] in term order, summed logit gradient [n, V_r] or None)``.

    Args:
        weights: per term, None (values only) or one ``[n]`` tensor / None per output.
        consume: the logits buffers may be overwritten (by the last term reading each).
        inputs: per-token side inputs of the chunk's rows by name (:attr:`Chunk.inputs`).
    """
    chunk = Chunk(z, zt, labels, valid, red, dict(inputs or {}))
    last_teacher = -1
    for i, t in enumerate(terms):
        if t.needs_teacher:
            last_teacher = i
    outs: List[torch.Tensor] = []
    g = None
    for i, term in enumerate(terms):
        values, g_t = term.compute(chunk, weights[i], consume and i == len(terms) - 1, consume and i == last_teacher)
        outs.extend(values)
        if g_t is not None:
            g = g_t if g is None else g.add_(g_t)
    return outs, g


_RECOMPILE_LIMIT = 64


def _mode() -> str:
    return os.environ.get("TUNE_LOSSES_COMPILE", "auto").strip().lower()


def _turn_off(reason: str) -> None:
    if not _BROKEN:
        _BROKEN.append(reason)
        warnings.warn(f"tune_losses: per-chunk loss math runs eagerly (correct, slower): {reason}", stacklevel=3)
        log.warning("per-chunk loss math runs eagerly: %s", reason)


def _in_user_dispatch_mode() -> bool:
    """Whether a (non-infrastructure) ``TorchDispatchMode`` is active, under which ``torch.compile``
    with ``fullgraph=True`` refuses to run (it finds no frame it may compile)."""
    from torch.utils import _python_dispatch as dispatch

    probe = getattr(dispatch, "is_in_torch_dispatch_mode", None)
    if probe is not None:
        return bool(probe(include_infra_modes=False))
    return dispatch._get_current_dispatch_mode() is not None


def compiled_math(terms: Sequence[Term], red: VocabReducer, device: torch.device) -> Optional[Callable]:
    """The compiled :func:`terms_on_chunk` for these terms (signature without ``terms``, ``red`` and
    ``consume``), or None where the eager math must run (see the module docstring)."""
    if _mode() in ("0", "false", "off", "no") or _BROKEN or red.distributed:
        return None
    if device.type not in ("cpu", "cuda") or torch.compiler.is_compiling() or _in_user_dispatch_mode():
        return None
    if not all(t.compilable for t in terms):
        return None
    if _mode() == "auto" and device.type == "cpu" and all(isinstance(t, CrossEntropyTerm) for t in terms):
        # Measured (python -m benchmarks.run, CPU fp32, N=2048, H=256, V=32768, idle 2 cores): the
        # cross-entropy math alone is one exp pass the eager code already writes in place, and the
        # compiled version was slower (801 vs 682 ms) and kept a chunk more (65.7 vs 50.1 MiB). With a
        # divergence term the compiled math wins (distillation 1437 vs 1618 ms, JSD 1817 vs 2094 ms).
        return None
    if _mode() == "auto" and any(getattr(t, "eager_in_auto", False) for t in terms):
        return None  # a term whose eager math is leaner (its class says why, with the measurement)
    key = (tuple(terms), red.vocab, device.type)
    fn = _CACHE.get(key)
    if fn is None:
        frozen_terms, local = tuple(terms), VocabReducer(red.vocab)

        def math(z, zt, labels, valid, weights, inputs):
            # consume=False: the terms' math stays functional, so Inductor can fuse it; the summed
            # gradient is then written over the student's logits buffer in the last fused pass (the
            # engine reads it there), so a chunk needs no third [n, V] buffer.
            outs, g = terms_on_chunk(frozen_terms, local, z, zt, labels, valid, weights, False, inputs)
            if g is None:
                return outs, False
            z.copy_(g)
            return outs, True

        # torch.compile's cache and recompile limit belong to a code object: each key gets a copy of
        # its own, so term sets, vocabularies and row counts do not use up one shared limit.
        own = types.FunctionType(
            math.__code__.replace(co_name=f"tune_losses_chunk_math_{len(_CACHE)}"),
            math.__globals__,
            None,
            math.__defaults__,
            math.__closure__,
        )
        fn = _CACHE[key] = torch.compile(own, dynamic=False, fullgraph=True)
    return fn


def _compiler_errors() -> Tuple[Type[BaseException], ...]:
    """The exceptions that mean "the compiler cannot build this here" (no C++ compiler, an
    unsupported operation, a lowering failure), not an error of the computation itself."""
    errors: List[Type[BaseException]] = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor import exc as inductor_exc
    except ImportError:  # pragma: no cover - torch without Inductor
        return tuple(errors)
    for name in ("CppCompileError", "InvalidCxxCompiler", "OperatorIssue", "CppWrapperCodegenError"):
        cls = getattr(inductor_exc, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


COMPILER_ERRORS = _compiler_errors()


def _caused_by_oom(e: BaseException) -> bool:
    """Whether an out-of-memory error is anywhere in ``e``'s chain (a compiler error can wrap one)."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, torch.OutOfMemoryError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def run_compiled(
    fn: Callable, z, zt, labels, valid, weights, inputs=None
) -> Optional[Tuple[list, Optional[torch.Tensor]]]:
    """Call a compiled chunk function: ``(outputs, gradient)`` as :func:`terms_on_chunk`, the
    gradient written over ``z`` (``z`` itself, or None when no term has a gradient weight); None
    (and compilation off from now on, said once) if the compiler fails. Any other error (an
    out-of-memory error included, also one a compiler error wraps) propagates."""
    try:
        # A key's code compiles once per (rows, dtype, gradient pattern): a few powers of two of rows,
        # with and without gradients, exceed torch's default limit of 8 for one code object.
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            outs, has_grad = fn(z, zt, labels, valid, weights, dict(inputs or {}))
            return outs, (z if has_grad else None)
    except COMPILER_ERRORS as e:
        if _caused_by_oom(e):
            raise
        _turn_off(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
