"""Recipes that fail safe, launched as users launch them (``tune run``, a couple of steps each).

* a diverging run (lr 1e6) applies no non-finite update, stops after ``max_nonfinite_steps`` with a
  non-zero exit naming the step and the gradients, and keeps finite checkpoints;
* a step save on an epoch's last step writes once; partial files of a killed save are removed at start;
  the logged lr is the one the step ran at; an unknown key is warned about; progress off a terminal is
  one line per N steps, the loss-memory line on its own;
* meaningless settings and a bad dataset line stop the run at setup, naming what is wrong;
* a frozen rank fails a 2-rank run within ``process_group_timeout_s``, naming the collective and rank;
* KD with a NaN in the teacher stops (before, it logged ``kd_loss:0.0`` and exited 0).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from test_recipes import SHORT, tune_run

pytestmark = pytest.mark.slow

EXPORT = Path("epoch_0") / "model-00001-of-00001.bin"


def _all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return bool(torch.isfinite(state).all()) if state.is_floating_point() else True
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return True


def test_diverging_run_stops_and_never_applies_or_saves_nonfinite_state(tmp_path, tiny_assets):
    proc = tune_run(
        "sft_single_device",
        "sft",
        tmp_path,
        *SHORT,
        "max_steps_per_epoch=8",
        "optimizer.lr=1e6",
        "save_every_n_steps=1",
        check=False,
    )
    err = proc.stderr
    assert proc.returncode != 0, err[-3000:]
    assert "NonFiniteTrainingError: stopping at step 4: 3 optimizer steps in a row were non-finite" in err, err[-3000:]
    assert "max_nonfinite_steps=3" in err and "gradient of tok_embeddings.weight (nan)" in err
    state = torch.load(tmp_path / "resume" / "state.pt", weights_only=False)
    assert state["global_step"] == 3 and _all_finite(state["model"]) and _all_finite(state["optimizer"])
    assert _all_finite(torch.load(tmp_path / EXPORT))


def test_save_on_epoch_end_lr_unknown_key_partial_files_and_progress(tmp_path, tiny_assets):
    (tmp_path / "resume").mkdir(parents=True)
    (tmp_path / "resume" / "state.pt.tmp").write_bytes(b"half a state")
    (tmp_path / ".export.tmp" / "epoch_0").mkdir(parents=True)
    (tmp_path / ".export.tmp" / "epoch_0" / "model-00001-of-00001.bin").write_bytes(b"half a model")
    proc = tune_run(
        "sft_single_device",
        "sft",
        tmp_path,
        *SHORT,
        "lr_scheduler.num_warmup_steps=10",
        "save_every_n_steps=2",
        "log_loss_memory=true",
        "batch_sise=4",
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    from tune_losses.training.metrics import read_metrics

    m = read_metrics(tmp_path / "logs" / "metrics.txt")
    from omegaconf import OmegaConf

    peak = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sft.yaml").optimizer.lr
    assert m[1]["lr"] == 0.0 and math.isclose(m[2]["lr"], peak / 10), (m[1]["lr"], m[2]["lr"])  # warm-up
    assert out.count("config: unknown top-level key 'batch_sise'") == 1 and "did you mean 'batch_size'" in out
    assert out.count("step 2: saved") == 1  # the step save and the epoch end are one save
    assert not (tmp_path / "resume" / "state.pt.tmp").exists() and not (tmp_path / ".export.tmp").exists()
    assert "removed partial files" in out and (tmp_path / EXPORT).stat().st_size > 1000
    lines = out.splitlines()
    progress = [ln for ln in lines if ln.startswith("sft step ")]
    assert [ln.split("  ")[0] for ln in progress] == ["sft step 1/2", "sft step 2/2"], progress
    memory = [ln for ln in lines if "loss peak memory" in ln]
    assert len(memory) == 1 and "sft step" not in memory[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps: expected an int >= 1, got 0"),
        ("max_steps_per_epoch=0", "max_steps_per_epoch: expected an int >= 1 or null, got 0"),
        ("batch_size=1000", "dataset: 785 samples make no optimizer step of batch_size 1000"),
    ],
)
def test_meaningless_settings_stop_at_setup(tmp_path, tiny_assets, override, message):
    proc = tune_run("sft_single_device", "sft", tmp_path, *SHORT, override, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / EXPORT).exists()


def test_bad_dataset_line_stops_before_the_first_step(tmp_path, tiny_assets):
    lines = (tiny_assets / "data" / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[499] = json.dumps({"content": "no text column"}).encode() + b"\n"
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b"".join(lines))
    proc = tune_run("sft_single_device", "sft", tmp_path / "out", *SHORT, f"dataset.data_files={bad}", check=False)
    assert proc.returncode != 0
    assert f"dataset: {bad} line 500: expected a JSON object with the text column 'text'" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert (
        not (tmp_path / "out" / "logs" / "metrics.txt").exists()
        or "Step 1 " not in (tmp_path / "out" / "logs" / "metrics.txt").read_text()
    )


def _children(pid: int):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int):
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_stopped_rank_fails_the_run_naming_collective_and_rank(tmp_path, tiny_assets):
    """Rank 1 is frozen (SIGSTOP) after the first step: rank 0 fails within process_group_timeout_s."""
    import os
    import signal
    import subprocess
    import time

    from multiproc import child_env
    from test_recipes import tune_cmd

    cmd = tune_cmd(
        "sft_distributed",
        "sft",
        tmp_path,
        *SHORT,
        "max_steps_per_epoch=40",
        "batch_size=2",
        "process_group_timeout_s=5",
        nproc=2,
    )
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics, stopped = tmp_path / "logs" / "metrics.txt", None
    try:
        deadline = time.monotonic() + 300
        while stopped is None and time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and "Step 1 " in metrics.read_text():
                ranks = {_rank_of(k): k for k in _children(proc.pid)}
                if 0 in ranks and 1 in ranks:
                    rank0, stopped = ranks[0], ranks[1]
                    os.kill(stopped, signal.SIGSTOP)
            time.sleep(0.2)
        assert stopped is not None, "rank 1 was never seen running"
        start = time.monotonic()
        while _alive(rank0) and time.monotonic() - start < 90:
            time.sleep(0.2)
        waited = time.monotonic() - start
        _kill(stopped)  # torchrun's SIGTERM would wait for the frozen rank
        out, err = proc.communicate(timeout=120)
    finally:
        if stopped is not None:
            _kill(stopped)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "CollectiveTimeout: rank 0 of 2: " in err and "timed out after 5 s (process_group_timeout_s)" in err, err[
        -3000:
    ]
    assert waited < 60, waited  # the timeout is 5 s; torch's default would be 30 min


def test_kd_with_a_nan_teacher_stops_instead_of_reading_as_agreement(tmp_path, tiny_assets):
    """One NaN in the teacher's output projection: the run must not train on (or log a perfect kd_loss)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    sd = torch.load(tiny_assets / "teacher" / "model.pt")
    sd["output.weight"][7, 0] = float("nan")
    torch.save(sd, teacher / "model.pt")
    proc = tune_run(
        "kd_single_device",
        "kd",
        tmp_path / "out",
        *SHORT,
        "max_steps_per_epoch=4",
        "max_nonfinite_steps=2",
        f"teacher_checkpointer.checkpoint_dir={teacher}",
        check=False,
    )
    assert proc.returncode != 0
    assert "stopping at step 2: 2 optimizer steps in a row were non-finite" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / EXPORT).exists()
