"""head_source: what Transformers' own forwards do between backbone and loss, read from their source
(no model is built: class source only)."""

import re

import pytest

transformers = pytest.importorskip("transformers")

from tune_losses.integrations.head_source import _read_forward  # noqa: E402


def spec(name, head=("lm_head",)):
    return _read_forward(getattr(transformers, name), head)


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
    assert (s.hidden_scales + s.scales, s.softcap, s.aux_coef) == (scales, softcap, aux)


@pytest.mark.parametrize(
    "name,head,field,value",
    [
        ("OPTForCausalLM", ("lm_head",), "base", ("model", "decoder")),  # nested backbone
        ("Llama4ForCausalLM", ("lm_head",), "base", ("model",)),  # base_model_prefix says language_model
        ("MllamaForCausalLM", ("lm_head",), "base", ("model",)),
        ("BartForCausalLM", ("lm_head",), "loss", "unshifted"),  # CrossEntropyLoss() on unshifted labels
        ("BambaForCausalLM", ("lm_head",), "z_loss", ("z_loss_coefficient",)),  # z-loss over every position
        ("RecurrentGemmaForCausalLM", ("lm_head",), "softcap", ("config", "logits_soft_cap")),  # via a local
        ("Gemma4ForCausalLM", ("lm_head",), "softcap", ("config", "final_logit_softcapping")),  # three steps
        ("Inkling2ForCausalLM", ("lm_head",), "softcap_module", ("logit_softcap",)),  # a softcap module
        ("ModernBertDecoderForCausalLM", ("decoder",), "transforms", (("lm_head",),)),  # a head before the layer
        ("BertLMHeadModel", ("cls", "predictions", "decoder"), "call", ("cls",)),  # the layer inside a head
        ("InklingForCausalLM", ("lm_head",), "hidden_scales", ((("config", "logits_mup_width_multiplier"), True),)),
    ],
)
def test_structure_read_from_the_forward(name, head, field, value):
    assert getattr(spec(name, head), field) == value


@pytest.mark.parametrize(
    "name,what",
    [
        ("XLMWithLMHeadModel", "self.pred_layer(hidden_states, labels)"),  # the head computes the loss itself
    ],
)
def test_unrecognised_steps_raise_naming_the_model_and_step(name, what):
    with pytest.raises(ValueError, match=rf"{name}\.forward .*{re.escape(what)}"):
        spec(name, ("pred_layer", "proj"))


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
        _read_forward(Conditional, ("lm_head",))
