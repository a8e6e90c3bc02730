"""FusedDPOTrainer: the same training as TRL 1.16's own DPOTrainer (loss, metrics, parameters after 3
steps), with the fused preference loss actually running."""

import copy

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import build, tokenizer  # noqa: E402


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


def _args(tmp_path, **kw):
    from trl import DPOConfig

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        max_length=32,
        disable_tqdm=True,
        beta=0.5,
    )
    base.update(kw)
    return DPOConfig(**base)


def _train(cls, model, ref, tmp_path, **kw):
    trainer = cls(
        model=model, ref_model=ref, args=_args(tmp_path, **kw), train_dataset=_dataset(), processing_class=tokenizer()
    )
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


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
    for (n, p), q in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


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
    peft = pytest.importorskip("peft")
    from trl import DPOTrainer

    from tune_losses.integrations.trl_dpo import FusedDPOTrainer

    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    runs = []
    for cls in (DPOTrainer, FusedDPOTrainer):
        trainer = cls(
            model=build("llama"),
            args=_args(tmp_path / cls.__name__, loss_type="bco_pair"),
            train_dataset=_dataset(),
            processing_class=tokenizer(),
            peft_config=peft.LoraConfig(**config),
        )
        trainer.train()
        runs.append((trainer, [h for h in trainer.state.log_history if "loss" in h]))
    (stock, ref_logs), (fused, logs) = runs
    for a, b in zip(ref_logs, logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    theirs = dict(stock.model.named_parameters())
    assert any("lora_B" in n for n in theirs)
    for n, p in fused.model.named_parameters():
        torch.testing.assert_close(p, theirs[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
