"""FusedDPOTrainer: the same training as TRL 1.16's own DPOTrainer (loss, metrics, parameters after 3
steps), with the fused preference loss actually running."""

import copy

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import assert_same_params, build, loss_logs, same_steps_args, tokenizer, train_with_lora  # noqa: E402


def _dataset(n=8, seed=3):
    """Text pairs over the tiny word-level vocabulary; completions end with the EOS token t2."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(f"t{int(i)}" for i in torch.randint(4, 131, (length,), generator=g))

    rows = [
        {"prompt": words(2, 5), "chosen": " " + words(1, 6) + " t2", "rejected": " " + words(1, 6) + " t2"}
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def _args(out_dir, **kw):
    from trl import DPOConfig

    return same_steps_args(DPOConfig, out_dir, **{"max_length": 32, "beta": 0.5, **kw})


def _train(cls, model, ref, tmp_path, **kw):
    trainer = cls(
        model=model, ref_model=ref, args=_args(tmp_path, **kw), train_dataset=_dataset(), processing_class=tokenizer()
    )
    trainer.train()
    return trainer, loss_logs(trainer)


KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("sigmoid", {}),
        pytest.param("robust", {"label_smoothing": 0.2}, marks=pytest.mark.slow),
        pytest.param("apo_zero", {}, marks=pytest.mark.slow),
        pytest.param("ipo", {}, marks=pytest.mark.slow),
    ],
)
def test_three_steps_equal_trl_dpo(loss_type, extra, tmp_path, monkeypatch):
    from trl import DPOTrainer

    from tune_losses.integrations import trl_dpo

    calls = []
    real = trl_dpo.linear_preference_loss
    monkeypatch.setattr(trl_dpo, "linear_preference_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    stock = build("llama")
    fused, ref = copy.deepcopy(stock), copy.deepcopy(stock)
    _, ref_logs = _train(DPOTrainer, stock, copy.deepcopy(ref), tmp_path / "stock", loss_type=loss_type, **extra)
    trainer, logs = _train(trl_dpo.FusedDPOTrainer, fused, ref, tmp_path / "fused", loss_type=loss_type, **extra)
    assert calls and calls[0]["options"].loss_type == loss_type
    assert trainer.state.global_step == 3 and len(logs) == len(ref_logs) == 3
    for a, b in zip(ref_logs, logs):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert_same_params(stock, fused, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_precomputed_reference_equal_trl_dpo(tmp_path):
    from trl import DPOTrainer

    from tune_losses.integrations.trl_dpo import FusedDPOTrainer

    stock = build("qwen2")
    fused = copy.deepcopy(stock)
    kw = dict(loss_type="nca_pair", precompute_ref_log_probs=True, max_steps=2)
    _, ref_logs = _train(DPOTrainer, stock, copy.deepcopy(stock), tmp_path / "stock", **kw)
    _, logs = _train(FusedDPOTrainer, fused, copy.deepcopy(fused), tmp_path / "fused", **kw)
    for a, b in zip(ref_logs, logs):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    for p, q in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)


def test_unsupported_options_raise(tmp_path):
    from tune_losses.integrations.trl_dpo import FusedDPOTrainer

    model = build("llama")
    for kw, match in (
        (dict(loss_type=["sigmoid", "bco_pair"]), "one loss type"),
        (dict(loss_type="sft"), "loss_type"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    ):
        with pytest.raises(ValueError, match=match):
            FusedDPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model),
                args=_args(tmp_path, **kw),
                train_dataset=_dataset(),
                processing_class=tokenizer(),
            )
    with pytest.raises(ValueError, match="softcap"):
        FusedDPOTrainer(
            model=build("gemma2"),
            ref_model=build("gemma2"),
            args=_args(tmp_path),
            train_dataset=_dataset(),
            processing_class=tokenizer(),
        )


@pytest.mark.slow
def test_peft_lora_reference_is_the_base_model(tmp_path):
    """No reference model with a LoRA adapter: the reference is the policy with its adapter disabled."""
    pytest.importorskip("peft")
    from trl import DPOTrainer

    from tune_losses.integrations.trl_dpo import FusedDPOTrainer

    stock, fused = train_with_lora(
        (DPOTrainer, FusedDPOTrainer), lambda name: _args(tmp_path / name, loss_type="bco_pair"), _dataset
    )
    ref_logs, logs = loss_logs(stock), loss_logs(fused)
    for a, b in zip(ref_logs, logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert any("lora_B" in n for n, _ in stock.model.named_parameters())
    assert_same_params(stock.model, fused.model, atol=1e-5, rtol=1e-4)
