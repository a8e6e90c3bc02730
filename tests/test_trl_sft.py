"""FusedSFTTrainer: the same training as TRL's own SFT loss path, with the fused loss actually running."""

import copy

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import build, token_dataset, tokenizer  # noqa: E402


def _args(tmp_path, **kw):
    from trl import SFTConfig

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
    )
    base.update(kw)
    return SFTConfig(**base)


def _train(cls, model, tmp_path, **kw):
    trainer = cls(model=model, args=_args(tmp_path, **kw), train_dataset=token_dataset(), processing_class=tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


@pytest.mark.parametrize("kind", ["llama", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_three_steps_equal_trl_sft(kind, tmp_path, monkeypatch):
    from trl import SFTTrainer

    from tune_losses.integrations import transformers as shared
    from tune_losses.integrations import trl as ours

    calls = []
    real = shared.linear_cross_entropy  # the fused LM loss patch() and the trainer share
    monkeypatch.setattr(shared, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    stock = build(kind)
    fused = copy.deepcopy(stock)
    _, ref_logs = _train(SFTTrainer, stock, tmp_path / "stock")
    trainer, logs = _train(ours.FusedSFTTrainer, fused, tmp_path / "fused")
    assert calls, "the fused loss never ran"
    assert "forward" not in fused.__dict__  # TRL's own fused head was removed again
    assert trainer.state.global_step == 3
    data = token_dataset(n=4, seed=9)
    ref_eval = SFTTrainer(
        model=stock,
        args=_args(tmp_path / "e1"),
        train_dataset=token_dataset(),
        eval_dataset=data,
        processing_class=tokenizer(),
    ).evaluate()
    got_eval = trainer.evaluate(eval_dataset=data)
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert got_eval[key] == pytest.approx(ref_eval[key], rel=1e-4, abs=1e-5), key
    for (n, p), q in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    for a, b in zip(ref_logs, logs):
        for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    if kind == "mixtral":
        assert logs[0]["aux_loss"] == pytest.approx(ref_logs[0]["aux_loss"], rel=1e-4)


@pytest.mark.slow
def test_label_smoothing_fused_equal_trl(tmp_path):
    from trl import SFTTrainer

    from tune_losses.integrations.trl import FusedSFTTrainer

    stock = build("qwen2")
    fused = copy.deepcopy(stock)
    _train(SFTTrainer, stock, tmp_path / "stock", label_smoothing_factor=0.1)
    _train(FusedSFTTrainer, fused, tmp_path / "fused", label_smoothing_factor=0.1)
    for p, q in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_bad_ce_options_raise(tmp_path):
    from tune_losses.integrations.trl import FusedSFTTrainer

    with pytest.raises(ValueError, match="unknown option"):
        FusedSFTTrainer(
            model=build("llama"),
            args=_args(tmp_path),
            train_dataset=token_dataset(),
            processing_class=tokenizer(),
            ce_options={"softcap": 3.0},
        )


@pytest.mark.slow
def test_peft_lora_three_steps_equal_trl_sft(tmp_path):
    peft = pytest.importorskip("peft")
    from trl import SFTTrainer

    from tune_losses.integrations.trl import FusedSFTTrainer

    config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainers = []
    for cls in (SFTTrainer, FusedSFTTrainer):
        trainer = cls(
            model=build("llama"),
            args=_args(tmp_path / cls.__name__),
            train_dataset=token_dataset(),
            processing_class=tokenizer(),
            peft_config=peft.LoraConfig(**config),
        )
        trainer.train()
        trainers.append(trainer)
    stock, fused = (dict(t.model.named_parameters()) for t in trainers)
    assert any("lora_B" in n for n in fused)
    for n, p in stock.items():
        torch.testing.assert_close(fused[n], p, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_dft_loss_three_steps_equal_trl_sft(tmp_path):
    from trl import SFTTrainer

    from tune_losses.integrations.trl import FusedSFTTrainer

    stock = build("llama")
    fused = copy.deepcopy(stock)
    _train(SFTTrainer, stock, tmp_path / "stock", loss_type="dft")
    _train(FusedSFTTrainer, fused, tmp_path / "fused", loss_type="dft")
    for p, q in zip(stock.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)
