"""Tests for the embedded offline tiny assets (``tune_losses.tiny``).

The assets are built once per session (about 5 s on 2 cores) with network sockets blocked, and
every test reads that one build.
"""

import json
import os
import shutil
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from tune_losses import tiny
from tune_losses.tiny import TINY_VOCAB_SIZE


def _no_network(*args, **kwargs):
    raise AssertionError("tune_losses.tiny must not touch the network")


@pytest.fixture
def offline(monkeypatch):
    """Make any attempt to open a network connection fail the test."""
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Build the assets once, offline; return ``(out_dir, manifest)``."""
    out = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        manifest = tiny.build(out, verbose=False)
    return out, manifest


def _heldout(out):
    return tiny.read_jsonl_texts(out / "data/heldout.jsonl")


def test_build_writes_the_layout(assets):
    out, manifest = assets
    for rel in [
        "manifest.json",
        "data/train.jsonl",
        "data/heldout.jsonl",
        "tokenizer.model",
        "teacher/model.pt",
        "student/model.pt",
    ]:
        assert (out / rel).is_file(), rel
    assert all(step["built"] for step in manifest["steps"].values())
    assert json.loads((out / "manifest.json").read_text())["vocab_size"] == TINY_VOCAB_SIZE

    train = tiny.read_jsonl_texts(out / "data/train.jsonl")
    heldout = _heldout(out)
    assert len(train) > 500 and 0.04 <= len(heldout) / (len(train) + len(heldout)) <= 0.10
    assert not set(train) & set(heldout)
    lengths = sorted(len(t) for t in train)
    assert 200 <= lengths[len(lengths) // 2] <= 600  # typical document is 200-600 chars


def test_second_build_skips_everything(assets, offline, capsys):
    out, manifest = assets
    mtimes = {rel: (out / rel).stat().st_mtime_ns for step in manifest["steps"].values() for rel in step["files"]}
    assert tiny.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == 5 and "0 of 5 steps built" in printed
    for rel, mtime in mtimes.items():
        assert (out / rel).stat().st_mtime_ns == mtime, rel


def test_damaged_file_rebuilds_only_its_step_identically(assets, tmp_path):
    out, _ = assets
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    original = (copy / "student/model.pt").read_bytes()
    (copy / "student/model.pt").write_bytes(b"truncated")
    manifest = tiny.build(copy, verbose=False)
    assert {name for name, step in manifest["steps"].items() if step["built"]} == {"student"}
    assert (copy / "student/model.pt").read_bytes() == original  # seeded: same bytes again


def test_tokenizer_round_trips_through_llama2_tokenizer(assets):
    from torchtune.models.llama2 import llama2_tokenizer

    out, _ = assets
    tok = llama2_tokenizer(str(out / "tokenizer.model"))
    assert tok.vocab_size == TINY_VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    for text in _heldout(out)[:10] + ["Hello, world!\n    x = [1, 2]  # ünïcode ✓"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert max(ids) < TINY_VOCAB_SIZE
        assert tok.decode(ids) == text  # lossless: identity normalisation + byte fallback


@pytest.mark.parametrize("name, builder", [("teacher", tiny.tiny_teacher), ("student", tiny.tiny_student)])
def test_checkpointer_loads_into_builder_strictly(assets, tmp_path, name, builder):
    from torchtune.training import FullModelTorchTuneCheckpointer

    out, manifest = assets
    ckpt = FullModelTorchTuneCheckpointer(
        checkpoint_dir=str(out / name),
        checkpoint_files=["model.pt"],
        model_type="LLAMA2",
        output_dir=str(tmp_path / "out"),
    ).load_checkpoint()
    model = builder()
    model.load_state_dict(ckpt["model"], strict=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["steps"][name]["info"]["num_params"]
    assert model.tok_embeddings.num_embeddings == TINY_VOCAB_SIZE


def test_lora_student_loads_student_base_weights(assets):
    out, _ = assets
    state_dict = torch.load(out / "student/model.pt", weights_only=True)
    model = tiny.lora_tiny_student(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert missing and all("lora_" in k for k in missing)


def test_student_forward_on_heldout_text(assets):
    out, _ = assets
    tok = tiny.tiny_tokenizer(str(out / "tokenizer.model"), max_seq_len=tiny.TINY_MAX_SEQ_LEN)
    model = tiny.tiny_student()
    model.load_state_dict(torch.load(out / "student/model.pt", weights_only=True))
    ids = tok.encode(_heldout(out)[0])[: tiny.TINY_MAX_SEQ_LEN]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_components_instantiate_from_config(assets):
    from omegaconf import OmegaConf
    from torchtune import config

    out, _ = assets
    cfg = OmegaConf.create(
        {
            "model": {"_component_": "tune_losses.tiny.tiny_student"},
            "lora": {
                "_component_": "tune_losses.tiny.lora_tiny_student",
                "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
            },
            "teacher": {"_component_": "tune_losses.tiny.tiny_teacher"},
            "tokenizer": {
                "_component_": "tune_losses.tiny.tiny_tokenizer",
                "path": str(out / "tokenizer.model"),
                "max_seq_len": 512,
            },
        }
    )
    teacher = config.instantiate(cfg.teacher)
    student = config.instantiate(cfg.model)
    config.instantiate(cfg.lora)
    assert config.instantiate(cfg.tokenizer).max_seq_len == 512
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(teacher) > 2 * n(student)


def test_text_completion_dataset_loads_offline_and_collates(assets, offline, tmp_path):
    from torchtune.data import padded_collate_sft
    from torchtune.datasets import text_completion_dataset

    out, manifest = assets
    max_seq_len = 64
    tok = tiny.tiny_tokenizer(str(out / "tokenizer.model"), max_seq_len=max_seq_len)
    ds = text_completion_dataset(
        tok,
        source="json",
        data_files=str(out / "data/train.jsonl"),
        column="text",
        split="train",
        packed=False,
        add_eos=True,
        cache_dir=str(tmp_path / "hf_cache"),  # keep the Arrow cache out of ~/.cache
    )
    assert len(ds) == manifest["steps"]["data"]["info"]["train_docs"]
    samples = [ds[i] for i in range(4)]
    for s in samples:
        assert s["tokens"] == s["labels"] and s["tokens"][0] == tok.bos_id
        assert len(s["tokens"]) <= max_seq_len
    batch = padded_collate_sft(samples, padding_idx=tok.pad_id, ignore_idx=-100)
    longest = max(len(s["tokens"]) for s in samples)
    assert batch["tokens"].shape == batch["labels"].shape == (4, longest)
    assert batch["tokens"].dtype == torch.long
