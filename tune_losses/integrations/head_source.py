"""What a causal LM's own forward does between its backbone and its loss, read from its source.

The patch in :mod:`tune_losses.integrations.transformers` reproduces a model's training loss from the
final hidden states and the output weight. That is exact only if every step the stock forward applies
on the way (a logit scale, a softcap, a router auxiliary loss) is known. :func:`read_head` parses the
forward of the model's class once (``ast``) and returns a :class:`HeadSpec`; a step it does not
recognise raises a ValueError naming the model type and the attribute, so a model never trains on a
silently different loss.

Recognised, in the order the forward applies them:

* the output layer's input: the backbone's ``last_hidden_state`` (or ``outputs[0]``), optionally sliced
  (``slice_logits_to_keep``, ``hidden_states[:, idx, :]``) or moved (``.to(...)``);
* ``logits = logits * A`` / ``logits / A`` where ``A`` is a known scale attribute (Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, ``lm_head_multiplier``, ``output_multiplier``): applied
  as a scale of the hidden states, which is the same linear map;
* the softcap ``logits = s * tanh(logits / s)`` with ``s`` an attribute named ``*softcap*`` (Gemma 2);
* dtype casts (``logits.float()``), which the fused loss's fp32 math makes moot;
* ``loss = self.loss_function(...)`` (Transformers' ``ForCausalLMLoss``), then optionally
  ``loss += self.router_aux_loss_coef * aux_loss`` (MoE load balancing, kept as stock).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

Chain = Tuple[str, ...]
"""An attribute path from the model, e.g. ``("config", "final_logit_softcapping")`` for ``self.config.final_logit_softcapping``."""

SCALE_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
"""Attributes whose product with (or quotient of) the logits is a plain scale."""

AUX_COEF_ATTRS = ("router_aux_loss_coef", "aux_loss_coef")
"""Coefficients of a MoE load-balancing loss that a forward adds to its language-model loss."""


@dataclass(frozen=True)
class HeadSpec:
    """The steps between a model's backbone and its loss (attribute paths, read on every call).

    Attributes:
        model_type: the class name, for messages.
        base_attr: the backbone's attribute (``base_model_prefix``), whose output holds the final hidden states.
        head_attr: the output layer's attribute (``lm_head``, ``embed_out``, ...).
        scales: ``(chain, divide)`` pairs: logits multiplied (or divided) by the chain's value before any softcap.
        softcap: chain of the softcap value (the step is skipped when it reads None), or None.
        aux_coef: chain of the MoE router auxiliary-loss coefficient added to the loss, or None.
    """

    model_type: str
    base_attr: str
    head_attr: str
    scales: Tuple[Tuple[Chain, bool], ...] = ()
    softcap: Optional[Chain] = None
    aux_coef: Optional[Chain] = None

    def logit_scale(self, model) -> Optional[float]:
        """The product of the scale steps' current values, or None when there are none."""
        scale = None
        for chain, divide in self.scales:
            value = read_chain(model, chain)
            if value is None:
                continue
            value = 1.0 / value if divide else value
            scale = value if scale is None else scale * value
        return scale

    def softcap_value(self, model) -> Optional[float]:
        return None if self.softcap is None else read_chain(model, self.softcap)

    def aux_coefficient(self, model) -> Optional[float]:
        return None if self.aux_coef is None else read_chain(model, self.aux_coef)


def read_chain(model, chain: Chain):
    value = model
    for name in chain:
        value = getattr(value, name)
    return value


def read_head(model) -> HeadSpec:
    """The :class:`HeadSpec` of a Transformers ``*ForCausalLM`` instance.

    Raises:
        ValueError: the output layer or the backbone is not found, or the forward does something on
            the way to its loss that is not recognised (the message names the model type and the step).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"model: {type(model).__name__} has no output embeddings (get_output_embeddings() gave "
            f"None); expected a *ForCausalLM model"
        )
    head_attr = next((name for name, child in model.named_children() if child is head), None)
    if head_attr is None:
        raise ValueError(
            f"model: {type(model).__name__}'s output layer is not a direct child module; expected e.g. model.lm_head"
        )
    base_attr = getattr(model, "base_model_prefix", "") or ""
    if not base_attr or not hasattr(model, base_attr):
        raise ValueError(
            f"model: {type(model).__name__} has no backbone attribute base_model_prefix="
            f"{base_attr!r}; expected a *ForCausalLM model"
        )
    return _read_forward(forward_class(type(model)), head_attr, base_attr)


def forward_class(cls):
    """The class whose ``forward`` the instance runs (FSDP2 makes a subclass that inherits it)."""
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    return cls


@functools.cache
def _read_forward(cls, head_attr: str, base_attr: str) -> HeadSpec:
    name = cls.__name__
    fn = inspect.unwrap(cls.forward)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise ValueError(
            f"model: the source of {name}.forward is not readable ({e}), so what it does to the "
            f"logits cannot be checked"
        ) from None
    func = ast.parse(source).body[0]
    flat = list(_flatten(func.body))
    stmts = [st for st, _ in flat]
    guards = {id(st): g for st, g in flat}

    def fail(what: str, node=None) -> ValueError:
        where = f": `{ast.unparse(node)}`" if node is not None else ""
        return ValueError(
            f"model: {name}.forward {what}{where}; the fused loss would not match its loss, so "
            f"it is not patched (model type {name})"
        )

    calls_base = any(_is_self_call(n, base_attr) for s in stmts for n in _walk_own(s))
    if not calls_base:
        raise fail(f"never calls its backbone self.{base_attr}(...)")
    i_head, call = next(
        ((i, n) for i, s in enumerate(stmts) for n in _walk_own(s) if _is_self_call(n, head_attr)), (None, None)
    )
    if i_head is None:
        raise fail(f"never calls its output layer self.{head_attr}(...)")
    head_stmt = stmts[i_head]
    if not (
        isinstance(head_stmt, ast.Assign)
        and len(head_stmt.targets) == 1
        and not guards[id(head_stmt)]
        and isinstance(head_stmt.targets[0], ast.Name)
        and len(call.args) == 1
    ):
        raise fail("calls its output layer in an unrecognised way", head_stmt)
    scales: List[Tuple[Chain, bool]] = []
    value = head_stmt.value
    if _is_known_scaling(value, call):  # logits = self.lm_head(h) * self.config.logits_scaling
        scales.append((_chains(value.right)[0], isinstance(value.op, ast.Div)))
        value = value.left
    while _is_cast_of(value):  # .float() / .to(...) around the call
        value = value.func.value
    if value is not call:
        raise fail("calls its output layer in an unrecognised way", head_stmt)
    logits = head_stmt.targets[0].id
    hidden = _hidden_name(call.args[0])
    if hidden is None:
        raise fail("transforms the output layer's input", call.args[0])
    for s in stmts[:i_head]:
        if not _assigns(s, hidden) or (isinstance(s, ast.Assign) and _is_hidden_source(s.value, hidden)):
            continue
        value = _assigned_value(s, hidden)
        # An elementwise scale of the hidden states by an attribute: applied to them as is.
        if _is_scaling(value, hidden) and _guarded_by(guards[id(s)], _chains(value)[0]):
            scales.append((_chains(value)[0], isinstance(value.op, ast.Div)))
            continue
        raise fail(f"changes the hidden states `{hidden}` after the backbone", s)

    i_loss = next(
        (i for i, s in enumerate(stmts) if i > i_head and any(_is_self_call(n, "loss_function") for n in _walk_own(s))),
        None,
    )
    if i_loss is None:
        raise fail("computes its loss without self.loss_function")
    softcap: Optional[Chain] = None
    for s in stmts[i_head + 1 : i_loss]:
        if _mutates_in_place(s, logits):
            raise fail(f"modifies `{logits}` in place", s)
        if not _assigns(s, logits):
            continue
        value = _assigned_value(s, logits)
        guard = guards[id(s)]
        cap = [c for c in _chains(value) if any("softcap" in part for part in c)]
        if cap:
            if (
                not _is_scaling(value, logits)
                or (softcap is not None and cap[0] != softcap)
                or not _guarded_by(guard, cap[0])
            ):
                raise fail("applies an unrecognised softcap step", s)
            softcap = cap[0]
        elif _is_tanh(value, logits) and softcap is not None and _guarded_by(guard, softcap):
            continue
        elif _is_cast(value, logits):
            continue
        elif (
            _is_scaling(value, logits)
            and _chains(value)[0][-1] in SCALE_ATTRS
            and _guarded_by(guard, _chains(value)[0])
        ):
            if softcap is not None:
                raise fail(f"scales `{logits}` after its softcap", s)
            scales.append((_chains(value)[0], isinstance(value.op, ast.Div)))
        else:
            attrs = ", ".join(".".join(c) for c in _chains(value)) or "no attribute"
            raise fail(f"post-processes `{logits}` with an unrecognised step (attributes: {attrs})", s)

    loss_stmt = stmts[i_loss]
    loss = (
        loss_stmt.targets[0].id
        if (
            isinstance(loss_stmt, ast.Assign)
            and len(loss_stmt.targets) == 1
            and isinstance(loss_stmt.targets[0], ast.Name)
        )
        else None
    )
    if loss is None:
        raise fail("uses self.loss_function in an unrecognised way", loss_stmt)
    aux_coef: Optional[Chain] = None
    for s in stmts[i_loss + 1 :]:
        if not _assigns(s, loss):
            continue
        coef = [c for c in _chains(_assigned_value(s, loss)) if c[-1] in AUX_COEF_ATTRS]
        mentions_aux = any(isinstance(n, ast.Name) and n.id == "aux_loss" for n in _walk_own(s))
        if not (isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add) and coef and mentions_aux):
            raise fail(f"changes `{loss}` after self.loss_function in an unrecognised way", s)
        aux_coef = coef[0]
    return HeadSpec(name, base_attr, head_attr, tuple(scales), softcap, aux_coef)


def _flatten(body, guards: tuple = ()) -> Iterator[Tuple[ast.stmt, tuple]]:
    """``(statement, enclosing if-tests)`` in source order, descending into if / with / for / try blocks
    (an ``else`` branch or a loop body gets an unrecognisable guard)."""
    for s in body:
        yield s, guards
        if isinstance(s, ast.If):
            yield from _flatten(s.body, guards + (s.test,))
            yield from _flatten(s.orelse, guards + (ast.UnaryOp(op=ast.Not(), operand=s.test),))
            continue
        inner = guards if isinstance(s, (ast.With, ast.Try)) else guards + (s,)
        for field in ("body", "orelse", "finalbody"):
            yield from _flatten(getattr(s, field, None) or [], inner)
        for handler in getattr(s, "handlers", None) or []:
            yield from _flatten(handler.body, guards + (handler,))


def _guarded_by(guards: tuple, chain: Chain) -> bool:
    """Every enclosing test is ``self.<chain> is not None`` (or ``self.<chain>``): the step runs exactly
    when the value is set, which :class:`HeadSpec` mirrors by skipping None."""
    for g in guards:
        if (
            isinstance(g, ast.Compare)
            and len(g.ops) == 1
            and isinstance(g.ops[0], ast.IsNot)
            and isinstance(g.comparators[0], ast.Constant)
            and g.comparators[0].value is None
        ):
            g = g.left
        if not (isinstance(g, ast.Attribute) and _chains(g) == [chain]):
            return False
    return True


def _walk_own(s) -> Iterator[ast.AST]:
    """The nodes of statement ``s`` itself: an ``if``'s test but not its body (the body's statements
    come separately from :func:`_flatten`)."""
    nested = ("body", "orelse", "finalbody", "handlers")
    for field, value in ast.iter_fields(s):
        if field in nested:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ast.AST):
                yield from ast.walk(item)


def _is_self_call(node, attr: str) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attr
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    )


def _hidden_name(arg) -> Optional[str]:
    if _is_cast_of(arg):  # hidden_states.to(self.lm_head.weight.dtype): the fused loss casts itself
        arg = arg.func.value
    if isinstance(arg, ast.Name):
        return arg.id
    if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
        return arg.value.id
    if _is_slice_call(arg) and isinstance(arg.args[0], ast.Name):
        return arg.args[0].id
    return None


def _is_slice_call(node) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == "slice_logits_to_keep") or (
        isinstance(f, ast.Attribute) and f.attr == "slice_logits_to_keep"
    )


def _is_hidden_source(value, hidden: str) -> bool:
    if isinstance(value, ast.Attribute) and value.attr == "last_hidden_state":
        return True
    if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant) and value.slice.value == 0:
        return True  # outputs[0]
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == hidden:
        return True
    if _is_slice_call(value):
        first = value.args[0]
        return (isinstance(first, ast.Name) and first.id == hidden) or _is_hidden_source(first, hidden)
    return _is_cast(value, hidden)


def _assigns(s, name: str) -> bool:
    if isinstance(s, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in s.targets)
    if isinstance(s, (ast.AugAssign, ast.AnnAssign)):
        return isinstance(s.target, ast.Name) and s.target.id == name
    return False


def _assigned_value(s, name: str):
    """The right-hand side as an expression of ``name`` (``x += y`` read as ``x + y``)."""
    if isinstance(s, ast.AugAssign):
        return ast.BinOp(left=ast.Name(id=name, ctx=ast.Load()), op=s.op, right=s.value)
    return s.value


def _mutates_in_place(s, name: str) -> bool:
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr.endswith("_")
        and not n.func.attr.startswith("_")
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == name
        for n in _walk_own(s)
    )


def _chains(node) -> List[Chain]:
    """``self.a.b`` attribute paths in ``node`` as ``("a", "b")``, outermost first."""
    found = []
    for n in ast.walk(node):
        parts = []
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if parts and isinstance(n, ast.Name) and n.id == "self":
            chain = tuple(reversed(parts))
            if not any(c[: len(chain)] == chain for c in found):
                found.append(chain)
    return [c for c in found if not any(len(o) > len(c) and o[: len(c)] == c for o in found)]


def _is_scaling(value, name: str) -> bool:
    """``name * <attr>``, ``<attr> * name`` or ``name / <attr>`` (``name`` possibly cast, e.g.
    ``name.float()``) with ``<attr>`` a ``self.`` path."""
    if not isinstance(value, ast.BinOp) or not isinstance(value.op, (ast.Mult, ast.Div)):
        return False
    sides = [value.left, value.right]
    is_name = [isinstance(_uncast(x), ast.Name) and _uncast(x).id == name for x in sides]
    is_attr = [isinstance(x, ast.Attribute) and len(_chains(x)) == 1 for x in sides]
    if isinstance(value.op, ast.Div):
        return is_name[0] and is_attr[1]
    return (is_name[0] and is_attr[1]) or (is_name[1] and is_attr[0])


def _uncast(node):
    while _is_cast_of(node):
        node = node.func.value
    return node


def _is_known_scaling(value, call) -> bool:
    """``<call or cast of it> * <known scale attribute>`` (or ``/``)."""
    if not (isinstance(value, ast.BinOp) and isinstance(value.op, (ast.Mult, ast.Div))):
        return False
    chains = _chains(value.right) if isinstance(value.right, ast.Attribute) else []
    return len(chains) == 1 and chains[0][-1] in SCALE_ATTRS and any(n is call for n in ast.walk(value.left))


def _is_cast_of(node) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("float", "to", "contiguous")
    )


def _is_tanh(value, name: str) -> bool:
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "tanh"
        and len(value.args) == 1
        and isinstance(value.args[0], ast.Name)
        and value.args[0].id == name
    )


def _is_cast(value, name: str) -> bool:
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr in ("float", "to", "contiguous")
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == name
    )
