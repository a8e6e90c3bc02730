"""The weight and bias a model's output layer applies, as differentiable tensors, PEFT included.

``logits = hidden @ weight.T + bias`` must hold for what :func:`output_weight` returns, so the fused loss
sees exactly the layer's linear map and gradients reach the parameters the layer would train:

* ``nn.Linear`` (tied or not): its own parameters (an FSDP2 DTensor is gathered by the fused loss);
* PEFT ``ModulesToSaveWrapper`` (``modules_to_save=["lm_head"]``): the copy of the active adapter, or the
  original layer when adapters are disabled;
* PEFT LoRA on the output layer: ``W + sum_a scaling_a * B_a @ A_a`` over the active adapters (a
  ``[V, H]`` tensor, the size of the weight; no ``[tokens, V]`` tensor), plus the LoRA bias if any.
  LoRA dropout is applied to the layer's *input*, which no weight can express: dropout > 0 in training
  raises. DoRA and other LoRA variants raise;
* an ``nn.Linear`` subclass with its own ``forward`` (Dory's head multiplies by a learnable per-row
  ``logit_scale``): recognised when that forward is the linear map times (or divided by) an expression of
  the layer's own attributes, ``s * (x W^T + b) == x (s W)^T + s b``: the weight and bias are returned
  scaled (a ``[V, H]`` tensor, like LoRA's), so gradients reach the scale's parameters by autograd. Any
  other forward raises: it is never ignored.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Optional, Tuple

import torch
from torch import nn

from tune_losses.fused.placement import materialize_weight


def output_weight(layer: nn.Module, name: str = "lm_head") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, H], bias [V] or None)`` of the output layer ``layer`` as it would compute now."""
    peft = _peft_types()
    if peft is not None:
        ModulesToSaveWrapper, BaseTunerLayer, LoraLayer = peft
        if isinstance(layer, ModulesToSaveWrapper):
            return output_weight(_active_copy(layer), name)
        if isinstance(layer, LoraLayer):
            return _lora_weight(layer, name)
        if isinstance(layer, BaseTunerLayer):
            raise ValueError(
                f"{name}: PEFT layer {type(layer).__name__} on the output layer is not supported "
                f"(supported: LoRA, modules_to_save)"
            )
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{name}: expected an nn.Linear output layer (or PEFT LoRA / modules_to_save on one), got "
            f"{type(layer).__name__}"
        )
    scale_of = _subclass_scale(_forward_owner(type(layer)))
    if scale_of is None:
        return weight, layer.bias
    scale = scale_of(layer)
    if torch.is_tensor(scale) and scale.numel() == weight.shape[0] and scale.numel() != 1:
        row = scale.reshape(-1)
        weight = materialize_weight(weight) * row[:, None]
        bias = None if layer.bias is None else materialize_weight(layer.bias) * row
    else:
        weight = materialize_weight(weight) * scale
        bias = None if layer.bias is None else materialize_weight(layer.bias) * scale
    return weight, bias


def check_output_layer(layer: nn.Module) -> None:
    """Raise now (ValueError) when the ``nn.Linear`` under ``layer`` (PEFT wrappers unwrapped) overrides its
    forward with a step :func:`output_weight` does not recognise; state-dependent checks (LoRA dropout in
    training) stay with :func:`output_weight`."""
    peft = _peft_types()
    while peft is not None:
        ModulesToSaveWrapper, BaseTunerLayer, _ = peft
        if isinstance(layer, ModulesToSaveWrapper):
            layer = _active_copy(layer)
        elif isinstance(layer, BaseTunerLayer) and hasattr(layer, "get_base_layer"):
            layer = layer.get_base_layer()
        else:
            break
    if isinstance(layer, nn.Linear):
        _subclass_scale(_forward_owner(type(layer)))


def _forward_owner(cls):
    """The class in ``cls``'s MRO that defines the ``forward`` instances run."""
    return next(k for k in cls.__mro__ if "forward" in vars(k))


@functools.cache
def _subclass_scale(cls):
    """None when ``cls.forward`` is ``nn.Linear``'s; else a function ``layer -> scale`` for a forward of
    the form ``return <linear(x)> * <expr>`` (or ``/``), possibly through one local variable, where
    ``<linear(x)>`` is ``super().forward(x)`` or ``F.linear(x, self.weight, self.bias)`` (casts allowed)
    and ``<expr>`` reads only the layer's attributes and constants. Raises ValueError otherwise."""
    if cls.forward is nn.Linear.forward:
        return None
    name = cls.__name__

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"output layer: {name} overrides nn.Linear.forward and {why}; the fused loss recognises only "
            f"a scale of the linear map by the layer's own attributes (logits * self.<attr>), so the "
            f"model is not patched"
        )

    try:
        func = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))).body[0]
    except (OSError, TypeError, SyntaxError) as e:
        raise refuse(f"its source is not readable ({e})") from None
    body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    params = [a.arg for a in func.args.args]
    if len(params) != 2 or func.args.vararg or func.args.kwarg or not body or not isinstance(body[-1], ast.Return):
        raise refuse("its signature or body is not forward(self, x): ... return ...")
    x = params[1]
    result = body[-1].value
    if len(body) == 2:  # logits = <linear>; return logits * <expr>
        first = body[0]
        if not (isinstance(first, ast.Assign) and len(first.targets) == 1 and isinstance(first.targets[0], ast.Name)):
            raise refuse(f"does `{ast.unparse(first)}`")
        local, linear = first.targets[0].id, first.value
    elif len(body) == 1:
        local, linear = None, None
    else:
        raise refuse("has more than two statements")
    if not (isinstance(result, ast.BinOp) and isinstance(result.op, (ast.Mult, ast.Div))):
        raise refuse(f"returns `{ast.unparse(result)}`")
    is_linear = (
        (lambda n: isinstance(_uncast(n), ast.Name) and _uncast(n).id == local)
        if local
        else (lambda n: _is_linear_call(n, x))
    )
    if is_linear(result.left):
        right = result.right
    elif isinstance(result.op, ast.Mult) and is_linear(result.right):
        right = result.left
    else:
        raise refuse(f"returns `{ast.unparse(result)}`, not its linear map times a scale")
    if local is not None and not _is_linear_call(linear, x):
        raise refuse(f"computes `{ast.unparse(linear)}`, not its linear map")
    bad = [n for n in ast.walk(right) if isinstance(n, ast.Name) and n.id != "self"]
    bad += [n for n in ast.walk(right) if isinstance(n, ast.Call) and not _is_cast_call(n)]
    if bad:
        raise refuse(f"scales by `{ast.unparse(right)}`, which is not an expression of its own attributes")
    code = compile(ast.Expression(right), f"<{name}.forward scale>", "eval")
    divide = isinstance(result.op, ast.Div)

    def scale_of(layer):
        value = eval(code, {"__builtins__": {}}, {"self": layer})  # the layer's own expression, as its forward runs it
        if torch.is_tensor(value) and value.numel() not in (1, layer.weight.shape[0]):
            raise refuse(f"scales by a tensor of shape {tuple(value.shape)}, neither one value nor one per row")
        return 1.0 / value if divide else value

    return scale_of


def _is_linear_call(node, x: str) -> bool:
    node = _uncast(node)
    if not isinstance(node, ast.Call) or len(node.args) < 1 or not isinstance(node.args[0], ast.Name):
        return False
    if node.args[0].id != x:
        return False
    f = node.func
    if (  # super().forward(x)
        isinstance(f, ast.Attribute)
        and f.attr == "forward"
        and isinstance(f.value, ast.Call)
        and isinstance(f.value.func, ast.Name)
        and f.value.func.id == "super"
        and len(node.args) == 1
    ):
        return True
    return (  # F.linear(x, self.weight, self.bias)
        isinstance(f, (ast.Attribute, ast.Name))
        and (f.attr if isinstance(f, ast.Attribute) else f.id) == "linear"
        and [ast.unparse(a) for a in node.args[1:]] == ["self.weight", "self.bias"]
    )


def _is_cast_call(node) -> bool:
    return (
        isinstance(node.func, ast.Attribute)
        and node.func.attr in ("float", "to", "type_as")
        and not any(isinstance(n, ast.Name) and n.id != "self" for a in node.args for n in ast.walk(a))
    )


def _uncast(node):
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("float", "to"):
        node = node.func.value
    return node


def _peft_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    return ModulesToSaveWrapper, BaseTunerLayer, LoraLayer


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a ``ModulesToSaveWrapper`` runs (PEFT's own rule in ``forward``)."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(a not in wrapper.modules_to_save for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _lora_weight(layer: nn.Module, name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    base = layer.get_base_layer()
    weight, bias = output_weight(base, name)
    if layer.disable_adapters:
        if layer.merged:
            raise ValueError(f"{name}: LoRA adapters are merged into the weight but disabled; unmerge them first")
        return weight, bias
    if layer.merged:
        return weight, bias
    deltas, bias_deltas = [], []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"{name}: the LoRA variant of adapter {adapter!r} "
                f"({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA) is not supported on the "
                f"output layer; use plain LoRA or modules_to_save"
            )
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            raise ValueError(
                f"{name}: LoRA dropout {dropout.p} on the output layer (adapter {adapter!r}) in training "
                f"acts on the input, which the fused loss cannot express through the weight; use "
                f"lora_dropout=0.0 for this layer (e.g. a separate adapter config), or exclude lm_head"
            )
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        scaling = layer.scaling[adapter]
        delta = materialize_weight(b.weight) @ materialize_weight(a.weight) * scaling
        deltas.append(delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
        if getattr(b, "bias", None) is not None:
            bias_deltas.append(materialize_weight(b.bias) * scaling)
    if not deltas:
        return weight, bias
    weight = materialize_weight(weight)
    for delta in deltas:
        weight = weight + delta.to(weight.dtype)
    if bias_deltas:
        bias = materialize_weight(bias) if bias is not None else torch.zeros_like(bias_deltas[0])
        for delta in bias_deltas:
            bias = bias + delta.to(weight.dtype)
    return weight, bias
