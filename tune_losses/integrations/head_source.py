"""What a causal LM's own forward does between its backbone and its loss, read from its source.

The patch in :mod:`tune_losses.integrations.transformers` reproduces a model's training loss from the
backbone's final hidden states and the output layer's weight. That is exact only if every step the stock
forward applies on the way (a logit scale, a softcap, a head transform, an auxiliary loss) is known.
:func:`read_head` parses the forward of the model's class (``ast``, once per class) and returns a
:class:`HeadSpec`; a step it does not recognise raises a ValueError naming the model type and the step,
so a model never trains on a silently different loss.

Recognised, in the order the forward applies them:

* the backbone: the module whose call gives the output layer's input (``outputs = self.model(...)``,
  ``self.model.decoder(...)``, ``self.language_model(...)``): found from what ``forward`` calls, not from
  ``base_model_prefix``; its ``last_hidden_state`` (or ``[0]``), optionally sliced
  (``slice_logits_to_keep``, ``hidden_states[:, idx, :]``), moved (``.to(...)``) or scaled by an attribute;
* modules applied to the hidden states before the output layer (``self.decoder(self.lm_head(h))``,
  ``self.cls(h)`` where the output layer ``cls.predictions.decoder`` is the last step of ``cls``): run as
  they are, so their parameters train;
* ``logits = logits * A`` / ``logits / A`` where ``A`` is a known scale attribute (Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, ``lm_head_multiplier``, ``output_multiplier``);
* the softcap ``s * tanh(logits / s)`` in one expression or three statements, ``s`` an attribute (or a
  local variable holding one: RecurrentGemma), or a module whose forward is exactly that (Inkling 2);
* the softcap as a call of a module function that is exactly one (xLSTM's ``soft_cap(logits, s)``);
* dtype casts (``logits.float()``), which the fused loss's fp32 math makes moot;
* steps under ``if not self.training ...``: never run in training, so set aside (``eval_steps``; the
  patch then fuses in training mode only);
* the loss: ``self.loss_function(...)`` (the caller checks it is Transformers' causal-LM loss), or
  ``CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))`` on unshifted labels (the encoder-decoder
  families' ``*ForCausalLM``);
* after the loss: ``loss += coef * aux_loss`` (MoE load balancing, kept as stock) and Bamba's z-loss
  ``coef * logits.logsumexp(-1).pow(2).mean()`` over every position.

An output layer whose own ``forward`` is not ``nn.Linear``'s is handled (scaled or refused) by
:mod:`.output_layer`.
"""

from __future__ import annotations

import ast
import dataclasses
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

CAUSAL = "causal"
"""Transformers' causal-LM loss: labels shifted by one, ``num_items_in_batch`` honoured."""

UNSHIFTED = "unshifted"
"""``torch.nn.CrossEntropyLoss()`` over the labels as given (no shift), mean over tokens != -100."""


@dataclass(frozen=True)
class HeadSpec:
    """The steps between a model's backbone and its loss (attribute paths, read on every call).

    Attributes:
        model_type: the class name, for messages.
        base: the backbone module (``("model",)``, ``("model", "decoder")``), whose output holds the final hidden states.
        head: the output layer (``("lm_head",)``, ``("cls", "predictions", "decoder")``).
        call: the module the forward calls with the hidden states: ``head``, or a module containing it
            whose forward ends by returning the output layer's result (its earlier steps run as they are).
        transforms: modules the forward applies to the hidden states before ``call``, innermost first.
        hidden_scales: ``(chain, divide)`` pairs: hidden states multiplied (or divided) before ``transforms``.
        scales: ``(chain, divide)`` pairs: logits multiplied (or divided) before any softcap.
        softcap: chain of the softcap value (the step is skipped when it reads None), or None.
        aux_coef: chain of the MoE router auxiliary-loss coefficient added to the loss, or None.
        z_loss: chain of a coefficient ``c`` of ``c * mean(lse^2)`` over every position (Bamba), added when > 0.
        loss: :data:`CAUSAL` or :data:`UNSHIFTED`.
        eval_steps: the tests of branches the forward runs only in eval mode (``if not self.training and
            ...``), not read: the spec holds in training mode only (xLSTM's chunked eval softcap).
    """

    model_type: str
    base: Chain
    head: Chain
    call: Chain
    transforms: Tuple[Chain, ...] = ()
    hidden_scales: Tuple[Tuple[Chain, bool], ...] = ()
    scales: Tuple[Tuple[Chain, bool], ...] = ()
    softcap: Optional[Chain] = None
    aux_coef: Optional[Chain] = None
    z_loss: Optional[Chain] = None
    loss: str = CAUSAL
    softcap_module: Optional[Chain] = None  # resolved into ``softcap`` by :func:`read_head`
    vocab_limit: Optional[Chain] = None  # logits cut to the first ``u`` vocabulary rows when ``u`` is set
    eval_steps: Tuple[str, ...] = ()  # tests ``not self.training and ...`` whose branches were set aside

    def vocab_rows(self, model) -> Optional[int]:
        """The number of vocabulary rows the logits keep, or None for all."""
        return None if self.vocab_limit is None else read_chain(model, self.vocab_limit)

    def hidden_scale(self, model) -> Optional[float]:
        """The product of the hidden-state scale steps' current values, or None when there are none."""
        return _product(model, self.hidden_scales)

    def logit_scale(self, model) -> Optional[float]:
        """The product of the logit scale steps' current values, or None when there are none."""
        return _product(model, self.scales)

    def softcap_value(self, model) -> Optional[float]:
        return None if self.softcap is None else read_chain(model, self.softcap)

    def aux_coefficient(self, model) -> Optional[float]:
        return None if self.aux_coef is None else read_chain(model, self.aux_coef)

    def z_loss_coefficient(self, model) -> float:
        return 0.0 if self.z_loss is None else float(read_chain(model, self.z_loss))


def _product(model, scales):
    scale = None
    for chain, divide in scales:
        value = read_chain(model, chain)
        if value is None:
            continue
        value = 1.0 / value if divide else value
        scale = value if scale is None else scale * value
    return scale


TEXT_CONFIG = "get_text_config()"
"""A chain step that calls ``get_text_config()`` (composite configs: ``self.config.get_text_config().x``)."""


def read_chain(model, chain: Chain):
    value = model
    for name in chain:
        value = value.get_text_config() if name == TEXT_CONFIG else getattr(value, name)
    return value


def _is_text_config_call(n) -> bool:
    return (
        isinstance(n, ast.Call)
        and not n.args
        and not n.keywords
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "get_text_config"
    )


def read_head(model) -> HeadSpec:
    """The :class:`HeadSpec` of a Transformers causal LM instance.

    Raises:
        ValueError: the output layer or the backbone is not found, or the forward does something on
            the way to its loss that is not recognised (the message names the model type and the step).
    """
    import torch

    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"model: {name} has no output embeddings (get_output_embeddings() gave None); expected a causal LM"
        )
    if isinstance(head, torch.nn.ModuleList):  # MusicGen: one output layer per codebook, losses summed
        raise ValueError(
            f"model: {name}'s output embeddings are {len(head)} layers (a ModuleList, one per codebook); the "
            f"fused loss takes one output layer, so it is not patched"
        )
    head_path = next((tuple(p.split(".")) for p, m in model.named_modules() if m is head and p), None)
    if head_path is None:
        raise ValueError(f"model: {name}'s output layer (get_output_embeddings()) is not one of its modules")
    spec = _read_forward(forward_class(type(model)), head_path)
    for chain in (spec.base, spec.call, *spec.transforms):
        if not isinstance(_maybe_chain(model, chain), torch.nn.Module):
            raise ValueError(
                f"model: {name}.forward calls self.{'.'.join(chain)}(...), which is not a module; the fused "
                f"loss would not match its loss, so it is not patched"
            )
    if spec.call != head_path:
        _check_container(model, spec.call, head_path)
    if spec.softcap_module is not None:
        module = read_chain(model, spec.softcap_module)
        attr = _module_softcap(type(module))
        if attr is None:
            raise ValueError(
                f"model: {name}.forward post-processes its logits with self.{'.'.join(spec.softcap_module)} "
                f"({type(module).__name__}), whose forward is not a softcap s * tanh(x / s); the fused loss "
                f"would not match its loss, so it is not patched"
            )
        spec = dataclasses.replace(spec, softcap=spec.softcap_module + (attr,), softcap_module=None)
    return spec


def _maybe_chain(model, chain: Chain):
    try:
        return read_chain(model, chain)
    except AttributeError:
        return None


def forward_class(cls):
    """The class whose ``forward`` the instance runs (FSDP2 makes a subclass that inherits it)."""
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            return klass
    return cls


def _function_ast(fn, what: str) -> ast.FunctionDef:
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    except (OSError, TypeError) as e:
        raise ValueError(
            f"model: the source of {what} is not readable ({e}), so what it does cannot be checked"
        ) from None
    func = ast.parse(source).body[0]
    if not isinstance(func, ast.FunctionDef):
        raise ValueError(f"model: the source of {what} is not a function definition")
    return func


def _body(func: ast.FunctionDef) -> list:
    """The statements of ``func`` without its docstring."""
    body = list(func.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def _check_container(model, call: Chain, head: Chain) -> None:
    """``self.<call>`` contains the output layer ``self.<head>``, and every forward from it down to the
    output layer ends by returning the next level's result untouched (``return self.decoder(x)``, or
    ``x = self.decoder(x); return x``), so running the container with the output layer captured gives the
    output layer's input exactly."""
    name = type(model).__name__
    if head[: len(call)] != call:
        raise ValueError(
            f"model: {name}.forward calls self.{'.'.join(call)}(...) where its output layer is "
            f"self.{'.'.join(head)}; the fused loss would not match its loss, so it is not patched"
        )
    module = read_chain(model, call)
    for i in range(len(call), len(head)):
        child = head[i]
        if not _ends_with_call(forward_class(type(module)), child):
            raise ValueError(
                f"model: {name}'s head module self.{'.'.join(head[:i])} ({type(module).__name__}) does more "
                f"than return self.{child}(...) at its end; the fused loss would not match its loss, so it "
                f"is not patched"
            )
        module = getattr(module, child)


@functools.cache
def _ends_with_call(cls, child: str) -> bool:
    func = _function_ast(cls.forward, f"{cls.__name__}.forward")
    body = _body(func)
    calls = [n for s in body for n in ast.walk(s) if _is_self_call(n, child)]
    if len(calls) != 1 or not body or not isinstance(body[-1], ast.Return):
        return False
    ret = body[-1].value
    if ret is calls[0]:
        return True
    if len(body) < 2 or not isinstance(ret, ast.Name):
        return False
    last = body[-2]
    return (
        isinstance(last, ast.Assign)
        and len(last.targets) == 1
        and isinstance(last.targets[0], ast.Name)
        and last.targets[0].id == ret.id
        and last.value is calls[0]
    )


@functools.cache
def _module_softcap(cls) -> Optional[str]:
    """``attr`` when ``cls.forward(x)`` is exactly ``return tanh(x / self.<attr>) * self.<attr>``."""
    try:
        func = _function_ast(cls.forward, f"{cls.__name__}.forward")
    except ValueError:
        return None
    body = _body(func)
    args = [a.arg for a in func.args.args[1:]]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or len(args) != 1:
        return None
    cap = _softcap_expr(body[0].value, args[0])
    return cap[0] if cap is not None and len(cap) == 1 else None


def _softcap_expr(value, name: str) -> Optional[Chain]:
    """The chain ``s`` when ``value`` is ``tanh(name / s) * s`` (either factor order), else None."""
    if not (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Mult)):
        return None
    for tanh, cap in ((value.left, value.right), (value.right, value.left)):
        if not (
            isinstance(tanh, ast.Call)
            and isinstance(tanh.func, (ast.Attribute, ast.Name))
            and (tanh.func.attr if isinstance(tanh.func, ast.Attribute) else tanh.func.id) == "tanh"
            and len(tanh.args) == 1
        ):
            continue
        inner = tanh.args[0]
        if not (isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Div)):
            continue
        if not (isinstance(_uncast(inner.left), ast.Name) and _uncast(inner.left).id == name):
            continue
        chains = _chains(cap)
        if isinstance(cap, ast.Attribute) and len(chains) == 1 and _chains(inner.right) == chains:
            return chains[0]
    return None


class _Aliases(ast.NodeTransformer):
    """Replace local names bound once to ``self.<chain>`` by that attribute (``cap = self.config.cap``)."""

    def __init__(self, aliases):
        self.aliases = aliases

    def visit_Name(self, node):
        if isinstance(node.ctx, ast.Load) and node.id in self.aliases:
            return ast.copy_location(ast.parse(self.aliases[node.id], mode="eval").body, node)
        return node


def _resolve_aliases(func: ast.FunctionDef) -> ast.FunctionDef:
    assigned = {}
    for n in ast.walk(func):
        targets = (
            n.targets
            if isinstance(n, ast.Assign)
            else [n.target]
            if isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr))
            else []
        )
        for t in targets:
            if isinstance(t, ast.Name):
                assigned.setdefault(t.id, []).append(n)
    aliases = {}
    for var, stmts in assigned.items():
        if (
            len(stmts) == 1
            and isinstance(stmts[0], (ast.Assign, ast.NamedExpr))
            and isinstance(stmts[0].value, ast.Attribute)
        ):
            chains = _chains(stmts[0].value)
            if len(chains) == 1 and ast.unparse(stmts[0].value) == "self." + ".".join(chains[0]):
                aliases[var] = ast.unparse(stmts[0].value)
    return ast.fix_missing_locations(_Aliases(aliases).visit(func)) if aliases else func


@functools.cache
def _read_forward(cls, head: Chain) -> HeadSpec:
    name = cls.__name__
    func = _resolve_aliases(_function_ast(cls.forward, f"{name}.forward"))
    flat = list(_flatten(func.body))
    # Statements under `not self.training` never run in training: set aside (HeadSpec.eval_steps). The
    # else branch of such a test always runs in training: that guard is dropped.
    eval_steps = tuple(ast.unparse(g[-1]) for _, g in flat if g and _is_eval_only(g[-1]))
    flat = [(st, tuple(t for t in g if not _is_else_of_eval_only(t))) for st, g in flat if not _in_eval_only(g)]
    stmts = [st for st, _ in flat]
    guards = {id(st): g for st, g in flat}

    def fail(what: str, node=None) -> ValueError:
        where = f": `{ast.unparse(node)}`" if node is not None else ""
        return ValueError(
            f"model: {name}.forward {what}{where}; the fused loss would not match its loss, so "
            f"it is not patched (model type {name})"
        )

    def is_head_call(n) -> bool:
        chain = _self_call_chain(n)
        return chain is not None and len(chain) <= len(head) and head[: len(chain)] == chain

    i_head, call = next(((i, n) for i, s in enumerate(stmts) for n in _walk_own(s) if is_head_call(n)), (None, None))
    if i_head is None:
        raise fail(f"never calls its output layer self.{'.'.join(head)}(...)")
    head_stmt = stmts[i_head]
    if not (
        isinstance(head_stmt, ast.Assign)
        and len(head_stmt.targets) == 1
        and not guards[id(head_stmt)]
        and isinstance(head_stmt.targets[0], ast.Name)
        and len(call.args) == 1
        and not call.keywords
    ):
        raise fail("calls its output layer in an unrecognised way", head_stmt)
    scales: List[Tuple[Chain, bool]] = []
    value = head_stmt.value
    if _is_known_scaling(value, call):  # logits = self.lm_head(h) * self.config.logits_scaling
        scales.append((_chains(value.right)[0], isinstance(value.op, ast.Div)))
        value = value.left
    while _is_cast_of(value):  # .float() / .to(...) / .contiguous() around the call
        value = value.func.value
    if value is not call:
        raise fail("calls its output layer in an unrecognised way", head_stmt)
    logits = head_stmt.targets[0].id
    # Modules applied before the output layer: self.decoder(self.lm_head(h)) -> transforms (lm_head,)
    transforms: List[Chain] = []
    arg = call.args[0]
    while _self_call_chain(arg) is not None and len(arg.args) == 1 and not arg.keywords:
        transforms.insert(0, _self_call_chain(arg))
        arg = arg.args[0]
    base: Optional[Chain] = None
    direct = _hidden_source(arg, "")  # self.lm_head(outputs[0]): the backbone's output read in place
    if direct:
        base = _backbone_of(stmts[:i_head], direct)
        if base is None:
            raise fail(f"takes its hidden states from `{direct}`, which is not a backbone call's output", arg)
    hidden = _hidden_name(arg) if not direct else None
    if hidden is None and not direct:
        raise fail("transforms the output layer's input", arg)
    hidden_scales: List[Tuple[Chain, bool]] = []
    for s in stmts[:i_head] if hidden is not None else ():
        if not _assigns(s, hidden):
            continue
        value = _assigned_value(s, hidden)
        source = _hidden_source(value, hidden)
        if source is None and _is_scaling_of_source(value, hidden) and not guards[id(s)]:
            # hidden_states = outputs.last_hidden_state / self.config.logits_mup_width_multiplier
            hidden_scales.append((_chains(value.right)[0], isinstance(value.op, ast.Div)))
            source = _hidden_source(value.left, hidden)
        if source is not None:
            if source != hidden:  # the name of the backbone's output
                base = _backbone_of(stmts[: stmts.index(s)], source)
                if base is None:
                    raise fail(f"takes its hidden states from `{source}`, which is not a backbone call's output", s)
            continue
        # An elementwise scale of the hidden states by an attribute: applied to them as is.
        if _is_scaling(value, hidden) and _guarded_by(guards[id(s)], _chains(value)[0]):
            hidden_scales.append((_chains(value)[0], isinstance(value.op, ast.Div)))
            continue
        raise fail(f"changes the hidden states `{hidden}` after the backbone", s)
    if base is None:
        raise fail(f"does not take the output layer's input `{hidden}` from a backbone call")

    i_loss, loss_kind = _find_loss(stmts, i_head, logits)
    if i_loss is None:
        raise fail("computes its loss neither with self.loss_function nor with a plain CrossEntropyLoss()")
    if loss_kind is None:
        raise fail("uses self.loss_function in an unrecognised way", stmts[i_loss])
    if loss_kind == CAUSAL and not _loss_reads(stmts[i_loss].value, logits):
        # e.g. GIT: loss_function(logits=logits[:, num_image_tokens:-1], labels=None, shift_labels=...)
        raise fail(f"passes self.loss_function something other than `{logits}` and `labels`", stmts[i_loss])
    softcap: Optional[Chain] = None
    softcap_module: Optional[Chain] = None
    pending_cap: Optional[Chain] = None  # logits = logits / s, awaiting tanh and * s
    vocab_limit: Optional[Chain] = None
    for s in stmts[i_head + 1 : i_loss]:
        if _mutates_in_place(s, logits):
            raise fail(f"modifies `{logits}` in place", s)
        if not _assigns(s, logits):
            continue
        value = _assigned_value(s, logits)
        guard = guards[id(s)]
        one_step = _softcap_expr(value, logits) or _softcap_function_call(value, logits, cls)
        module = _self_call_chain(value)
        if one_step is not None and _guarded_by(guard, one_step) and softcap is None and pending_cap is None:
            softcap = one_step
        elif (
            module is not None
            and len(value.args) == 1
            and isinstance(value.args[0], ast.Name)
            and value.args[0].id == logits
            and not guard
            and softcap is None
            and softcap_module is None
        ):
            softcap_module = module  # e.g. self.logit_softcap(logits); read_head checks its forward
        elif (
            _is_scaling(value, logits)
            and isinstance(value.op, ast.Div)
            and pending_cap is None
            and softcap is None
            and _guarded_by(guard, _chains(value)[0])
            and _chains(value)[0][-1] not in SCALE_ATTRS
        ):
            pending_cap = _chains(value)[0]  # first of three steps: logits / s
        elif (
            _is_tanh(value, logits) and pending_cap is not None and softcap is None and _guarded_by(guard, pending_cap)
        ):
            continue
        elif (
            _is_scaling(value, logits)
            and isinstance(value.op, ast.Mult)
            and pending_cap is not None
            and _chains(value)[0] == pending_cap
            and _guarded_by(guard, pending_cap)
        ):
            softcap, pending_cap = pending_cap, None
        elif _is_cast(value, logits):
            continue
        elif _vocab_slice(value, logits) is not None and _vocab_guard_ok(guard, _vocab_slice(value, logits), logits):
            if softcap is not None or softcap_module is not None or pending_cap is not None or vocab_limit is not None:
                raise fail(f"slices `{logits}` after other steps", s)
            vocab_limit = _vocab_slice(value, logits)
        elif (
            _is_scaling(value, logits)
            and _chains(value)[0][-1] in SCALE_ATTRS
            and _guarded_by(guard, _chains(value)[0])
        ):
            if softcap is not None or softcap_module is not None or pending_cap is not None:
                raise fail(f"scales `{logits}` after its softcap", s)
            scales.append((_chains(value)[0], isinstance(value.op, ast.Div)))
        else:
            attrs = ", ".join(".".join(c) for c in _chains(value)) or "no attribute"
            raise fail(f"post-processes `{logits}` with an unrecognised step (attributes: {attrs})", s)
    if pending_cap is not None:
        raise fail(f"divides `{logits}` by self.{'.'.join(pending_cap)} without a matching softcap")

    loss_stmt = stmts[i_loss]
    loss = loss_stmt.targets[0].id
    aux_coef: Optional[Chain] = None
    z_loss: Optional[Chain] = None
    for s in stmts[i_loss + 1 :]:
        if not _assigns(s, loss):
            continue
        value = _assigned_value(s, loss)
        coef = [c for c in _chains(value) if c[-1] in AUX_COEF_ATTRS]
        mentions_aux = any(isinstance(n, ast.Name) and n.id == "aux_loss" for n in _walk_own(s))
        if isinstance(s, ast.AugAssign) and isinstance(s.op, ast.Add) and coef and mentions_aux:
            aux_coef = coef[0]
            continue
        own = [g for g in guards[id(s)] if not any(g is h for h in guards[id(loss_stmt)])]
        z = _z_loss_step(value, loss, logits, stmts[i_loss + 1 : stmts.index(s)], own)
        if z is not None and z_loss is None:
            z_loss = z
            continue
        raise fail(f"changes `{loss}` after computing it in an unrecognised way", s)
    return HeadSpec(
        model_type=name,
        base=base,
        head=head,
        call=_self_call_chain(call),
        transforms=tuple(transforms),
        hidden_scales=tuple(hidden_scales),
        scales=tuple(scales),
        softcap=softcap,
        aux_coef=aux_coef,
        z_loss=z_loss,
        loss=loss_kind,
        softcap_module=softcap_module,
        vocab_limit=vocab_limit,
        eval_steps=tuple(dict.fromkeys(eval_steps)),
    )


def _vocab_slice(value, logits: str) -> Optional[Chain]:
    """``u`` when ``value`` is ``logits[..., :self.<u>]`` (the first ``u`` rows of the vocabulary)."""
    if not (isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == logits):
        return None
    idx = value.slice
    if not (isinstance(idx, ast.Tuple) and len(idx.elts) == 2):
        return None
    dots, sl = idx.elts
    if not (isinstance(dots, ast.Constant) and dots.value is Ellipsis and isinstance(sl, ast.Slice)):
        return None
    if sl.lower is not None or sl.step is not None or not isinstance(sl.upper, ast.Attribute):
        return None
    chains = _chains(sl.upper)
    return chains[0] if len(chains) == 1 else None


def _vocab_guard_ok(guards, chain: Chain, logits: str) -> bool:
    """Every enclosing test is ``self.<u> is not None`` and / or ``self.<u> < logits.shape[-1]``: the slice
    runs when it cuts rows, which :class:`HeadSpec` mirrors."""
    for g in guards:
        parts = g.values if isinstance(g, ast.BoolOp) and isinstance(g.op, ast.And) else [g]
        for p in parts:
            text = ast.unparse(p)
            attr = "self." + ".".join(chain)
            if text not in (f"{attr} is not None", f"{attr} < {logits}.shape[-1]"):
                return False
    return True


def _find_loss(stmts, i_head: int, logits: str):
    """``(index of the loss statement, CAUSAL | UNSHIFTED)``, or ``(None, None)``.

    The loss statement assigns one name from ``self.loss_function(...)``, or from a local ``CrossEntropyLoss()``
    (made without arguments) called as ``f(logits.view(-1, ...), labels.view(-1))``."""
    ce_names = set()
    for i, s in enumerate(stmts):
        if i <= i_head:
            continue
        if (
            isinstance(s, ast.Assign)
            and len(s.targets) == 1
            and isinstance(s.targets[0], ast.Name)
            and isinstance(s.value, ast.Call)
            and not s.value.args
            and not s.value.keywords
            and _call_name(s.value) == "CrossEntropyLoss"
        ):
            ce_names.add(s.targets[0].id)
            continue
        if not (isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)):
            if any(_is_self_call(n, "loss_function") for n in _walk_own(s)):
                return i, None
            continue
        value = s.value
        if _is_self_call(value, "loss_function"):
            return i, CAUSAL
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id in ce_names
            and len(value.args) == 2
            and not value.keywords
            and _is_flat_view(value.args[0], logits, keep_last=True)
            and _is_flat_view(value.args[1], "labels", keep_last=False)
        ):
            return i, UNSHIFTED
    return None, None


def _loss_reads(call: ast.Call, logits: str) -> bool:
    """``self.loss_function`` gets the output layer's logits (``logits``, maybe cast) and the forward's
    ``labels``, by keyword or as its first two arguments: what the fused loss is given in their place."""
    given = dict(zip(("logits", "labels"), call.args))
    given.update({k.arg: k.value for k in call.keywords if k.arg in ("logits", "labels")})
    got, labels = given.get("logits"), given.get("labels")
    return (
        got is not None
        and ((isinstance(got, ast.Name) and got.id == logits) or _is_cast(got, logits))
        and isinstance(labels, ast.Name)
        and labels.id == "labels"
    )


def _call_name(call) -> Optional[str]:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_flat_view(node, name: str, keep_last: bool) -> bool:
    """``name.view(-1, <anything>)`` (keep_last) or ``name.view(-1)``."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("view", "reshape")
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == name
        and node.args
        and ast.unparse(node.args[0]) == "-1"
    ):
        return False
    return len(node.args) == (2 if keep_last else 1)


def _z_loss_step(value, loss: str, logits: str, between, guard) -> Optional[Chain]:
    """The coefficient chain of ``loss = loss + self.<c> * z`` where ``z`` was assigned
    ``logits.logsumexp(dim=-1)...pow(2).mean()`` (only casts in between), under ``if self.<c> > 0``."""
    if not (isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)):
        return None
    if not (isinstance(value.left, ast.Name) and value.left.id == loss):
        return None
    term = value.right
    if not (isinstance(term, ast.BinOp) and isinstance(term.op, ast.Mult)):
        return None
    coef, z = term.left, term.right
    if not (isinstance(coef, ast.Attribute) and len(_chains(coef)) == 1 and isinstance(z, ast.Name)):
        return None
    chain = _chains(coef)[0]
    z_def = [s for s in between if isinstance(s, ast.Assign) and _assigns(s, z.id)]
    if len(z_def) != 1 or ast.unparse(_strip_casts(z_def[0].value)) != f"{logits}.logsumexp(dim=-1).pow(2).mean()":
        return None
    ok_guard = bool(guard) and all(
        isinstance(g, ast.Compare)
        and _chains(g.left) == [chain]
        and isinstance(g.left, ast.Attribute)
        and len(g.ops) == 1
        and isinstance(g.ops[0], ast.Gt)
        and ast.unparse(g.comparators[0]) in ("0", "0.0")
        for g in guard
    )
    return chain if ok_guard else None


def _strip_casts(node):
    """``x.a(...).to(...).b()`` -> ``x.a(...).b()``: drop ``.to`` / ``.float`` links from a method chain."""

    class Strip(ast.NodeTransformer):
        def visit_Call(self, n):
            self.generic_visit(n)
            if _is_cast_of(n):
                return n.func.value
            return n

    return Strip().visit(ast.parse(ast.unparse(node), mode="eval").body)


def _self_call_chain(node) -> Optional[Chain]:
    """``("a", "b")`` for a call ``self.a.b(...)``, else None."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    parts = []
    n = node.func
    while isinstance(n, ast.Attribute):
        parts.append(n.attr)
        n = n.value
    if isinstance(n, ast.Name) and n.id == "self":
        return tuple(reversed(parts))
    return None


def _hidden_source(value, hidden: str) -> Optional[str]:
    """For an assignment to ``hidden``: ``hidden`` when it re-derives the hidden states from themselves
    (slice, cast), the backbone output's name when it reads it (``outputs.last_hidden_state``,
    ``outputs[0]``, either of them under a condition), else None."""
    if isinstance(value, ast.IfExp):
        a, b = _hidden_source(value.body, hidden), _hidden_source(value.orelse, hidden)
        return a if a is not None and a == b else None
    if isinstance(value, ast.Attribute) and value.attr == "last_hidden_state" and isinstance(value.value, ast.Name):
        return value.value.id
    if (
        isinstance(value, ast.Subscript)
        and isinstance(value.value, ast.Name)
        and isinstance(value.slice, ast.Constant)
        and value.slice.value == 0
    ):
        return value.value.id  # outputs[0]
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == hidden:
        return hidden
    if _is_slice_call(value):
        first = value.args[0]
        if isinstance(first, ast.Name) and first.id == hidden:
            return hidden
        return _hidden_source(first, hidden)
    if _is_cast(value, hidden):
        return hidden
    return None


def _is_scaling_of_source(value, hidden: str) -> bool:
    return (
        isinstance(value, ast.BinOp)
        and isinstance(value.op, (ast.Mult, ast.Div))
        and isinstance(value.right, ast.Attribute)
        and len(_chains(value.right)) == 1
        and _hidden_source(value.left, hidden) not in (None, hidden)
    )


def _backbone_of(stmts, name: str) -> Optional[Chain]:
    """The module chain of the last unguarded ``name = self.<chain>(...)`` in ``stmts``."""
    for s in reversed(stmts):
        if _assigns(s, name):
            value = s.value if isinstance(s, (ast.Assign, ast.AnnAssign)) else None
            return _self_call_chain(value)
    return None


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


def _is_eval_only(test) -> bool:
    """``not self.training``, alone or as one operand of an ``and``: the branch never runs in training."""
    parts = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
    return any(
        isinstance(p, ast.UnaryOp) and isinstance(p.op, ast.Not) and ast.unparse(p.operand) == "self.training"
        for p in parts
    )


def _is_else_of_eval_only(guard) -> bool:
    """The else branch's guard of an eval-only test (:func:`_flatten` negates the test): true in training."""
    return isinstance(guard, ast.UnaryOp) and isinstance(guard.op, ast.Not) and _is_eval_only(guard.operand)


def _in_eval_only(guards: tuple) -> bool:
    return any(_is_eval_only(g) for g in guards if isinstance(g, ast.expr))


def _softcap_function_call(value, logits: str, cls) -> Optional[Chain]:
    """``s`` when ``value`` is ``f(logits, self.<s>)`` and ``f``, a function of the forward's module, is
    exactly a softcap ``s * tanh(x / s)`` (returning ``x`` when ``s`` is None, as the spec skips None):
    xLSTM's ``soft_cap``."""
    if not (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and len(value.args) == 2
        and not value.keywords
        and isinstance(value.args[0], ast.Name)
        and value.args[0].id == logits
        and isinstance(value.args[1], ast.Attribute)
    ):
        return None
    chains = _chains(value.args[1])
    if len(chains) != 1 or ast.unparse(value.args[1]) != "self." + ".".join(chains[0]):
        return None
    module = inspect.getmodule(cls)
    fn = getattr(module, value.func.id, None) if module is not None else None
    return chains[0] if inspect.isfunction(fn) and _is_softcap_function(fn) else None


@functools.cache
def _is_softcap_function(fn) -> bool:
    """``def f(x, s): [if s is None: return x]; return s * tanh(x / s)`` (either factor order)."""
    try:
        func = _function_ast(fn, fn.__name__)
    except ValueError:
        return False
    params = [a.arg for a in func.args.args]
    body = _body(func)
    if len(params) != 2 or func.args.vararg or func.args.kwarg or not body:
        return False
    x, cap = params
    if len(body) == 2 and ast.unparse(body[0]) != f"if {cap} is None:\n    return {x}":
        return False
    if len(body) not in (1, 2) or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return False
    forms = {f"{cap} * {t}({x} / {cap})" for t in ("torch.tanh", "tanh")}
    forms |= {f"{t}({x} / {cap}) * {cap}" for t in ("torch.tanh", "tanh")}
    return ast.unparse(body[-1].value) in forms


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
        if isinstance(g, ast.NamedExpr):  # (cap := self.config.cap) is not None
            g = g.value
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
    methods = {id(n.func) for n in ast.walk(node) if _is_text_config_call(n)}  # read as a step, not an attribute
    for n in ast.walk(node):
        if id(n) in methods:
            continue
        parts = []
        while isinstance(n, ast.Attribute) or _is_text_config_call(n):
            if isinstance(n, ast.Attribute):
                parts.append(n.attr)
                n = n.value
            else:
                parts.append(TEXT_CONFIG)
                n = n.func.value
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
