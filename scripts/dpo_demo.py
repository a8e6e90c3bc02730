"""The tiny DPO run of the README: fused DPO of the tiny student on the offline preference pairs, with
held-out reward accuracy before, during and after training, and its plot.

    python scripts/dpo_demo.py [--out outputs/dpo_demo] [tune run overrides ...]

Runs ``tune run recipes/dpo_single_device.py --config configs/tiny/dpo.yaml`` (2 epochs, lr 1e-3,
held-out pairs evaluated every 25 steps), then writes ``<out>/heldout.png`` (and ``docs/dpo_heldout.png``)
and prints the held-out table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(s for s, m in metrics.items() if "eval/rewards/accuracies" in m)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [metrics[s]["eval/rewards/accuracies"] for s in steps], marker="o")
    a.set(xlabel="optimizer step", ylabel="held-out reward accuracy", ylim=(0, 1))
    b.plot(steps, [metrics[s]["eval/loss"] for s in steps], marker="o", label="held-out DPO loss")
    train = sorted(s for s, m in metrics.items() if "loss" in m and s > 0)
    window = 10
    smooth = [
        sum(metrics[t]["loss"] for t in train[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
        for i in range(len(train))
    ]
    b.plot(train, smooth, alpha=0.6, label=f"training loss ({window}-step mean)")
    b.set(xlabel="optimizer step", ylabel="DPO loss")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/dpo_demo")
    args, overrides = parser.parse_known_args()
    out = ROOT / args.out
    tune = str(Path(sys.executable).with_name("tune"))
    cmd = [
        tune,
        "run",
        "recipes/dpo_single_device.py",
        "--config",
        "configs/tiny/dpo.yaml",
        f"output_dir={out}",
        "epochs=2",
        "max_steps_per_epoch=null",
        "optimizer.lr=1e-3",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "tune_losses.tiny"], cwd=ROOT, env=env, check=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)

    from tune_losses.training.metrics import read_metrics

    metrics = read_metrics(out / "logs" / "metrics.txt")
    plot(metrics, out / "heldout.png")
    (ROOT / "docs").mkdir(exist_ok=True)
    shutil.copy(out / "heldout.png", ROOT / "docs" / "dpo_heldout.png")
    print("| step | held-out reward accuracy | held-out margin | held-out DPO loss |\n|---|---|---|---|")
    for s in sorted(s for s, m in metrics.items() if "eval/rewards/accuracies" in m):
        m = metrics[s]
        print(f"| {s} | {m['eval/rewards/accuracies']:.3f} | {m['eval/rewards/margins']:.3f} | {m['eval/loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
