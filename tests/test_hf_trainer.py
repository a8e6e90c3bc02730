"""A patched model under transformers' Trainer: 3 SGD steps (gradient accumulation, so num_items_in_batch)
land on the same parameters as the stock model's."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import assert_same_params, build, same_steps_args, token_dataset  # noqa: E402

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

    args = same_steps_args(TrainingArguments, out_dir, remove_unused_columns=False)
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
    assert_same_params(stock, fused)
