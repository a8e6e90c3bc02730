"""FusedDistillationTrainer with a cached teacher: dataset rows carry the teacher's top-k ids and
log-probabilities over fixed completions, no teacher model is loaded, and the loss is the sparse
forward KL. Checked against the student's full logits (fp64 math) for value and gradients."""

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import V, build, distillation_args, loss_logs, tokenizer  # noqa: E402

K, T = 5, 2.0


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    """The per-chunk math eager: compiling it for these tiny shapes would take most of the test's time."""
    monkeypatch.setenv("TUNE_LOSSES_COMPILE", "0")


def _rows(teacher, n=4, seed=3):
    """Cached rows: prompt and completion ids, the teacher's top-K over each completion token at T."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, V, (3 + i % 2,), generator=g)
        completion = torch.randint(3, V, (4 + 2 * (i % 2),), generator=g)
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        lp, top = torch.log_softmax(logits / T, -1).topk(K, -1)
        rows.append(
            {
                "prompt": "t5",  # TRL's dataset checks read a prompt column; cached rows never use it
                "prompt_ids": prompt.tolist(),
                "completion_ids": completion.tolist(),
                "teacher_ids": top.tolist(),
                "teacher_logprobs": lp.tolist(),
            }
        )
    return rows


def _trainer(tmp_path, student, rows, **kw):
    from datasets import Dataset

    from tune_losses.integrations.trl import FusedDistillationTrainer

    tok = tokenizer()
    tok.padding_side = "left"
    args = distillation_args(tmp_path / "cached", temperature=T)
    data = Dataset.from_list(rows)
    return FusedDistillationTrainer(model=student, teacher_model=None, args=args, train_dataset=data,
                                    processing_class=tok, chunk_size=4, **kw)  # fmt: skip


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_cached_loss_and_gradients_match_full_logits(tmp_path, tail):
    rows = _rows(build("llama", seed=7).eval())
    trainer = _trainer(tmp_path, build("llama"), rows, tail=tail)
    batch = trainer._generate_and_score_completions(rows[:3])
    assert batch["teacher_ids"].shape == (3, 6, K) and int(batch["num_items_in_batch"]) == 14
    model = trainer.model
    model.train()
    loss, _, count = trainer._compute_loss(model, batch, None)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    c = batch["completion_ids"].shape[1]
    z = model(input_ids=input_ids, attention_mask=mask).logits[:, -c - 1 : -1].double() / T
    log_q = torch.log_softmax(z, -1).gather(-1, batch["teacher_ids"].clamp(min=0))
    used = batch["teacher_ids"] >= 0
    lp = batch["teacher_logprobs"].double()
    if tail == "renormalize":
        # padding rows (no entry) get 0s, not a softmax of only -inf (NaN through where's backward)
        log_p = torch.log_softmax(lp.masked_fill(~used, float("-inf")).masked_fill(~used.any(-1, True), 0.0), -1)
        kd = torch.where(used, log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    else:
        p = torch.where(used, lp.exp(), 0.0)
        p_tail, q_tail = 1 - p.sum(-1), 1 - torch.where(used, log_q.exp(), 0.0).sum(-1)
        kd = torch.where(used, p * (lp - log_q), 0.0).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    valid = batch["completion_mask"] != 0
    ref = torch.where(valid, kd, 0.0).sum() / valid.sum()  # TRL's convention: no T^2
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert int(count) == 14
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_trains_from_the_cache_without_a_teacher(tmp_path, monkeypatch):
    from tune_losses.integrations import trl_cached

    calls = []
    real = trl_cached.linear_sparse_kd_loss
    monkeypatch.setattr(
        trl_cached, "linear_sparse_kd_loss", lambda *a, **k: calls.append(k["options"].tail) or real(*a, **k)
    )
    trainer = _trainer(tmp_path, build("llama"), _rows(build("llama", seed=7).eval()))
    assert trainer.teacher_model is None
    trainer.train()
    losses = [h["loss"] for h in loss_logs(trainer)]
    assert calls == ["renormalize"] * 2 and len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_cached_rows_with_wrong_shapes_are_refused(tmp_path):
    rows = _rows(build("llama", seed=7).eval(), n=2)
    trainer = _trainer(tmp_path, build("llama"), rows)
    rows[1]["teacher_ids"] = rows[1]["teacher_ids"][:-1]
    with pytest.raises(ValueError, match="teacher_ids"):
        trainer._generate_and_score_completions(rows)
    with pytest.raises(ValueError, match="tail"):
        _trainer(tmp_path, build("llama"), rows, tail="rest")
