"""tune_losses.integrations.transformers.patch: stock loss and gradients, no logits, stock paths untouched."""

import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import assert_fused_matches_stock, assert_same_grads, batch, build, pair  # noqa: E402

from tune_losses.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

KINDS = ["llama", "llama_tied", "qwen2", "gemma2", "mixtral", "cohere", "granite"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ignore", ["none", "some"])
def test_loss_and_all_gradients_match_stock(kind, ignore):
    stock, fused = pair(kind)
    patch(fused)
    ids, labels = batch(ignore=ignore)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ref, out = assert_fused_matches_stock(stock, fused, input_ids=ids, attention_mask=mask, labels=labels)
    if kind == "mixtral":  # the router auxiliary loss is part of the loss, as stock
        assert out.aux_loss is not None and ref.aux_loss is not None
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_num_items_in_batch_over_two_micro_batches(kind):
    stock, fused = pair(kind)
    patch(fused)
    micro = [batch(seed=s) for s in (1, 2)]
    n = sum((lab[:, 1:] != -100).sum() for _, lab in micro)
    for model in (stock, fused):
        for ids, labels in micro:
            model(input_ids=ids, labels=labels, num_items_in_batch=n).loss.backward()
    assert_same_grads(stock, fused)


def test_shift_labels_and_return_dict_false():
    stock, fused = pair("qwen2")
    patch(fused)
    ids, labels = batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    ref = stock(input_ids=ids, labels=labels, shift_labels=shift, return_dict=False)
    out = fused(input_ids=ids, labels=labels, shift_labels=shift, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    out[0].backward()
    ref[0].backward()
    assert_same_grads(stock, fused)


def test_no_vocabulary_sized_tensor_in_training(monkeypatch):
    """The fused path never calls the output layer on the tokens (it sees an empty input)."""
    model = patch(build("llama"))
    seen = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None and all(s.numel() == 0 for s in seen)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "mixtral"])
def test_eval_no_labels_logits_to_keep_and_skip_logits_run_stock(kind):
    stock, fused = pair(kind)
    patch(fused)
    ids, labels = batch()
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits)
    assert fused(input_ids=ids, logits_to_keep=3).logits.shape[1] == 3
    with pytest.raises(ValueError, match="batch_size"):  # stock's own error: labels with logits_to_keep run stock
        fused(input_ids=ids, labels=labels, logits_to_keep=3)
    out = fused(input_ids=ids, labels=labels, skip_logits=False)
    torch.testing.assert_close(out.logits, stock(input_ids=ids, labels=labels).logits)
    stock.eval()
    fused.eval()
    ref, got = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, ref.logits)
    torch.testing.assert_close(got.loss, ref.loss)
    # skip_logits=True forces the fused loss in eval mode too
    forced = fused(input_ids=ids, labels=labels, skip_logits=True)
    assert forced.logits is None
    torch.testing.assert_close(forced.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_train_only_false_fuses_in_eval():
    stock, fused = pair("llama")
    patch(fused, train_only=False)
    stock.eval()
    fused.eval()
    ids, labels = batch()
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, stock(input_ids=ids, labels=labels).loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_greedy_generate_identical(kind):
    stock, fused = pair(kind)
    patch(fused)
    ids, _ = batch(b=1, s=5)
    for m in (stock, fused):
        m.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_signature_kept_for_trainer():
    model = patch(build("llama"))
    params = inspect.signature(model.forward).parameters
    assert "labels" in params and "logits_to_keep" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert model.forward.__name__ == "forward"


def test_deepcopy_is_an_independent_patched_model():
    model = patch(build("llama"))
    twin = copy.deepcopy(model)
    assert is_patched(twin) and twin.forward.__self__ is twin
    ids, labels = batch()
    twin(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)


def test_unpatch_restores_stock_forward():
    model = patch(build("llama"))
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.__dict__
    ids, labels = batch()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_patch_twice_replaces_options_and_keeps_prior_instance_forward():
    model = build("llama")
    calls = []
    stock = model.forward

    def traced(*args, **kwargs):
        calls.append(1)
        return stock(*args, **kwargs)

    model.forward = traced
    patch(model, z_loss=1e-3)
    patch(model, label_smoothing=0.1)
    ids, labels = batch()
    model(input_ids=ids, labels=labels)
    assert calls  # the prior forward still runs (with no logits)
    unpatch(model)
    assert model.forward is traced


def test_ce_options_label_smoothing_and_z_loss():
    stock, fused = pair("llama")
    patch(fused, label_smoothing=0.1, z_loss=1e-2)
    ids, labels = batch()
    logits = stock(input_ids=ids).logits.float()[:, :-1].reshape(-1, logits_v := stock.config.vocab_size)
    target = labels[:, 1:].reshape(-1)
    valid = target != -100
    ce = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    lse = torch.logsumexp(logits, -1)
    ref = (ce + 1e-2 * lse**2)[valid].mean()
    assert logits_v == stock.config.vocab_size
    torch.testing.assert_close(fused(input_ids=ids, labels=labels).loss, ref, atol=1e-5, rtol=1e-5)


def test_bad_options_and_models_raise():
    with pytest.raises(ValueError, match="unknown option"):
        patch(build("llama"), reduction="sum")
    with pytest.raises(ValueError, match="label_smoothing"):
        patch(build("llama"), label_smoothing=2.0)
    with pytest.raises(ValueError, match="softcap is set by Gemma2ForCausalLM"):
        patch(build("gemma2"), softcap=3.0)
    with pytest.raises(TypeError, match="train_only"):
        patch(build("llama"), train_only="yes")


def test_unknown_logit_post_processing_raises():
    from transformers import LlamaForCausalLM

    class ShiftedLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits + self.logit_offset
            loss = None
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return loss, logits

    model = ShiftedLlama(build("llama").config)
    with pytest.raises(ValueError, match=r"ShiftedLlama.*unrecognised step \(attributes: logit_offset\)"):
        patch(model)


def test_a_forward_without_labels_is_refused():
    from transformers import LlamaForCausalLM

    class Drafter(LlamaForCausalLM):  # a speculative-decoding drafter: no labels, so no loss to replace
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            return self.lm_head(self.model(input_ids=input_ids, inputs_embeds=inputs_embeds).last_hidden_state)

    model = Drafter(build("llama").config)
    with pytest.raises(ValueError, match=r"^model: Drafter\.forward takes no labels"):
        patch(model)
    assert not is_patched(model)


def test_eval_only_logit_steps_fuse_in_training_only():
    import hf_survey

    model = hf_survey.build("xlstm")  # its forward softcaps chunk by chunk under `not self.training`
    ids, labels = hf_survey.batch()
    with pytest.raises(ValueError, match=r"xLSTMForCausalLM\.forward post-processes its logits differently in eval"):
        patch(model, train_only=False)
    patch(model)
    model.eval()
    with pytest.raises(ValueError, match="in training mode only"):
        model(input_ids=ids, labels=labels, skip_logits=True)
    assert model(input_ids=ids, labels=labels).logits is not None  # eval runs stock


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_close_to_stock(autocast):
    """bf16 weights, or fp32 weights under CPU autocast to bf16: the head computes in bf16 as stock's does."""
    stock, fused = pair("llama")
    if not autocast:
        stock, fused = stock.to(torch.bfloat16), fused.to(torch.bfloat16)
    patch(fused)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
        out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss.float(), atol=3e-2, rtol=1e-2)
    grads = [p.grad for p in fused.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "kw, name",
    [(dict(chunk_size=0), "chunk_size"), (dict(algorithm="fast"), "algorithm"), (dict(validate="yes"), "validate")],
)
def test_patch_checks_loss_options_at_patch_time(kw, name):
    model = build("llama")
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: expected"):
        patch(model, **kw)


@pytest.mark.parametrize("bad", ["x", None])
def test_patch_names_a_model_that_is_not_a_module(bad):
    with pytest.raises(TypeError, match="^model: expected"):
        patch(bad)
