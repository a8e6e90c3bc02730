"""head_source: what Transformers' own forwards do between backbone and loss, read from their source
(no model is built: class source only)."""

import importlib
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tune_losses.integrations.head_source import _read_forward  # noqa: E402

XLSTM_EVAL = "not self.training and self.config.max_inference_chunksize < logits.shape[1]"


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
        ("xLSTMForCausalLM", ("lm_head",), "softcap", ("config", "output_logit_soft_cap")),  # a function's softcap
        ("xLSTMForCausalLM", ("lm_head",), "eval_steps", (XLSTM_EVAL,)),  # its chunked eval branch set aside
        ("LlamaForCausalLM", ("lm_head",), "eval_steps", ()),
    ],
)
def test_structure_read_from_the_forward(name, head, field, value):
    assert getattr(spec(name, head), field) == value


@pytest.mark.parametrize(
    "name,head,what",
    [
        ("XLMWithLMHeadModel", ("pred_layer", "proj"), "self.pred_layer(hidden_states, labels)"),  # its own loss
        # GIT drops its image tokens' logits and shifts the labels itself before self.loss_function.
        ("GitForCausalLM", ("output",), "loss_function(logits=shifted_logits, labels=None"),
    ],
)
def test_unrecognised_steps_raise_naming_the_model_and_step(name, head, what):
    with pytest.raises(ValueError, match=rf"{name}\.forward .*{re.escape(what)}"):
        spec(name, head)


@pytest.mark.parametrize(
    "call",
    [
        "self.loss_function(logits=logits[:, 1:], labels=labels, vocab_size=self.config.vocab_size)",
        "self.loss_function(logits=logits, labels=labels[:, 1:], vocab_size=self.config.vocab_size)",
        "self.loss_function(logits=other, labels=labels, vocab_size=self.config.vocab_size)",
        "self.loss_function(logits, None, self.config.vocab_size, shift_labels=labels)",
    ],
)
def test_a_loss_function_given_other_logits_or_labels_raises(call, tmp_path, monkeypatch):
    # A module file, so that the reader gets the forward's source as it does for Transformers' classes.
    (tmp_path / "custom_loss_call.py").write_text(
        "import transformers\n\n\n"
        "class Custom(transformers.LlamaForCausalLM):\n"
        "    def forward(self, input_ids=None, labels=None, **kwargs):\n"
        "        outputs = self.model(input_ids=input_ids, **kwargs)\n"
        "        logits = self.lm_head(outputs.last_hidden_state)\n"
        "        other = logits * 2\n"
        f"        loss = {call}\n"
        "        return loss, logits\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("custom_loss_call")
    try:
        with pytest.raises(ValueError, match="passes self.loss_function something other than `logits`"):
            _read_forward(module.Custom, ("lm_head",))
    finally:
        sys.modules.pop("custom_loss_call", None)


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


def exact_cap(values, cap):
    if cap is None:
        return values
    return cap * torch.tanh(values / cap)


def shifted_cap(values, cap):
    return cap * torch.tanh(values / cap) + 1.0


def test_a_softcap_function_is_read_only_when_it_is_exactly_one():
    class Capped(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            logits = self.lm_head(outputs.last_hidden_state)
            logits = exact_cap(logits, self.config.cap)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits

    class Shifted(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            logits = self.lm_head(outputs.last_hidden_state)
            logits = shifted_cap(logits, self.config.cap)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits

    assert _read_forward(Capped, ("lm_head",)).softcap == ("config", "cap")
    with pytest.raises(ValueError, match=r"Shifted\.forward post-processes `logits` with an unrecognised step"):
        _read_forward(Shifted, ("lm_head",))


def test_an_eval_only_branch_is_set_aside_and_its_else_branch_read():
    class EvalScaled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            logits = self.lm_head(outputs.last_hidden_state)
            if not self.training and self.config.odd:
                logits.mul_(2.0)
            else:
                logits = logits * self.logit_scale
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits

    s = _read_forward(EvalScaled, ("lm_head",))
    assert (s.scales, s.eval_steps) == (((("logit_scale",), False),), ("not self.training and self.config.odd",))
