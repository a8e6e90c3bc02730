"""The main job on the embedded offline default: train a teacher, distill a student, show the result.

    bash scripts/demo.sh                 # set-up included; quick version (minutes on 2 cores)
    bash scripts/demo.sh --full          # the long version (2 epochs per run)
    python scripts/demo.py [--full] [--epochs N] [--all-caches] [--seed S] [--out outputs/demo]   # environment active

Stages (each training stage a real `tune run` of this repository's recipes on CPU, fp32):
1. build the tiny assets (Python's own documentation, a SentencePiece tokenizer, tiny llama models);
2. SFT of the teacher with the fused linear cross-entropy;
3. KD of the student from that teacher with the fused distillation loss;
4. SFT of the same student without KD (the control), same steps, data and seed;
5. the teacher cached once (recipes/cache_teacher.py: top-k 32; with --full top-k 8, 32, 128 and 32 draws);
6. the same student distilled offline from each cache (recipes/kd_offline_single_device.py, no teacher
   in memory);
7. one-step runs with the chunked-output losses, for the loss's peak memory beside the fused runs';
8. held-out loss of teacher, distilled students and control student; loss curves as a PNG plot.

Each run's full output goes to ``<out>/<run>.log``; the console shows the stages, a progress bar read
from the run's metrics file, and the summary (also written to ``<out>/summary.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from tune_losses.training.metrics import read_metrics
from tune_losses.training.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
CKPT = "epoch_{}/model-00001-of-00001.bin"
BATCH_SIZE = 8  # the tiny configs' batch size; the step counts below follow from it

# Seconds per optimizer step of each run and of one `tune run` start-up (imports, model and data
# set-up) on 2 quiet cores (AMD EPYC, torch 2.13.0 CPU): the stage estimates. They are scaled by the
# load average per core at the start, then by how long the teacher stage really took.
STEP_SECONDS = {
    "teacher_sft": 0.21,
    "student_kd": 0.19,
    "student_sft": 0.06,
    "cache_teacher": 0.07,
    "student_offline": 0.08,
}
STARTUP_SECONDS = 6.0
Metrics = Dict[int, Dict[str, float]]
PEAK_RSS_MIB: Dict[str, float] = {}  # run name -> its process's peak resident memory (MiB)


def _poll_metrics(path: Path) -> Metrics:
    """The run's metrics so far; empty while the file is missing or a line is half written."""
    try:
        return read_metrics(path) if path.exists() else {}
    except ValueError:
        return {}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _about(seconds: float) -> str:
    return f"~{max(1, round(seconds))} s" if seconds < 90 else f"~{round(seconds / 60)} min"


def tune_run(recipe: str, config: str, out: Path, total_steps: int, *overrides: str) -> Metrics:
    """Run one recipe with `tune run` (all output to ``<out>.log``); show progress; return its metrics
    (empty for a run that logs none). Its peak resident memory goes to ``PEAK_RSS_MIB[out.name]``."""
    cmd = [
        str(Path(sys.executable).with_name("tune")),
        "run",
        f"recipes/{recipe}.py",
        "--config",
        f"configs/tiny/{config}.yaml",
        f"output_dir={out}",
        *overrides,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # On a shared machine, OpenMP threads that spin while waiting for each other turned a 30-step
    # run from 40 s into 290 s (2 threads, load 5 on 2 cores); passive waiting costs little when idle.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log_file = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "logs" / "metrics.txt"
    if metrics_file.exists():
        metrics_file.unlink()  # DiskLogger appends; a rerun of the demo starts its curves afresh
    print(f"      $ tune {' '.join(cmd[1:])}", flush=True)
    print(f"      (output: {log_file.relative_to(ROOT) if log_file.is_relative_to(ROOT) else log_file})", flush=True)
    # The run's own bar goes to its log; here the same kind of bar follows the run's metrics file
    # (in place on a terminal, a line every fifth of the run in a file or pipe).
    bar = Progress(
        total_steps,
        desc=f"      {out.name}",
        every=max(total_steps // 5, 1),
        stream=sys.stdout,
        enabled=total_steps > 1,
    )

    def follow(m: Metrics) -> None:
        while bar.n < total_steps and "loss" in m.get(bar.n + 1, {}):
            bar.update(m[bar.n + 1]["loss"])

    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:  # wait4: this child's own resource usage (single-device `tune run` runs the recipe in-process)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                PEAK_RSS_MIB[out.name] = usage.ru_maxrss / 1024  # KiB on Linux
                break
            time.sleep(0.5)
            follow(_poll_metrics(metrics_file))
    if proc.returncode != 0:
        bar.close()
        print(log_file.read_text()[-3000:], file=sys.stderr)
        sys.exit(f"stage failed (exit {proc.returncode}): see {log_file}")
    m = read_metrics(metrics_file) if metrics_file.exists() else {}
    follow(m)
    bar.close()
    return m


@torch.no_grad()
def heldout_loss(builder, checkpoint: Path, max_seq_len: int) -> float:
    """Mean next-token cross-entropy over every held-out token (fused loss on hidden states)."""
    from tune_losses import linear_cross_entropy, set_output_mode
    from tune_losses.tiny import tiny_tokenizer

    model = builder()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    proj = set_output_mode(model, "hidden")
    tok = tiny_tokenizer(str(ROOT / "assets/tiny/tokenizer.model"))
    hidden, labels = [], []
    for line in (ROOT / "assets/tiny/data/heldout.jsonl").read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"], add_bos=True, add_eos=True)[:max_seq_len]
        hidden.append(model(torch.tensor(ids[:-1])[None]))  # [1, S_doc, H]
        labels.append(torch.tensor(ids[1:])[None])
    # One loss call over all documents' tokens: one shape, so compiled chunk math compiles once.
    return float(linear_cross_entropy(torch.cat(hidden, 1), proj.weight, torch.cat(labels, 1)))


def smooth(values: List[float], window: int) -> List[float]:
    """Trailing moving average over up to ``window`` points (the first points average fewer)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(curves: Dict[str, tuple], held: Dict[str, float], path: Path, title: str) -> None:
    """Training curves (light moving average over the faint raw curve) and held-out losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, (steps, key)), color in zip(curves.items(), ["C0", "C1", "C2"]):
        xs = sorted(s for s in steps if s > 0 and key in steps[s])
        ys = [steps[s][key] for s in xs]
        ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
        ax.plot(xs, smooth(ys, max(len(ys) // 12, 3)), color=color, lw=1.8, label=f"{name} (training)")
        ax.axhline(held[name], color=color, ls="--", lw=1.2, label=f"{name}: held-out {held[name]:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OFFLINE_COLUMNS = ("student", "heldout", "step_s", "peak_rss_mib", "loss_peak_mib", "teacher")


def _median_step(m: Metrics) -> float:
    """Median seconds per optimizer step, the first (warm-up) step left out."""
    times = [m[s]["step_seconds"] for s in sorted(m) if s > 1 and "step_seconds" in m[s]]
    return statistics.median(times) if times else float("nan")


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def offline_table(kd, control, offline, held, held_offline, caches, cache_seconds, teacher_mib) -> List[List[str]]:
    """The offline-KD rows of the summary: online KD, each cache's student, no KD."""

    def row(name: str, run: str, m: Metrics, loss: float, teacher: str) -> List[str]:
        peak = m.get(0, {}).get("loss_peak_memory_mib", float("nan"))
        rss = PEAK_RSS_MIB.get(run, float("nan"))
        return [name, f"{loss:.3f}", f"{_median_step(m):.3f}", f"{rss:.0f}", f"{peak:.1f}", teacher]

    rows = [
        row(
            "online KD",
            "student_kd",
            kd,
            held["student KD"],
            f"in memory ({teacher_mib:.1f} MiB weights), run every step",
        )
    ]
    for (mode, k), m in offline.items():
        label = f"top-{k}" if mode == "topk" else f"{k} draws"
        cache = f"cache {_dir_mib(caches[(mode, k)]):.1f} MiB on disk, built in {cache_seconds[(mode, k)]:.0f} s"
        rows.append(row(f"offline KD, {label}", f"student_offline_{mode}{k}", m, held_offline[(mode, k)], cache))
    rows.append(row("no KD", "student_sft", control, held["student without KD"], "none"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the long version: 2 epochs per run (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (overrides --full)")
    p.add_argument(
        "--all-caches",
        action="store_true",
        help="offline KD from every cache (top-k and sampled, k = 8, 32, 128), as --full does, at the chosen epochs",
    )
    p.add_argument("--seed", type=int, default=1234, help="data order seed, the same for every run")
    p.add_argument("--out", default="outputs/demo", help="where runs, logs, plot and summary go")
    p.add_argument("--max-seq-len", type=int, default=256)
    args = p.parse_args()
    epochs = args.epochs or (2 if args.full else 1)
    os.chdir(ROOT)
    out = (ROOT / args.out).resolve()
    start = time.time()
    load = os.getloadavg()[0]
    print(
        f"tune-losses demo: {epochs} epoch(s) per run, seed {args.seed}, CPU fp32, "
        f"{torch.get_num_threads()} threads, load average {load:.1f} on {os.cpu_count()} cores",
        flush=True,
    )

    from tune_losses.tiny import build, read_jsonl_texts, tiny_student, tiny_teacher

    n_stages = 8
    stage_start = [time.time()]

    def stage(i: int, what: str, estimate: float) -> None:
        stage_start[0] = time.time()
        print(f"\n[{i}/{n_stages}] {what}, {_about(estimate)}", flush=True)

    def done() -> float:
        took = time.time() - stage_start[0]
        print(f"      done in {_clock(took)}", flush=True)
        return took

    stage(1, "tiny assets: text, tokenizer, teacher and student initial weights", 10)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        manifest = build(ROOT / "assets" / "tiny")
    built = [k for k, s in manifest["steps"].items() if s["built"]]
    print(f"      assets/tiny: {'built ' + ', '.join(built) if built else 'up to date'}")
    done()

    n_train = len(read_jsonl_texts(ROOT / "assets/tiny/data/train.jsonl"))
    steps = epochs * (n_train // BATCH_SIZE)
    common = [f"epochs={epochs}", f"tokenizer.max_seq_len={args.max_seq_len}", f"seed={args.seed}"]
    last = epochs - 1
    speed = max(load / (os.cpu_count() or 1), 1.0)  # this machine's slowdown against quiet cores

    def estimate(run: str) -> float:
        return speed * (STARTUP_SECONDS + steps * STEP_SECONDS[run])

    def run(task: str, name: str, *overrides: str, n_steps: int = steps) -> Metrics:
        """``recipes/<task>_single_device.py`` on ``configs/tiny/<task>.yaml`` with the common overrides,
        into ``out / name``."""
        return tune_run(f"{task}_single_device", task, out / name, n_steps, *common, *overrides)

    stage(2, f"teacher SFT (4 layers, dim 256), {steps} steps", estimate("teacher_sft"))
    teacher = run("sft", "teacher_sft")
    took = done()
    speed = max(took / (STARTUP_SECONDS + steps * STEP_SECONDS["teacher_sft"]), 0.5)
    teacher_ckpt = out / "teacher_sft" / CKPT.format(last)
    teacher_from = [
        f"teacher_checkpointer.checkpoint_dir={teacher_ckpt.parent}",
        f"teacher_checkpointer.checkpoint_files=[{teacher_ckpt.name}]",
    ]

    stage(3, f"student KD (2 layers, dim 128) from that teacher, {steps} steps", estimate("student_kd"))
    kd = run("kd", "student_kd", *teacher_from)
    done()

    stage(4, f"the same student without KD, {steps} steps", estimate("student_sft"))
    control = run(
        "sft",
        "student_sft",
        "model._component_=tune_losses.tiny.tiny_student",
        "checkpointer.checkpoint_dir=assets/tiny/student",
    )
    done()

    # Offline KD: the teacher runs once over the training set into a cache, then the student trains
    # from the cache alone. The quick demo caches the top 32; --full and --all-caches add 8 and 128 and
    # 8/32/128 draws.
    variants = [("topk", 8), ("topk", 32), ("topk", 128), ("sample", 8), ("sample", 32), ("sample", 128)]
    variants = variants if args.full or args.all_caches else [("topk", 32)]
    n_train_batches = n_train // BATCH_SIZE
    cache_estimate = len(variants) * speed * (STARTUP_SECONDS + n_train_batches * STEP_SECONDS["cache_teacher"])
    stage(5, f"teacher cache ({', '.join(f'{m} {k}' for m, k in variants)}), one teacher pass each", cache_estimate)
    caches, cache_seconds = {}, {}
    for mode, k in variants:
        name = f"cache_{mode}{k}"
        shutil.rmtree(out / name, ignore_errors=True)  # a rerun's teacher is a new one: a new cache
        t0 = time.time()
        tune_run(
            "cache_teacher",
            "cache_teacher",
            out / name,
            1,
            f"tokenizer.max_seq_len={args.max_seq_len}",
            *teacher_from,
            f"cache.mode={mode}",
            f"cache.k={k}",
        )
        caches[(mode, k)] = out / name
        cache_seconds[(mode, k)] = time.time() - t0
    done()

    stage(
        6,
        f"the same student distilled from each cache (no teacher loaded), {steps} steps",
        len(variants) * estimate("student_offline"),
    )
    offline = {}
    for mode, k in variants:
        offline[(mode, k)] = run("kd_offline", f"student_offline_{mode}{k}", f"teacher_cache={caches[(mode, k)]}")
    done()

    stage(7, "loss peak memory, chunked-output losses (one step each)", 2 * STARTUP_SECONDS * speed)
    chunked = ["stop_after_steps=1", "loss._component_=tune_losses.CEWithChunkedOutputLoss", "loss.num_output_chunks=8"]
    sft_chunked = run("sft", "teacher_sft_chunked", *chunked, n_steps=1)
    # CEWithChunkedOutputLoss takes none of the fused KD loss's keys; the KD term comes from kd_loss.
    kd_chunked = run(
        "kd", "student_kd_chunked", *chunked, "~loss.kd_ratio", "~loss.divergence", "~loss.temperature", n_steps=1
    )
    done()

    stage(8, "held-out losses and the plot", STARTUP_SECONDS * speed)
    held = {
        "teacher SFT": heldout_loss(tiny_teacher, teacher_ckpt, args.max_seq_len),
        "student KD": heldout_loss(tiny_student, out / "student_kd" / CKPT.format(last), args.max_seq_len),
        "student without KD": heldout_loss(tiny_student, out / "student_sft" / CKPT.format(last), args.max_seq_len),
    }
    held_offline = {
        v: heldout_loss(tiny_student, out / f"student_offline_{v[0]}{v[1]}" / CKPT.format(last), args.max_seq_len)
        for v in variants
    }
    shape = re.search(r"loss peak memory .*?batch \((\d+), (\d+)\)", (out / "teacher_sft.log").read_text())
    first_batch = f"{shape.group(1)} x {shape.group(2)} tokens" if shape else "first batch"
    mem = {
        "SFT (teacher)": (sft_chunked[0]["loss_peak_memory_mib"], teacher[0]["loss_peak_memory_mib"]),
        "KD (student + teacher)": (kd_chunked[0]["loss_peak_memory_mib"], kd[0]["loss_peak_memory_mib"]),
    }
    plot(
        {"teacher SFT": (teacher, "loss"), "student KD": (kd, "class_loss"), "student without KD": (control, "loss")},
        held,
        out / "loss_curves.png",
        f"tune-losses tiny demo ({epochs} epoch{'s' if epochs > 1 else ''} per run, seed {args.seed}): the KD curve is its CE part",
    )
    done()

    final = lambda m, k="loss": m[max(s for s in m if k in m[s])][k]  # noqa: E731
    seconds = time.time() - start
    margin = held["student without KD"] - held["student KD"]
    offline_rows = offline_table(
        kd, control, offline, held, held_offline, caches, cache_seconds, teacher_ckpt.stat().st_size / 2**20
    )
    lines = [
        "# tune-losses tiny demo",
        "",
        f"CPU fp32, {epochs} epoch(s) per run ({steps} steps, batch {BATCH_SIZE}), max_seq_len "
        f"{args.max_seq_len}, vocab 4096, seed {args.seed}; {_clock(seconds)} in all "
        f"(load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} cores).",
        "",
        "| run | final training loss | held-out loss (nats/token) |",
        "|---|---|---|",
        f"| teacher SFT (fused CE) | {final(teacher):.3f} | {held['teacher SFT']:.3f} |",
        f"| student KD (fused CE+KD), class loss | {final(kd, 'class_loss'):.3f} | {held['student KD']:.3f} |",
        f"| student without KD (fused CE) | {final(control):.3f} | {held['student without KD']:.3f} |",
        "",
        f"KD lowers the student's held-out loss by {margin:.3f} nats/token.",
        "",
        "Offline distillation: the student trained from a teacher cache (recipes/cache_teacher.py, then "
        "recipes/kd_offline_single_device.py; no teacher in memory) beside online KD and no KD. Step: median "
        "seconds of an optimizer step (steps 2 on); peak RSS: the training process's peak resident memory; "
        "loss peak: output projection + loss, forward + backward, first batch.",
        "",
        "| student | held-out loss | step (s) | peak RSS (MiB) | loss peak (MiB) | teacher |",
        "|---|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in offline_rows],
        "",
        f"Loss peak memory (output projection + loss, forward + backward, first batch: {first_batch}):",
        "",
        "| loss | chunked-output (MiB) | fused (MiB) | fused / chunked |",
        "|---|---|---|---|",
        *[f"| {k} | {c:.1f} | {f:.1f} | {f / c:.2f}x |" for k, (c, f) in mem.items()],
        "",
        f"Loss curves: {out / 'loss_curves.png'}",
    ]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "epochs": epochs,
                "steps": steps,
                "seed": args.seed,
                "seconds": round(seconds, 1),
                "load_start": load,
                "heldout": held,
                "kd_margin": margin,
                "final_train": {
                    "teacher SFT": final(teacher),
                    "student KD": final(kd, "class_loss"),
                    "student without KD": final(control),
                },
                "loss_peak_memory_mib": {k: {"chunked": c, "fused": f} for k, (c, f) in mem.items()},
                "offline_kd": [dict(zip(OFFLINE_COLUMNS, row)) for row in offline_rows],
                "first_batch": first_batch,
            },
            indent=2,
        )
        + "\n"
    )
    print("\n" + summary)


if __name__ == "__main__":
    main()
