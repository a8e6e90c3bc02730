"""FusedDistillationTrainer: TRL's DistillationTrainer with the divergence from tune_losses.linear_kd_loss.
Same loss and student gradients as TRL's own chunked JSD (beta 0 / 0.5 / 1, temperature 2, TRL's no-T^2
convention); distillation_loss() for two plain models against full logits."""

import copy

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import V, assert_same_grads, batch, build, distillation_args, loss_logs, tokenizer  # noqa: E402


def _trainers(tmp_path, student, teacher):
    from datasets import Dataset
    from trl import DistillationTrainer

    from tune_losses.integrations.trl import FusedDistillationTrainer

    tok = tokenizer()
    tok.padding_side = "left"
    data = Dataset.from_dict({"prompt": ["t5 t6 t7", "t9 t10"] * 2})
    out = []
    for cls, model in ((DistillationTrainer, student), (FusedDistillationTrainer, copy.deepcopy(student))):
        args = distillation_args(tmp_path / cls.__name__)
        out.append(cls(model=model, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok))
    return out


def _inputs():
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, V, (2, 4), generator=g)
    completion = torch.randint(3, V, (2, 7), generator=g)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    completion_mask = torch.ones_like(completion)
    completion_mask[0, -3:] = 0
    return {
        "prompt_ids": prompt,
        "prompt_mask": prompt_mask,
        "completion_ids": completion,
        "completion_mask": completion_mask,
    }


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trl(beta, tmp_path):
    stock, fused = _trainers(tmp_path, build("llama"), build("llama", seed=7).eval())
    inputs = _inputs()
    results = []
    for trainer in (stock, fused):
        trainer.beta, trainer.temperature = beta, 2.0
        trainer.model.train()
        loss, entropy, count = trainer._compute_loss(trainer.model, inputs, None)
        loss.backward()
        results.append((loss, entropy, count))
    (ref, ref_entropy, ref_count), (got, entropy, count) = results
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert int(count) == int(ref_count) == 11
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-4, rtol=1e-5)
    assert_same_grads(stock.model, fused.model)


def test_trains_with_the_fused_loss(tmp_path, monkeypatch):
    from tune_losses.integrations import trl as ours

    calls = []
    real = ours.linear_kd_loss
    monkeypatch.setattr(ours, "linear_kd_loss", lambda *a, **k: calls.append(k["options"].divergence) or real(*a, **k))
    _, fused = _trainers(tmp_path, build("llama"), build("llama", seed=7))
    fused.train()
    losses = [h["loss"] for h in loss_logs(fused)]
    assert calls == ["jsd"] * 2 and len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_distillation_loss_matches_full_logits():
    from tune_losses.integrations.transformers import distillation_loss

    student, teacher = build("qwen2"), build("llama", seed=9)
    ids, labels = batch()
    out = distillation_loss(student, teacher, ids, labels, kd_ratio=0.25, temperature=2.0)
    z_s = student(input_ids=ids).logits[:, :-1].reshape(-1, V)
    with torch.no_grad():
        z_t = teacher(input_ids=ids).logits[:, :-1].reshape(-1, V)
    y = labels[:, 1:].reshape(-1)
    valid = y != -100
    ce = torch.nn.functional.cross_entropy(z_s[valid], y[valid])
    log_q, log_p = torch.log_softmax(z_s[valid] / 2, -1), torch.log_softmax(z_t[valid] / 2, -1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4.0
    ref = 0.75 * ce + 0.25 * kd
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert out.loss.requires_grad and all(p.grad is None for p in teacher.parameters())
    g_fused = torch.autograd.grad(out.loss, list(student.parameters()))
    g_ref = torch.autograd.grad(ref, list(student.parameters()))
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_distillation_loss_takes_the_options_objects_too():
    """``distillation_loss``'s flat loss options are made into the objects the fused loss takes; the
    objects themselves are accepted as they are; an ``ignore_index`` said twice must agree."""
    from tune_losses import DistillationOptions, ExecutionOptions, KDOptions
    from tune_losses.integrations.transformers import distillation_loss

    student, teacher = build("qwen2"), build("llama", seed=9)
    ids, labels = batch()
    flat = distillation_loss(student, teacher, ids, labels, kd_ratio=0.25, temperature=2.0, algorithm="recompute")
    options = DistillationOptions(0.25, KDOptions(temperature=2.0))
    objects = distillation_loss(student, teacher, ids, labels, options=options, execution=ExecutionOptions("recompute"))
    torch.testing.assert_close(objects.loss, flat.loss, rtol=0, atol=0)
    with pytest.raises(TypeError, match="kd_ratio= and options= both given"):
        distillation_loss(student, teacher, ids, labels, options=options, kd_ratio=0.5)
    with pytest.raises(ValueError, match="ignore_index"):
        distillation_loss(student, teacher, ids, labels, ignore_index=0, options=options)


@pytest.mark.parametrize("model_type", ["opt", "bert", "cohere"])
def test_trainer_head_is_the_shared_head_spec(model_type):
    """The distillation trainer reads each model's head through the spec ``patch`` uses: a nested backbone
    (OPT's self.model.decoder), a transform before the output layer (BERT), a logit scale (Cohere) give
    the stock logits of the completion positions."""
    import hf_survey

    from tune_losses.integrations.trl import _completion_head

    model = hf_survey.build(model_type).eval()
    ids, _ = hf_survey.batch()
    mask = torch.ones_like(ids)
    keep = 4
    hidden, weight, bias = _completion_head(model, ids, mask, keep, {})
    logits = hidden @ weight.T + (0 if bias is None else bias)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, :-1][:, -keep:]
    torch.testing.assert_close(logits.detach(), ref, atol=1e-5, rtol=1e-5)
