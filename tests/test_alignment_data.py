"""The offline preference pairs of ``python -m tune_losses.tiny`` and torchtune's preference data path."""

from __future__ import annotations

import json

import torch

from tune_losses import tiny


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_pairs_share_the_prompt_and_come_from_their_own_split(tiny_assets):
    train = _rows(tiny_assets / "data/dpo_train.jsonl")
    heldout = _rows(tiny_assets / "data/dpo_heldout.jsonl")
    docs = tiny.read_jsonl_texts(tiny_assets / "data/train.jsonl")
    held_docs = tiny.read_jsonl_texts(tiny_assets / "data/heldout.jsonl")
    assert len(train) == len(docs) and len(heldout) == 3 * len(held_docs)
    for row in train + heldout:
        (cu, ca), (ru, ra) = row["chosen"], row["rejected"]
        assert cu == ru and cu["role"] == "user" and ca["role"] == ra["role"] == "assistant"
        assert ca["content"] != ra["content"] and ca["content"] and ra["content"]
    # the chosen answer continues its own document; held-out documents never appear in train pairs
    held_answers = {r["chosen"][1]["content"] for r in heldout}
    assert any(
        r["chosen"][0]["content"][-20:] in d and r["chosen"][1]["content"][:20] in d for r in train[:5] for d in docs
    )
    assert not held_answers & {r["rejected"][1]["content"] for r in train}
    assert not held_answers & {r["chosen"][1]["content"] for r in train}
    lengths = [len(r["chosen"][1]["content"]) - len(r["rejected"][1]["content"]) for r in train]
    assert abs(sum(lengths) / len(lengths)) < 10  # no length cue on average


def test_torchtune_preference_dataset_and_dpo_collate(tiny_assets):
    from torchtune.data import padded_collate_dpo
    from torchtune.datasets import preference_dataset

    tok = tiny.tiny_tokenizer(str(tiny_assets / "tokenizer.model"), max_seq_len=128)
    ds = preference_dataset(tok, source="json", data_files=str(tiny_assets / "data/dpo_heldout.jsonl"), split="train")
    batch = [ds[i] for i in range(3)]
    tokens, labels = padded_collate_dpo(batch)
    assert tokens.shape == labels.shape and tokens.shape[0] == 6
    # prompt tokens are masked, answers are not; chosen and rejected share the prompt
    n_prompt = sum(1 for x in batch[0]["chosen_labels"] if x == -100)
    assert n_prompt > 5 and batch[0]["chosen_input_ids"][:n_prompt] == batch[0]["rejected_input_ids"][:n_prompt]
    assert (labels[:, 0] == -100).all() and (labels != -100).sum(1).min() > 0
    assert torch.equal(labels[0][labels[0] != -100], torch.tensor([x for x in batch[0]["chosen_labels"] if x != -100]))
