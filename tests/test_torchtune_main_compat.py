"""torchtune main's loss API on our side: models that honour ``skip_output_layer`` and the
constructor of torchtune main's ``LinearCrossEntropyLoss``.

torchtune main (the last code before development stopped) switches a decoder to hidden states with
``model.skip_output_layer = True`` and its ``LinearCrossEntropyLoss(num_output_chunks, ignore_index,
tp_enabled, mask_ignored_tokens)`` takes hidden states. torchtune 0.6.1 has neither, so the model
here is a 0.6.1 decoder whose ``unembed`` honours the flag, as torchtune main's does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tune_losses import set_output_mode

torchtune_models = pytest.importorskip("torchtune.models.llama2")
from torchtune.modules import TransformerDecoder  # noqa: E402

VOCAB, DIM = 96, 32


class MainStyleDecoder(TransformerDecoder):
    """A torchtune 0.6.1 decoder with torchtune main's ``skip_output_layer`` flag."""

    def unembed(self, h):
        h = self.norm(h)
        if self.skip_output_layer:
            return h
        if self.num_output_chunks > 0:
            return self.chunked_output(h)
        return self.output(h).float()


def main_style_decoder(seed: int = 0) -> MainStyleDecoder:
    torch.manual_seed(seed)
    model = torchtune_models.llama2(vocab_size=VOCAB, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=DIM,
                                    max_seq_len=64)
    model.__class__ = MainStyleDecoder
    model.skip_output_layer = False
    return model


class MainStyleHead(nn.Module):
    """Not a torchtune decoder: a body, an ``output`` projection and the ``skip_output_layer`` flag."""

    def __init__(self):
        super().__init__()
        self.body = nn.Embedding(VOCAB, DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.skip_output_layer = False

    def forward(self, tokens):
        h = self.body(tokens)
        return h if self.skip_output_layer else self.output(h)


@pytest.mark.parametrize("make", [main_style_decoder, MainStyleHead], ids=["decoder", "plain"])
def test_hidden_mode_uses_the_models_own_flag(make):
    model = make()
    tokens = torch.randint(0, VOCAB, (2, 7))
    logits = model(tokens)
    proj = set_output_mode(model, "hidden")
    assert model.skip_output_layer is True
    assert "unembed" not in model.__dict__ and "forward" not in model.output.__dict__  # nothing overridden
    hidden = model(tokens)
    assert hidden.shape == (2, 7, DIM)
    torch.testing.assert_close(proj(hidden).float(), logits.float())
    set_output_mode(model, "chunks", 3)
    assert model.skip_output_layer is False
    chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 3
    torch.testing.assert_close(torch.cat(chunks, dim=1).float(), logits.float())
    set_output_mode(model, "logits")
    assert model.skip_output_layer is False
    torch.testing.assert_close(model(tokens).float(), logits.float())
