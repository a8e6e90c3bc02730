"""The main job on the embedded offline default: train a teacher, distill a student, show the result.

    bash scripts/demo.sh            # set-up included; or, with the environment active:
    python scripts/demo.py [--epochs 2] [--out outputs/demo]

Stages (each a real `tune run` of this repository's recipes on CPU, fp32):
1. build the tiny assets (Python's own documentation, a SentencePiece tokenizer, tiny llama models);
2. SFT of the teacher with the fused linear cross-entropy;
3. KD of the student from that teacher with the fused distillation loss;
4. SFT of the same student without KD (the control), same steps and data;
5. one-step runs with the chunked-output losses, to compare the loss's peak memory with fused;
6. held-out loss of teacher, distilled student and control student; loss curves as a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from tune_losses.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

CKPT = "epoch_{}/model-00001-of-00001.bin"


def tune_run(recipe: str, config: str, out: Path, *overrides: str) -> dict:
    """Run one recipe with `tune run`, streaming its progress bar; return its logged metrics by step."""
    cmd = [str(Path(sys.executable).with_name("tune")), "run", f"recipes/{recipe}.py", "--config",
           f"configs/tiny/{config}.yaml", f"output_dir={out}", *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log_file = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "logs" / "metrics.txt"
    if metrics_file.exists():
        metrics_file.unlink()  # DiskLogger appends; a rerun of the demo starts its curves afresh
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # tqdm writes to stderr: show the bar, keep the rest in the log
            log.write(line)
            if line.startswith(("sft", "kd")) or "loss peak memory" in line:
                print("  " + line.rstrip()[-150:], flush=True)
        if proc.wait() != 0:
            sys.exit(f"stage failed: see {log_file}")
    return read_metrics(metrics_file)


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
    total, count = 0.0, 0
    for line in (ROOT / "assets/tiny/data/heldout.jsonl").read_text().splitlines():
        ids = tok.encode(json.loads(line)["text"], add_bos=True, add_eos=True)[:max_seq_len]
        x = torch.tensor(ids[:-1])[None]
        y = torch.tensor(ids[1:])[None]
        total += float(linear_cross_entropy(model(x), proj.weight, y, reduction="sum"))
        count += y.numel()
    return total / count


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (steps, key) in curves.items():
        xs = sorted(s for s in steps if s > 0 and key in steps[s])
        ax.plot(xs, [steps[s][key] for s in xs], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training cross-entropy (nats / token)")
    ax.set_title("tune-losses tiny demo: teacher SFT, student with and without KD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/demo", help="where runs, logs, plot and summary go")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    args = p.parse_args()
    os.chdir(ROOT)
    out = ROOT / args.out
    start = time.time()

    from tune_losses.tiny import build, tiny_student, tiny_teacher

    build(ROOT / "assets" / "tiny")
    common = [f"epochs={args.epochs}", f"tokenizer.max_seq_len={args.max_seq_len}"]
    last = args.epochs - 1

    teacher = tune_run("sft_single_device", "sft", out / "teacher_sft", *common)
    teacher_ckpt = out / "teacher_sft" / CKPT.format(last)
    kd = tune_run("kd_single_device", "kd", out / "student_kd", *common,
                  f"teacher_checkpointer.checkpoint_dir={teacher_ckpt.parent}",
                  f"teacher_checkpointer.checkpoint_files=[{teacher_ckpt.name}]")
    control = tune_run("sft_single_device", "sft", out / "student_sft", *common,
                       "model._component_=tune_losses.tiny.tiny_student",
                       "checkpointer.checkpoint_dir=assets/tiny/student")
    # The chunked-output path, one step each, for the loss's peak memory beside the fused runs'.
    one = [*common, "stop_after_steps=1"]
    sft_chunked = tune_run("sft_single_device", "sft", out / "teacher_sft_chunked", *one,
                           "loss._component_=tune_losses.CEWithChunkedOutputLoss", "loss.num_output_chunks=8")
    kd_chunked = tune_run("kd_single_device", "kd", out / "student_kd_chunked", *one,
                          "loss._component_=tune_losses.CEWithChunkedOutputLoss", "~loss.kd_ratio",
                          "~loss.divergence", "~loss.temperature", "loss.num_output_chunks=8")

    held = {
        "teacher (SFT)": heldout_loss(tiny_teacher, teacher_ckpt, args.max_seq_len),
        "student with KD": heldout_loss(tiny_student, out / "student_kd" / CKPT.format(last), args.max_seq_len),
        "student without KD": heldout_loss(tiny_student, out / "student_sft" / CKPT.format(last), args.max_seq_len),
    }
    mem = {
        "SFT (teacher)": (sft_chunked[0]["loss_peak_memory_mib"], teacher[0]["loss_peak_memory_mib"]),
        "KD (student + teacher)": (kd_chunked[0]["loss_peak_memory_mib"], kd[0]["loss_peak_memory_mib"]),
    }
    plot({"teacher SFT": (teacher, "loss"), "student KD: class_loss": (kd, "class_loss"),
          "student without KD": (control, "loss")}, out / "loss_curves.png")

    final = lambda m, k="loss": m[max(s for s in m if k in m[s])][k]  # noqa: E731
    lines = [
        "# tune-losses tiny demo",
        "",
        f"CPU fp32, {args.epochs} epochs, batch 8, max_seq_len {args.max_seq_len}, vocab 4096; "
        f"{time.time() - start:.0f} s in all.",
        "",
        "| run | final training loss | held-out loss (nats/token) |",
        "|---|---|---|",
        f"| teacher SFT (fused CE) | {final(teacher):.3f} | {held['teacher (SFT)']:.3f} |",
        f"| student KD (fused CE+KD), class loss | {final(kd, 'class_loss'):.3f} | {held['student with KD']:.3f} |",
        f"| student without KD (fused CE) | {final(control):.3f} | {held['student without KD']:.3f} |",
        "",
        "Loss peak memory (output projection + loss, forward + backward, first batch):",
        "",
        "| loss | chunked-output (MiB) | fused (MiB) | fused / chunked |",
        "|---|---|---|---|",
        *[f"| {k} | {c:.1f} | {f:.1f} | {f / c:.2f}x |" for k, (c, f) in mem.items()],
        "",
        f"Loss curves: {out / 'loss_curves.png'}",
    ]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)


if __name__ == "__main__":
    main()
