"""Turning measurements into the printed table, ``results.md``, the target checks and the plot."""

from __future__ import annotations

from typing import Dict, List, Optional

from benchmarks.cases import TARGET, TASK_TITLES, Size

MIB = 1024 * 1024

# (task, peer) -> {metric: limit}: ours / peer's metric must be <= limit, all at the TARGET size.
TARGET_LIMITS: Dict[tuple, Dict[str, float]] = {
    ("ce", "plain"): {"peak_bytes": 0.10, "time_s": 1.0},
    ("ce", "torch_chunked"): {"peak_bytes": 1.0, "time_s": 0.25},
    ("kd", "torchtune"): {"peak_bytes": 0.15, "time_s": 1.0},
    ("ce", "compile"): {"time_s": 1.0, "peak_bytes": 0.2},
    ("distill", "compile"): {"time_s": 1.0, "peak_bytes": 0.2},
    ("distill", "liger"): {"time_s": 1.0},
    ("distill_jsd", "liger"): {"time_s": 1.0},
}
# The same as (task, peer, metric, limit) rows, in that order.
TARGETS = [
    (task, peer, metric, limit) for (task, peer), limits in TARGET_LIMITS.items() for metric, limit in limits.items()
]


def _ok(entry: dict, metric: str) -> bool:
    return entry.get("status") == "ok" and entry.get(metric) is not None and entry[metric] > 0


def ratio(case: dict, a: str, b: str, metric: str) -> Optional[float]:
    """``a``'s ``metric`` over ``b``'s in one case, or None when either is missing."""
    ea, eb = case["methods"].get(a, {}), case["methods"].get(b, {})
    if not (_ok(ea, metric) and _ok(eb, metric)):
        return None
    return ea[metric] / eb[metric]


def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def _fmt_mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def case_title(case: dict) -> str:
    s = Size(**case["size"])
    fl = case["floor"]
    return (
        f"{case['task'].upper()} ({TASK_TITLES[case['task']]}): N={s.n} tokens, H={s.h}, V={s.v}, "
        f"{s.dtype}, {s.device}. Floor = dX {fl['dX'] / MIB:.1f} + dW {fl['dW'] / MIB:.1f} + "
        f"fp32 lse {fl['lse'] / MIB:.3f} = {fl['total'] / MIB:.1f} MiB"
    )


def case_table(case: dict) -> List[str]:
    """Markdown rows: each method's peak and time, its ratio to plain, and ours' ratio to it."""
    head = (
        "| method | peak MiB | peak / floor | time ms | time / matmul floor | warm-up s | peak vs plain | "
        "time vs plain | ours peak / this | ours time / this |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    floor = case["floor"]["total"]
    for m, e in case["methods"].items():
        if e.get("status") != "ok":
            reason = e.get("reason", "n/a")
            lines.append(f"| {m} | n/a ({reason}) | | | | | | | | |")
            continue
        peak, t, warm = e.get("peak_bytes"), e.get("time_s"), e.get("warmup_s")
        lines.append(
            f"| {m} | {_fmt_mib(peak)} | {_fmt_ratio(None if peak is None else peak / floor)} | "
            f"{'-' if t is None else f'{t * 1e3:.1f}'} | {_fmt_ratio(ratio(case, m, 'floor', 'time_s'))} | "
            f"{'-' if warm is None else f'{warm:.1f}'} | "
            f"{_fmt_ratio(ratio(case, m, 'plain', 'peak_bytes'))} | {_fmt_ratio(ratio(case, m, 'plain', 'time_s'))} | "
            f"{_fmt_ratio(ratio(case, 'ours', m, 'peak_bytes'))} | {_fmt_ratio(ratio(case, 'ours', m, 'time_s'))} |"
        )
    return lines


def check_targets(cases: List[dict]) -> List[dict]:
    """The targets at the TARGET size; ``met`` is None when that size was not measured."""
    by_key = {(c["task"], Size(**c["size"])): c for c in cases}
    out = []
    for task, peer, metric, limit in TARGETS:
        case = by_key.get((task, TARGET))
        r = None if case is None else ratio(case, "ours", peer, metric)
        what = "peak memory" if metric == "peak_bytes" else "time"
        out.append(
            {
                "task": task,
                "peer": peer,
                "metric": metric,
                "limit": limit,
                "ratio": r,
                "met": None if r is None else r <= limit,
                "text": f"{task.upper()}: ours {what} <= {limit:g}x {peer}'s",
            }
        )
    return out


def target_lines(targets: List[dict]) -> List[str]:
    t = TARGET
    lines = [f"Targets (CPU fp32, N={t.n}, H={t.h}, V={t.v}):"]
    for tg in targets:
        if tg["met"] is None:
            status = "not measured in this run"
        else:
            status = f"{'met' if tg['met'] else 'MISSED'} (measured {tg['ratio']:.3f}x)"
        lines.append(f"- {tg['text']}: {status}")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [
        "# tune_losses benchmark",
        "",
        f"Device: {meta['device_name']}; torch {meta['torch']}; threads {meta['threads']}; "
        f"peak memory: {meta['memory_method']}; time: {meta['time_method']}; load average (1, 5, 15 min) "
        f"at start {meta.get('load_average')}, at end {meta.get('load_average_end')}; wall {meta.get('wall_s')} s.",
        "`time / matmul floor`: the method's time over the 3 (CE) or 4 (with a teacher) matmuls alone at the "
        "same shapes; `warm-up s`: the first (untimed) step, which includes any torch.compile compilation.",
        f"Command: `{meta['command']}`",
        "",
    ]
    for case in results["cases"]:
        out += [f"## {case_title(case)}", ""] + case_table(case) + [""]
    out += target_lines(results["targets"])
    out.append("")
    return "\n".join(out)


_COLORS = {
    "plain": "tab:blue",
    "compile": "tab:orange",
    "torchtune": "tab:green",
    "torch_chunked": "tab:red",
    "liger": "tab:pink",
    "cce": "tab:olive",
    "ours": "tab:purple",
    "ours_recompute": "tab:brown",
    "ours_eager": "tab:gray",
}


def plot(results: dict, path: str) -> Optional[str]:
    """Peak memory against N, one line per method, one panel per task (sizes sharing H, V, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c["task"] for c in results["cases"]}, key=list(TASK_TITLES).index)
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(6.5 * max(len(tasks), 1), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        groups: Dict[tuple, List[dict]] = {}
        for c in results["cases"]:
            s = Size(**c["size"])
            if c["task"] == task:
                groups.setdefault((s.h, s.v, s.dtype, s.device), []).append(c)
        (h, v, dtype, device), cases = max(groups.items(), key=lambda kv: len(kv[1]))
        cases.sort(key=lambda c: c["size"]["n"])
        methods = list(cases[0]["methods"])
        for m in methods:
            pts = [
                (c["size"]["n"], c["methods"][m]["peak_bytes"] / MIB)
                for c in cases
                if _ok(c["methods"].get(m, {}), "peak_bytes")
            ]
            if pts:  # one colour per method in both panels; ours_recompute often lies on ours
                ax.plot(
                    *zip(*pts),
                    label=m,
                    color=_COLORS.get(m),
                    marker="x" if m == "ours_recompute" else "o",
                    linestyle=":" if m == "ours_recompute" else "-" if m == "ours" else "--",
                )
        ns = [c["size"]["n"] for c in cases]
        floors = [c["floor"]["total"] / MIB for c in cases]
        if len(ns) > 1:
            ax.plot(ns, floors, color="black", linestyle=":", label="floor (dX+dW+lse)")
        else:  # one size (--quick): a line across the axes, not a lone invisible point
            ax.axhline(floors[0], color="black", linestyle=":", label="floor (dX+dW+lse)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("tokens N")
        ax.set_ylabel("peak memory above inputs (MiB)")
        ax.set_title(f"{task.upper()} fwd+bwd, H={h}, V={v}, {dtype}, {device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
