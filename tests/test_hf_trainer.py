"""A patched model under transformers' Trainer: 3 SGD steps (gradient accumulation, so num_items_in_batch)
land on the same parameters as the stock model's."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import build, token_dataset  # noqa: E402

from tune_losses.integrations.transformers import patch  # noqa: E402


def _collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(model, out_dir):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        logging_steps=1,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), data_collator=_collate)
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["llama_tied", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_trainer_three_sgd_steps_equal_stock(kind, tmp_path):
    stock = build(kind)
    fused = patch(copy.deepcopy(stock))
    _train(stock, tmp_path / "stock")
    trainer = _train(fused, tmp_path / "fused")
    assert trainer.model_accepts_loss_kwargs  # the kept signature lets Trainer pass num_items_in_batch
    for (n, p), q in zip(stock.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
