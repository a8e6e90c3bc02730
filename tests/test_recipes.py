"""The four recipes end to end on the tiny offline default, launched as users launch them (`tune run`).

Marked slow (each run pays torchtune's ~10 s import); the 2-rank ones also distributed. CI runs both.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from multiproc import child_env, run_command

from tune_losses.training.metrics import read_metrics

TUNE = str(Path(sys.executable).with_name("tune"))

pytestmark = pytest.mark.slow


def tune_cmd(recipe: str, config: str, out: Path, *overrides: str, nproc: int = 1) -> list:
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    return [
        TUNE,
        "run",
        *dist,
        f"recipes/{recipe}.py",
        "--config",
        f"configs/tiny/{config}.yaml",
        f"output_dir={out}",
        "log_loss_memory=false",
        *overrides,
    ]


def tune_run(recipe: str, config: str, out: Path, *overrides: str, nproc: int = 1, check: bool = True, **kw):
    """Run a recipe as a user does; return {step: {metric: value}} parsed from the DiskLogger file
    (with ``check=False``: the finished process, whatever its exit code)."""
    env = child_env(threads=1 if nproc > 1 else 2)
    proc = run_command(tune_cmd(recipe, config, out, *overrides, nproc=nproc), env=env, check=check, **kw)
    return read_metrics(out / "logs" / "metrics.txt") if check else proc


# Two optimizer steps in a fixed order, no warm-up, clipping out of the way: runs to compare step by step.
TWO_STEPS = [
    "shuffle=false",
    "max_steps_per_epoch=2",
    "epochs=1",
    "clip_grad_norm=1000.0",
    "lr_scheduler.num_warmup_steps=0",
]
SHORT = [*TWO_STEPS, "tokenizer.max_seq_len=64"]


def _assert_same_first_steps(runs: dict, keys=("loss", "grad_norm")):
    ref_name, ref = next(iter(runs.items()))
    for name, run in runs.items():
        for step in (1, 2):
            for k in keys:
                a, b = ref[step][k], run[step][k]
                assert abs(a - b) <= 1e-4 * abs(a), f"step {step} {k}: {ref_name}={a} vs {name}={b}"


@pytest.mark.distributed
@pytest.mark.parametrize("task", ["sft", "kd"])
def test_exact_normalization_across_accumulation_and_ranks(task, tmp_path, tiny_assets):
    """batch 4 == batch 2 x 2 accumulation == 2 ranks x batch 2: same loss and grad_norm, steps 1-2."""
    single, dist_ = f"{task}_single_device", f"{task}_distributed"
    runs = {
        "batch4": tune_run(single, task, tmp_path / "a", *SHORT, "batch_size=4"),
        "batch2x2": tune_run(single, task, tmp_path / "b", *SHORT, "batch_size=2", "gradient_accumulation_steps=2"),
        "2ranks": tune_run(dist_, task, tmp_path / "c", *SHORT, "batch_size=2", nproc=2),
    }
    keys = ("loss", "grad_norm") + (("class_loss", "kd_loss") if task == "kd" else ())
    _assert_same_first_steps(runs, keys)


def test_sft_loss_goes_down(tmp_path, tiny_assets):
    m = tune_run(
        "sft_single_device",
        "sft",
        tmp_path,
        "max_steps_per_epoch=12",
        "epochs=1",
        "tokenizer.max_seq_len=64",
        "optimizer.lr=1e-2",
        "lr_scheduler.num_warmup_steps=0",
    )
    first, last = m[1]["loss"], min(m[s]["loss"] for s in (10, 11, 12))
    assert last < first - 0.5, (first, last)
    assert all(k in m[1] for k in ("loss", "grad_norm", "lr", "tokens_per_second_per_rank"))


def test_kd_chunked_losses_and_lora_student(tmp_path, tiny_assets):
    """KD with torchtune-style chunked losses, a LoRA student and temperature: runs, logs both parts."""
    m = tune_run(
        "kd_single_device",
        "kd",
        tmp_path,
        "max_steps_per_epoch=8",
        "epochs=1",
        "tokenizer.max_seq_len=64",
        "optimizer.lr=1e-2",
        "lr_scheduler.num_warmup_steps=0",
        "loss._component_=tune_losses.CEWithChunkedOutputLoss",
        "~loss.kd_ratio",
        "~loss.divergence",
        "~loss.temperature",
        "loss.num_output_chunks=4",
        "kd_loss.temperature=2.0",
        "model._component_=tune_losses.tiny.lora_tiny_student",
        "model.lora_attn_modules=[q_proj,v_proj]",
        "model.lora_rank=8",
        "model.lora_alpha=16",
    )
    assert m[8]["loss"] < m[1]["loss"]
    for step in m.values():
        if "loss" in step:
            expect = 0.5 * step["class_loss"] + 0.5 * step["kd_loss"]
            assert abs(step["loss"] - expect) < 1e-4 * abs(expect)
    assert (tmp_path / "epoch_0" / "model-00001-of-00001.bin").exists()


@pytest.mark.parametrize("task", ["sft", "kd"])
def test_resume_matches_uninterrupted_run(task, tmp_path, tiny_assets):
    """Stopped mid-epoch (after step 4 of 2 epochs x 3 steps, shuffled) and resumed: steps 5-6 log the
    uninterrupted run's loss and grad norm, continuing from the data loader's state in the checkpoint;
    (sft) a checkpoint without one, as older versions wrote, too, by reading the done batches again."""
    common = ["max_steps_per_epoch=3", "epochs=2", "tokenizer.max_seq_len=64", "save_every_n_steps=2"]
    full = tune_run(f"{task}_single_device", task, tmp_path / "full", *common)
    tune_run(f"{task}_single_device", task, tmp_path / "cut", *common, "stop_after_steps=4")
    state = torch.load(tmp_path / "cut" / "resume" / "state.pt", weights_only=False)
    assert state["data"]["epoch"] == 1 and state["data"]["batches"] == 1 and state["data"]["loader"] is not None
    runs = {"cut": tmp_path / "cut"}
    if task == "sft":
        runs["older"] = tmp_path / "older"
        shutil.copytree(tmp_path / "cut", runs["older"])
        del state["data"]
        torch.save(state, runs["older"] / "resume" / "state.pt")
    for name, out in runs.items():
        proc = tune_run(f"{task}_single_device", task, out, *common, "resume_from_checkpoint=true", check=False)
        logs = proc.stdout + proc.stderr
        assert proc.returncode == 0, logs[-3000:]
        assert ("the checkpoint has no data loader state" in logs) == (name == "older"), logs[-3000:]
        cut = read_metrics(out / "logs" / "metrics.txt")
        assert sorted(s for s in cut if s > 0) == list(range(1, 7))
        for step in (5, 6):
            for k in ("loss", "grad_norm"):
                a, b = full[step][k], cut[step][k]
                assert abs(a - b) <= 1e-5 * abs(a), (name, step, k, full[step], cut[step])


def test_readme_command_runs_without_pythonpath(tmp_path, tiny_assets):
    """`tune run recipes/<x>.py` from the repository root with nothing but the venv (no PYTHONPATH):
    the repository's `recipes` package is found before torchtune's (scripts/setup_env.sh's .pth)."""
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    run_command(tune_cmd("sft_single_device", "sft", tmp_path, *SHORT, "max_steps_per_epoch=1"), env=env)
    assert (tmp_path / "epoch_0" / "model-00001-of-00001.bin").exists()
