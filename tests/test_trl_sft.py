"""FusedSFTTrainer: the same training as TRL's own SFT loss path, with the fused loss actually running."""

import copy

import pytest
import torch

pytest.importorskip("trl")

from hf_tiny import (  # noqa: E402
    assert_same_params,
    build,
    loss_logs,
    same_steps_args,
    token_dataset,
    tokenizer,
    train_with_lora,
)


def _args(out_dir, **kw):
    from trl import SFTConfig

    return same_steps_args(SFTConfig, out_dir, **{"max_length": 32, **kw})


def _train(cls, model, tmp_path, **kw):
    trainer = cls(model=model, args=_args(tmp_path, **kw), train_dataset=token_dataset(), processing_class=tokenizer())
    trainer.train()
    return trainer, loss_logs(trainer)


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
    assert_same_params(stock, fused)
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
    pytest.importorskip("peft")
    from trl import SFTTrainer

    from tune_losses.integrations.trl import FusedSFTTrainer

    stock, fused = train_with_lora((SFTTrainer, FusedSFTTrainer), lambda name: _args(tmp_path / name), token_dataset)
    assert any("lora_B" in n for n, _ in fused.model.named_parameters())
    assert_same_params(stock.model, fused.model)


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
