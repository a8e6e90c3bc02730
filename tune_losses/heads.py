"""Model side: make any LM's output projection emit logit chunks or hand over its hidden states.

Modes (:func:`set_output_mode`):

* ``"logits"``: the model as built.
* ``"chunks"``: the final hidden states are split with :func:`tune_losses.chunking.split_tokens` and
  projected chunk by chunk: the model returns a list of ``[B, S_i, V]`` logits for the
  chunked-output losses.
* ``"hidden"``: the model returns its final (normed) hidden states ``[B, S, H]`` and the fused
  linear losses apply the projection themselves (:class:`OutputProjection` gives them its weight).

Works on a torchtune ``TransformerDecoder`` (its ``unembed`` is overridden on the instance, so the
split is ours, not torchtune 0.6.1's ``.chunk``; a decoder with torchtune main's
``skip_output_layer`` flag is switched to hidden states by that flag), on any module with an ``lm_head`` or ``output``
projection (Hugging Face style or plain PyTorch; its ``forward`` is overridden on the instance), with
tied embeddings (torchtune's ``TiedLinear``, or an ``lm_head`` sharing the embedding's parameter) and
with FSDP2-sharded weights. Module names and ``state_dict`` keys never change, so checkpoints load
and save as before.
"""

from __future__ import annotations

import types
from typing import List, Optional

import torch
from torch import nn

from tune_losses.chunking import split_tokens
from tune_losses.options import check_choice, check_int_option

MODES = ("logits", "chunks", "hidden")
SPLITS = ("tensor_split", "chunk")
_HEAD_NAMES = ("lm_head", "output")


class OutputProjection:
    """A live handle on a model's output projection ``logits = h @ weight.T + bias``.

    ``weight`` is looked up on every access, so it follows tied embeddings and FSDP2's swapping of
    sharded and unsharded parameters. Under FSDP2, outside the model's forward it is a sharded
    DTensor; the fused losses gather it once per call.
    """

    def __init__(self, head):
        self.head = head

    @property
    def weight(self) -> torch.Tensor:
        tied = getattr(self.head, "tied_module", None)  # torchtune's TiedLinear
        return tied.weight if tied is not None else self.head.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        if getattr(self.head, "tied_module", None) is not None:
            return None
        return getattr(self.head, "bias", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _is_torchtune_decoder(model: nn.Module) -> bool:
    try:
        from torchtune.modules import TransformerDecoder
    except ImportError:  # torchtune is optional for plain PyTorch users
        return False
    return isinstance(model, TransformerDecoder)


def _find_head(model: nn.Module):
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if head is not None and (hasattr(head, "weight") or hasattr(head, "tied_module")):
            return head
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"model: expected a torchtune TransformerDecoder or a module with an `lm_head` / `output` projection "
            f"(or get_output_embeddings()), got {type(model).__name__} with none"
        )
    return head


def output_projection(model: nn.Module) -> OutputProjection:
    """The model's output projection as an :class:`OutputProjection`."""
    return OutputProjection(model.output if _is_torchtune_decoder(model) else _find_head(model))


def set_output_mode(
    model: nn.Module, mode: str, num_output_chunks: int = 0, *, split: str = "tensor_split"
) -> OutputProjection:
    """Switch what ``model(...)`` returns at its output: full logits, logit chunks or hidden states.

    Args:
        model: torchtune ``TransformerDecoder``, or a module with an ``lm_head`` / ``output`` head.
        mode: ``"logits"``, ``"chunks"`` (needs ``num_output_chunks >= 1``) or ``"hidden"``.
        num_output_chunks: chunk count for ``"chunks"``.
        split: how ``"chunks"`` cuts the tokens: ``"tensor_split"`` (:func:`split_tokens`; our losses
            accept any split) or ``"chunk"`` (``Tensor.chunk``, torchtune 0.6.1's own split, which
            torchtune's chunked-output losses assume when they re-split the labels).

    Returns:
        The model's :class:`OutputProjection` (the fused losses read its weight and bias).
    """
    check_choice("mode", mode, MODES)
    if mode == "chunks":
        check_int_option("num_output_chunks", num_output_chunks, 1)
    check_choice("split", split, SPLITS)
    proj = output_projection(model)
    native_skip = _has_skip_output_layer(model)
    if native_skip:
        # torchtune main's decoders return their normed hidden states themselves when
        # `skip_output_layer` is set (the flag its SFTLoss protocol sets): use it, override nothing.
        model.skip_output_layer = mode == "hidden"
    if _is_torchtune_decoder(model):
        _set_decoder_mode(model, "logits" if native_skip and mode == "hidden" else mode, num_output_chunks, split)
    else:
        _set_head_mode(proj.head, "logits" if native_skip and mode == "hidden" else mode, num_output_chunks, split)
    return proj


def _has_skip_output_layer(model: nn.Module) -> bool:
    """Whether ``model`` honours torchtune main's ``skip_output_layer`` flag (a bool attribute)."""
    return isinstance(getattr(model, "skip_output_layer", None), bool)


# The overrides are bound methods (types.MethodType), not closures over the model / head:
# ``copy.deepcopy(model)`` (an EMA, reference or frozen copy) rebinds them to the copy, so the copy's
# output runs its own norm and projection, not the original model's.
def _decoder_unembed_chunks(self, h: torch.Tensor) -> List[torch.Tensor]:
    return [self.output(c) for c in split_tokens(self.norm(h), self.num_output_chunks)]


def _decoder_unembed_hidden(self, h: torch.Tensor) -> torch.Tensor:
    return self.norm(h)


def _head_forward_chunks(self, h: torch.Tensor) -> List[torch.Tensor]:
    forward = type(self).forward
    n = self._tune_losses_num_output_chunks
    parts = h.chunk(n, dim=1) if self._tune_losses_split == "chunk" else split_tokens(h, n)
    return [forward(self, c) for c in parts]


def _head_forward_hidden(self, h: torch.Tensor) -> torch.Tensor:
    return h


def _set_decoder_mode(model: nn.Module, mode: str, n: int, split: str = "tensor_split") -> None:
    # Instance attributes shadow TransformerDecoder.unembed; deleting them restores torchtune's.
    model.__dict__.pop("unembed", None)
    model.num_output_chunks = n if mode == "chunks" else 0
    if mode == "chunks" and split == "chunk":
        return  # torchtune's own unembed: chunked_output with .chunk
    if mode == "chunks":
        model.unembed = types.MethodType(_decoder_unembed_chunks, model)
    elif mode == "hidden":
        model.unembed = types.MethodType(_decoder_unembed_hidden, model)


def _set_head_mode(head, mode: str, n: int, split: str = "tensor_split") -> None:
    if not isinstance(head, nn.Module):
        raise ValueError(f"model: its output head must be an nn.Module to switch modes, got {type(head).__name__}")
    head.__dict__.pop("forward", None)
    if mode == "chunks":
        head._tune_losses_num_output_chunks = n
        head._tune_losses_split = split
        head.forward = types.MethodType(_head_forward_chunks, head)
    elif mode == "hidden":
        head.forward = types.MethodType(_head_forward_hidden, head)


def configure_model_for_loss(model: nn.Module, loss: nn.Module) -> str:
    """Put ``model`` in the output mode ``loss`` consumes, judged by what the loss is, not its name.

    * a loss with ``set_model_output(model)`` (fused linear losses; torchtune's SFTLoss protocol)
      takes the projection and switches the model to hidden states;
    * a loss with ``num_output_chunks >= 1`` (chunked-output losses, ours or torchtune's) gets chunks;
      torchtune's own classes get them cut with ``Tensor.chunk``, the split they assume;
    * anything else gets full logits.

    Returns:
        The mode chosen.
    """
    if callable(getattr(loss, "set_model_output", None)):
        loss.set_model_output(model)
        return "hidden"
    n = getattr(loss, "num_output_chunks", 0)
    if isinstance(n, int) and n >= 1:
        # torchtune 0.6.1's chunked-output losses re-split the labels with ``.chunk(n)`` and zip them
        # with the logit chunks: tensor_split chunks would raise a shape error (or, where ``.chunk``
        # gives fewer chunks, drop tokens) whenever S % n != 0. Give them their own split.
        split = "chunk" if _is_torchtune_chunked_loss(loss) else "tensor_split"
        set_output_mode(model, "chunks", n, split=split)
        return "chunks"
    set_output_mode(model, "logits")
    return "logits"


def _is_torchtune_chunked_loss(loss: nn.Module) -> bool:
    """Whether ``loss`` is (a subclass of) one of torchtune's chunked-output losses."""
    try:
        from torchtune.modules import loss as tt_loss
    except ImportError:  # torchtune is optional
        return False
    classes = tuple(getattr(tt_loss, name) for name in dir(tt_loss) if name.endswith("WithChunkedOutputLoss"))
    return isinstance(loss, classes)
