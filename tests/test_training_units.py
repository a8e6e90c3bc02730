"""tune_losses.training, piece by piece, without launching a recipe: settings checked at setup,
unknown config keys, the dataset checked before the first step, the loss protocol and its adapter,
atomic checkpoint files, non-finite gradients named, the progress display, collective timeouts."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from omegaconf import OmegaConf
from torch import nn

from tune_losses import CEWithChunkedOutputLoss, LinearCrossEntropyLoss, LossSum
from tune_losses.training import checkpointing, data
from tune_losses.training.gradients import grad_norm, nonfinite_grads
from tune_losses.training.progress import Progress
from tune_losses.training.protocol import ModelOutputLoss, SumAndCountLoss, TeacherOutputLoss, TrainingLoss
from tune_losses.training.settings import LoopSettings, known_keys, warn_unknown_keys

BASE = {"output_dir": "out", "epochs": 1, "batch_size": 2}


# --------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "key, value",
    [
        ("gradient_accumulation_steps", 0),
        ("gradient_accumulation_steps", -1),
        ("gradient_accumulation_steps", 1.5),
        ("max_steps_per_epoch", 0),
        ("batch_size", 0),
        ("epochs", 0),
        ("log_every_n_steps", 0),
        ("save_every_n_steps", 0),
        ("stop_after_steps", -2),
        ("max_nonfinite_steps", 0),
        ("tensor_parallel_dim", 0),
        ("clip_grad_norm", 0.0),
        ("clip_grad_norm", float("nan")),
        ("process_group_timeout_s", 0),
        ("shuffle", "yes"),
        ("gradient_accumulation_steps", True),
    ],
)
def test_meaningless_settings_rejected_naming_key_and_value(key, value):
    cfg = OmegaConf.create({**BASE, key: value})
    with pytest.raises(ValueError, match=rf"^{key}: expected .*got {value!r}"):
        LoopSettings.from_config(cfg)


def test_settings_defaults_and_nulls():
    s = LoopSettings.from_config(
        OmegaConf.create({**BASE, "seed": None, "max_steps_per_epoch": None, "clip_grad_norm": 1})
    )
    assert (s.seed, s.max_steps_per_epoch, s.clip_grad_norm) == (0, None, 1.0)
    assert s.max_nonfinite_steps == 3 and s.process_group_timeout_s == 600.0


def test_every_shipped_config_has_only_known_keys():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.rglob("*.yaml"):
        cfg = OmegaConf.load(path)
        if "cache" in cfg:  # recipes/cache_teacher.py: no training loop, keys of its own
            from tune_losses.training.cache_teacher import CONFIG_KEYS

            assert warn_unknown_keys(cfg, CONFIG_KEYS) == [], path
            continue
        assert warn_unknown_keys(cfg, known_keys()) == [], path
        LoopSettings.from_config(cfg)


def test_unknown_top_level_key_warns_once_with_nearest(caplog):
    cfg = OmegaConf.create({**BASE, "batch_sise": 4, "zzz_unrelated": 1})
    with caplog.at_level(logging.WARNING):
        assert warn_unknown_keys(cfg, known_keys()) == ["batch_sise", "zzz_unrelated"]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("'batch_sise'" in m for m in msgs) == 1
    assert any("'batch_sise'" in m and "did you mean 'batch_size'" in m for m in msgs)
    assert any("'zzz_unrelated'" in m and "did you mean" not in m for m in msgs)


# ------------------------------------------------------------------------------------- data


def _dataset(tmp_path: Path, lines, source="json") -> OmegaConf:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(lines))
    return OmegaConf.create({"source": source, "data_files": str(path), "column": "text"}), path


def _doc(text: str) -> bytes:
    return (json.dumps({"text": text}) + "\n").encode()


def test_non_utf8_line_named_by_file_and_line(tmp_path):
    cfg, path = _dataset(tmp_path, [_doc("a"), _doc("b"), b'{"text": "caf\xe9"}\n'])
    with pytest.raises(ValueError, match=rf"dataset: {path} line 3: not valid UTF-8"):
        data.validate_text_files(cfg)


@pytest.mark.parametrize(
    "bad, what",
    [
        (b'{"content": "x"}\n', "text column 'text'"),
        (b'{"text": 3}\n', "expected a string"),
        (b'{"text": "x"\n', "not valid JSON"),
        (b'["text"]\n', "text column 'text'"),
    ],
)
def test_bad_json_line_named_by_file_and_line(tmp_path, bad, what):
    cfg, path = _dataset(tmp_path, [_doc("a"), bad, _doc("c")])
    with pytest.raises(ValueError, match=rf"dataset: {path} line 2: .*{what}"):
        data.validate_text_files(cfg)


def test_empty_documents_counted_and_warned_once(tmp_path, caplog):
    cfg, path = _dataset(tmp_path, [_doc("a"), _doc(""), b"\n", _doc("  "), _doc("d")])
    with caplog.at_level(logging.WARNING):
        assert data.validate_text_files(cfg) == (4, 2)
    warnings = [r.getMessage() for r in caplog.records if "empty" in r.getMessage()]
    assert len(warnings) == 1 and f"{path} line 2" in warnings[0] and "2 of 4" in warnings[0]


def test_hub_datasets_are_left_to_the_loader():
    assert data.validate_text_files(OmegaConf.create({"source": "tatsu-lab/alpaca"})) == (0, 0)


def test_dataset_smaller_than_one_step_is_an_error():
    loader = torch.utils.data.DataLoader(list(range(3)), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="dataset: 3 samples make no optimizer step of batch_size 4"):
        data.steps_per_epoch(3, loader, batch_size=4, grad_accum=1, dp_size=1, max_steps_per_epoch=None)


class _Counted(torch.utils.data.Dataset):
    """Samples ``{"tokens": [i]}``; counts the reads, to show a resume reads none it skips."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return {"tokens": [i], "labels": [i]}


def _loader(ds, rank=0, dp=1, batch_size=2):
    return data.build_dataloader(
        ds, batch_size=batch_size, shuffle=True, seed=7, dp_size=dp, dp_rank=rank, pad_id=0, ignore_index=-100
    )


def _ids(steps):
    return [[b["tokens"].flatten().tolist() for b in micro] for micro in steps]


@pytest.mark.parametrize("saved_state", [True, False], ids=["loader_state", "older_checkpoint"])
@pytest.mark.parametrize("dp", [1, 2])
def test_resumed_epoch_sees_the_batches_of_an_uninterrupted_one(saved_state, dp, caplog):
    """Stopped after 2 of 5 steps (epoch 1, shuffled, 2 micro-batches a step) and resumed in a fresh
    loader: the remaining steps hold exactly the uninterrupted epoch's batches, on every dp rank
    (rank 0's state loaded everywhere, as the loop saves it). From the loader state no skipped sample
    is read; from an older checkpoint (no state) they are read and dropped, with a log line."""
    epoch, steps, accum, done = 1, 5, 2, 2
    for rank in range(dp):
        loader, sampler = _loader(_Counted(48), rank, dp)
        full = _ids(data.step_batches(loader, sampler, epoch, steps, 0, accum))
        assert len(full) == steps and full[0] != full[1]

        loader, sampler = _loader(_Counted(48), 0, dp)  # the run that stopped; rank 0 saves
        gen = data.step_batches(loader, sampler, epoch, steps, 0, accum)
        first = _ids([next(gen) for _ in range(done)])
        state = data.loader_state(loader, epoch, batches=done * accum, epoch_done=False)
        if rank == 0:
            assert first == full[:done]
        state = torch.load(_saved(state), weights_only=False)  # through torch.save, as the checkpoint

        ds = _Counted(48)
        loader, sampler = _loader(ds, rank, dp)
        with caplog.at_level(logging.INFO, logger=data.__name__):
            caplog.clear()
            rest = _ids(data.step_batches(loader, sampler, epoch, steps, done, accum, state if saved_state else None))
        assert rest == full[done:], rank
        skipped = done * accum * 2  # micro-batches x batch size
        assert ds.reads == (steps - done) * accum * 2 + (0 if saved_state else skipped)
        logged = [r.getMessage() for r in caplog.records if "no data loader state" in r.getMessage()]
        assert len(logged) == (0 if saved_state else 1)
        if not saved_state:
            assert "reading and dropping the 4 micro-batches of epoch 1" in logged[0]


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_a_finished_epoch_saves_no_loader_state_and_the_next_starts_fresh():
    loader, sampler = _loader(_Counted(16))
    list(data.step_batches(loader, sampler, 0, 2, 0, 1))  # a truncated epoch: the loader is not exhausted
    state = data.loader_state(loader, 0, batches=2, epoch_done=True)
    assert state == {"epoch": 0, "batches": 2, "loader": None}
    fresh, fresh_sampler = _loader(_Counted(16))
    want = _ids(data.step_batches(fresh, fresh_sampler, 1, 2, 0, 1))
    assert _ids(data.step_batches(loader, sampler, 1, 2, 0, 1, state)) == want


def test_a_loader_state_from_other_batch_settings_is_an_error():
    loader, sampler = _loader(_Counted(16))
    gen = data.step_batches(loader, sampler, 0, 4, 0, 1)
    next(gen)
    state = data.loader_state(loader, 0, batches=1, epoch_done=False)
    with pytest.raises(ValueError, match=r"epoch 0 after 1 micro-batches, the run resumes at epoch 0 after 2 "):
        next(data.step_batches(loader, sampler, 0, 2, 1, 2, state))


# --------------------------------------------------------------------------------- protocol


class _MeanCE(nn.Module):
    """A foreign loss: a mean, no sum_and_count (torchtune's own losses look like this)."""

    ignore_index = -100

    def forward(self, logits, labels):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def test_protocols_describe_our_losses():
    fused, chunked = LinearCrossEntropyLoss(), CEWithChunkedOutputLoss()
    assert isinstance(fused, SumAndCountLoss) and isinstance(fused, ModelOutputLoss)
    assert not isinstance(fused, TeacherOutputLoss)
    assert isinstance(chunked, SumAndCountLoss) and not isinstance(chunked, ModelOutputLoss)
    assert not isinstance(_MeanCE(), SumAndCountLoss)


@pytest.mark.parametrize("loss", [_MeanCE(), CEWithChunkedOutputLoss(num_output_chunks=2)], ids=["foreign", "chunked"])
def test_training_loss_sum_count_and_scale(loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    adapter = TrainingLoss(loss)
    plain = adapter(logits, labels=labels)
    expected = nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum")
    assert int(plain.num_tokens) == 8 and torch.allclose(plain.total, expected)
    scale = torch.tensor(0.25)
    scaled = adapter(logits, labels=labels, scale=scale)
    assert torch.allclose(scaled.total, expected * 0.25) and int(scaled.num_tokens) == 8
    none = adapter(logits, labels=torch.full_like(labels, -100))
    assert float(none.total.detach()) == 0.0 and int(none.num_tokens) == 0


def test_fused_loss_takes_the_scale_natively():
    loss = LinearCrossEntropyLoss()
    adapter = TrainingLoss(loss)
    assert adapter.native_scale
    head = nn.Linear(8, 13, bias=False)
    loss.projection = type("P", (), {"weight": head.weight, "bias": None})()
    h = torch.randn(2, 3, 8)
    labels = torch.randint(0, 13, (2, 3))
    a = adapter(h, labels=labels)
    b = adapter(h, labels=labels, scale=torch.tensor(0.5))
    assert isinstance(b, LossSum) and torch.allclose(b.total, a.total * 0.5)


# ------------------------------------------------------------------------------ checkpoints


class _FakeCheckpointer:
    """Writes like torchtune's: ``<_output_dir>/epoch_<n>/model-00001-of-00001.bin`` and a config copy."""

    def __init__(self, out: Path, fail_after_model: bool = False):
        self._output_dir = out
        self.fail = fail_after_model

    def save_checkpoint(self, state_dict, epoch, intermediate_checkpoint=False):
        d = Path(self._output_dir) / f"epoch_{epoch}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict["model"], d / "model-00001-of-00001.bin")
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")
        (d / "config.json").write_text("{}")


def test_export_is_atomic_and_a_killed_save_keeps_the_previous_files(tmp_path):
    checkpointing.export_atomically(_FakeCheckpointer(tmp_path), {"model": {"w": torch.ones(2)}}, epoch=0)
    final = tmp_path / "epoch_0" / "model-00001-of-00001.bin"
    assert torch.load(final)["w"].tolist() == [1.0, 1.0]
    assert (tmp_path / "epoch_0" / "config.json").exists()
    assert not (tmp_path / checkpointing.STAGING_DIR).exists()
    with pytest.raises(KeyboardInterrupt):
        checkpointing.export_atomically(
            _FakeCheckpointer(tmp_path, fail_after_model=True), {"model": {"w": torch.zeros(2)}}, epoch=0
        )
    assert torch.load(final)["w"].tolist() == [1.0, 1.0]  # the good export is untouched
    assert (tmp_path / checkpointing.STAGING_DIR).exists()
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "state.pt.tmp").write_bytes(b"partial")
    removed = checkpointing.remove_partial_files(tmp_path)
    assert {p.name for p in removed} == {checkpointing.STAGING_DIR, "state.pt.tmp"}
    assert final.exists() and not (tmp_path / "resume" / "state.pt.tmp").exists()


def test_resume_state_written_atomically(tmp_path):
    path = checkpointing.save_resume_state(tmp_path, {"global_step": 3})
    assert path == tmp_path / checkpointing.RESUME_FILE and not path.with_name("state.pt.tmp").exists()
    assert checkpointing.load_resume_state(tmp_path)["global_step"] == 3
    with pytest.raises(ValueError, match="resume_from_checkpoint: expected a resume state"):
        checkpointing.load_resume_state(tmp_path / "nowhere")


# -------------------------------------------------------------------------------- gradients


def test_nonfinite_gradients_are_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model(torch.randn(4, 3)).sum().backward()
    assert nonfinite_grads(model) == [] and torch.isfinite(grad_norm(list(model.parameters())))
    model[1].weight.grad[0, 0] = float("nan")
    model[0].bias.grad[1] = float("inf")
    assert nonfinite_grads(model) == [("0.bias", "inf"), ("1.weight", "nan")]
    assert not torch.isfinite(grad_norm(list(model.parameters())))


# --------------------------------------------------------------------------------- progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_off_a_terminal_prints_every_n_steps_and_messages_on_their_own_line():
    stream = _Stream(tty=False)
    bar = Progress(total=10, desc="sft", every=5, stream=stream)
    for step in range(10):
        bar.update(loss=1.0 / (step + 1))
        if step == 0:
            bar.write("loss peak memory: 1.0 MiB")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "loss peak memory: 1.0 MiB"
    assert [ln.split("  ")[0] for ln in lines[1:]] == ["sft step 5/10", "sft step 10/10"]
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_redraws_in_place():
    stream = _Stream(tty=True)
    bar = Progress(total=4, desc="kd", stream=stream)
    for _ in range(4):
        bar.update(loss=2.0)
    bar.write("a message")
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "a message\n" in text and "kd step" not in text


def test_progress_of_other_ranks_is_silent():
    stream = _Stream(tty=False)
    bar = Progress(total=2, every=1, enabled=False, stream=stream)
    bar.update(1.0)
    bar.write("x")
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------- distributed


def _timeout_rank(rank, world, timeout_s):
    import torch.distributed as dist

    from tune_losses.training.distributed import CollectiveTimeout, collective, init_process_group

    init_process_group(torch.device("cpu"), timeout_s)
    with collective("all-reduce of the warm-up", timeout_s):
        dist.all_reduce(torch.ones(1))
    if rank == 1:
        time.sleep(3 * timeout_s)  # a stopped rank
        return None
    start = time.perf_counter()
    try:
        with collective("all-reduce of the step's valid-token count", timeout_s):
            dist.all_reduce(torch.ones(1))
    except CollectiveTimeout as err:
        return str(err), time.perf_counter() - start
    return "no timeout", 0.0


@pytest.mark.distributed
def test_stopped_rank_times_out_naming_collective_and_rank():
    results = run_ranks(_timeout_rank, 2, 2.0, init_process_group=False, timeout=60)
    message, waited = results[0]
    assert message.startswith("rank 0 of 2: all-reduce of the step's valid-token count timed out after 2 s"), message
    assert "process_group_timeout_s" in message
    assert waited < 15
