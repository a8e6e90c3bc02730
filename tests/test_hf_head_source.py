"""head_source: what Transformers' own forwards do between backbone and loss, read from their source
(no model is built: class source only)."""

import re

import pytest

transformers = pytest.importorskip("transformers")

from tune_losses.integrations.head_source import _read_forward  # noqa: E402


def spec(name):
    cls = getattr(transformers, name)
    return _read_forward(cls, "lm_head", cls.base_model_prefix)


@pytest.mark.parametrize(
    "name,scales,softcap,aux",
    [
        ("LlamaForCausalLM", (), None, None),
        ("Qwen3MoeForCausalLM", (), None, ("router_aux_loss_coef",)),
        ("Gemma3ForCausalLM", (), ("config", "final_logit_softcapping"), None),
        ("Cohere2ForCausalLM", ((("logit_scale",), False),), None, None),
        ("GraniteMoeForCausalLM", ((("config", "logits_scaling"), True),), None, ("router_aux_loss_coef",)),
        ("HyperCLOVAXForCausalLM", ((("config", "logits_scaling"), False),), None, None),  # multiplies
        ("FalconH1ForCausalLM", ((("model", "lm_head_multiplier"), False),), None, None),
        ("MiniCPM3ForCausalLM", ((("config", "logits_scaling"), True),), None, None),  # scales the hidden states
        ("MambaForCausalLM", (), None, None),  # casts around the head only
    ],
)
def test_recognised_heads(name, scales, softcap, aux):
    s = spec(name)
    assert (s.scales, s.softcap, s.aux_coef) == (scales, softcap, aux)


@pytest.mark.parametrize(
    "name,what",
    [
        ("BambaForCausalLM", "z_loss_coefficient"),  # an extra z-loss added to the loss
        ("RecurrentGemmaForCausalLM", "nn.functional.tanh"),  # a softcap through a local variable
        ("ModernBertDecoderForCausalLM", "self.decoder(self.lm_head"),  # a second layer after the head
    ],
)
def test_unrecognised_steps_raise_naming_the_model_and_step(name, what):
    with pytest.raises(ValueError, match=rf"{name}\.forward .*{re.escape(what)}"):
        spec(name)


def test_a_scale_under_an_unrelated_condition_raises():
    class Conditional(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            if self.training:
                logits = logits * self.logit_scale
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits

    with pytest.raises(ValueError, match="unrecognised step"):
        _read_forward(Conditional, "lm_head", "model")
