"""Alignment-loss benchmark: fused DPO and GRPO against full logits and Liger-Kernel, one command.

    python -m benchmarks.alignment                # N=2048 tokens, H=256, V=32768, fp32, CPU (~10 min)
    python -m benchmarks.alignment --quick        # small sizes, a smoke run (~1 min)

Cases (forward + backward of one loss call, the policy's hidden states, weight and bias-free):

* ``dpo``: B pairs = 2B sequences of S tokens (2B * S = N), a frozen reference (its hidden states and
  weight) inside the call, sigmoid DPO, beta 0.1, sequence log-probs summed;
  ``fused`` = :func:`tune_losses.linear_preference_loss`; ``full`` = plain PyTorch on full ``[N, V]``
  logits (reference logits under no-grad); ``liger`` = ``LigerFusedLinearDPOLoss`` (same semantics:
  sum of log-probs, mean over pairs, no NLL term).
* ``grpo``: G completions of S tokens, old and reference log-probs given, beta 0.04, clip 0.2, the
  ``dapo`` aggregation (Liger's default); ``fused`` = :func:`tune_losses.linear_policy_loss` without the
  entropy metric (Liger computes none; its default grad-in-forward path: logits, dX, dW);
  ``full``; ``liger`` = ``LigerFusedLinearGRPOLoss``.

Liger-Kernel's chunked losses are pure PyTorch (``torch.compile``-d per chunk) and run on CPU; install
it in the benchmark's environment only (``pip install liger-kernel``); without it the liger rows say so.
Before timing, each method's loss and hidden-state gradient are checked against ``full``.

Memory (CPU): each (case, method) in a fresh process; after ``--warmup`` untimed steps, peak resident
memory of one step (VmHWM, reset through /proc/self/clear_refs) minus the resident memory held before
it; median of ``--reps``. Time: one process per case, ``--warmup`` untimed steps per method, then the
methods interleaved with a rotating order each round, median of ``--rounds``; the load average is
printed before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

from benchmarks.worker import _reset_hwm, _status_kib, _trim_heap

CASES = ("dpo", "grpo")
METHODS = ("fused", "full", "liger")
DEFAULT = dict(tokens=2048, hidden=256, vocab=32768, seq=256)
QUICK = dict(tokens=512, hidden=64, vocab=4096, seq=64)
# Untimed steps per method first: torch.compile (Liger-Kernel's chunk functions, our compiled chunk math)
# compiles on the first call and may compile again, for dynamic shapes, on the second or third.
WARMUP = 3


# ------------------------------------------------------------------------------------------ inputs


def make_inputs(case: str, tokens: int, hidden: int, vocab: int, seq: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Policy and reference hidden states ``[R, S, H]``, weights ``[V, H]``, labels ``[R, S]`` with an
    ignored prompt of S/4 tokens per row; GRPO adds advantages ``[R]`` and old / reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    rows = tokens // seq
    x = torch.randn(rows, seq, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, : seq // 4] = -100
    inputs = dict(hidden=x, weight=w, labels=labels)
    if case == "dpo":
        inputs["ref_hidden"] = torch.randn(rows, seq, hidden, generator=g)
        inputs["ref_weight"] = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    else:
        with torch.no_grad():
            lp = torch.log_softmax(x @ w.T, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        inputs["advantages"] = torch.randn(rows, generator=g)
        inputs["old_logps"] = lp + 0.1 * torch.randn(rows, seq, generator=g)
        inputs["ref_logps"] = lp + 0.1 * torch.randn(rows, seq, generator=g)
    return inputs


# ----------------------------------------------------------------------------------------- methods


def _full_token_logps(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    mask = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp)), mask


def _policy_side(d):
    """The policy's ``(hidden, weight, labels)``: what every method of both cases starts from."""
    return d["hidden"], d["weight"], d["labels"]


def build(case: str, method: str) -> Callable[[Dict[str, torch.Tensor]], torch.Tensor]:
    """A function of the inputs returning the scalar loss (forward only; the caller runs backward)."""
    import torch.nn.functional as F

    import tune_losses

    if case == "dpo":
        if method == "fused":
            return lambda d: (
                tune_losses.linear_preference_loss(
                    *_policy_side(d),
                    reference=tune_losses.Reference(d["ref_hidden"], d["ref_weight"]),
                    options=tune_losses.PreferenceOptions(beta=0.1),
                ).loss
            )
        if method == "full":

            def full(d):
                lp, _ = _full_token_logps(*_policy_side(d))
                with torch.no_grad():
                    ref, _ = _full_token_logps(d["ref_hidden"], d["ref_weight"], d["labels"])
                seq, ref_seq = lp.sum(-1), ref.sum(-1)
                b = seq.shape[0] // 2
                diff = (seq[:b] - seq[b:]) - (ref_seq[:b] - ref_seq[b:])
                return -F.logsigmoid(0.1 * diff).mean()

            return full
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
        return lambda d: liger(
            d["weight"], d["hidden"], d["labels"], ref_input=d["ref_hidden"], ref_weight=d["ref_weight"]
        )[0]
    if method == "fused":
        return lambda d: (
            tune_losses.linear_policy_loss(
                *_policy_side(d),
                d["advantages"],
                old_logps=d["old_logps"],
                ref_logps=d["ref_logps"],
                options=tune_losses.PolicyOptions(loss_type="dapo", beta=0.04, return_entropy=False),
            ).loss
        )
    if method == "full":

        def full(d):
            lp, mask = _full_token_logps(*_policy_side(d))
            adv = d["advantages"].unsqueeze(-1)
            ratio = torch.exp(lp - d["old_logps"])
            loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
            delta = d["ref_logps"] - lp
            loss = loss + 0.04 * (torch.exp(delta) - delta - 1)
            return torch.where(mask, loss, torch.zeros_like(loss)).sum() / mask.sum().clamp(min=1)

        return full
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    liger = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", use_ref_model=True)  # uses ref_per_token_logps
    return lambda d: liger(
        d["hidden"],
        d["weight"],
        d["labels"].clamp(min=0),
        (d["labels"] != -100).long(),
        d["advantages"],
        ref_per_token_logps=d["ref_logps"],
        old_per_token_logps=d["old_logps"],
    )[0]


def step(fn, d) -> torch.Tensor:
    loss = fn(d)
    loss.backward()
    return loss.detach()


def clear(d) -> None:
    for t in d.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


# ----------------------------------------------------------------------------- measuring (workers)


def worker_memory(case: str, method: str, size: dict, reps: int, warmup: int = WARMUP) -> dict:
    d = make_inputs(case, **size)
    fn = build(case, method)
    for _ in range(warmup):  # compilation (and recompilation) and one-time allocations
        clear(d)
        step(fn, d)
    peaks = []
    for _ in range(reps):
        clear(d)
        _trim_heap()
        base = _status_kib("VmRSS")
        _reset_hwm()  # VmHWM back to the current VmRSS
        step(fn, d)
        peaks.append((_status_kib("VmHWM") - base) / 1024)
    return {"peak_mib": statistics.median(peaks)}


def worker_time(case: str, methods: List[str], size: dict, rounds: int, warmup: int = WARMUP) -> dict:
    d = make_inputs(case, **size)
    fns, checks = {}, {}
    for m in methods:
        try:
            fns[m] = build(case, m)
            clear(d)
            t0 = time.perf_counter()
            loss = step(fns[m], d)
            checks[m] = {"warmup_s": time.perf_counter() - t0, "loss": float(loss), "grad": d["hidden"].grad.clone()}
            for _ in range(warmup - 1):
                clear(d)
                step(fns[m], d)
        except ImportError as e:
            checks[m] = {"error": f"{type(e).__name__}: {e}"}
            fns.pop(m, None)
    ref = checks.get("full", {})
    for c in checks.values():
        if "grad" in c and "grad" in ref:
            c["loss_rel_err"] = abs(c["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
            c["grad_rel_err"] = float((c["grad"] - ref["grad"]).abs().max() / ref["grad"].abs().max().clamp(min=1e-30))
    times: Dict[str, List[float]] = {m: [] for m in fns}
    order = list(fns)
    for r in range(rounds):
        for m in order[r % len(order) :] + order[: r % len(order)]:
            clear(d)
            t0 = time.perf_counter()
            step(fns[m], d)
            times[m].append(time.perf_counter() - t0)
    out = {}
    for m, c in checks.items():
        c.pop("grad", None)
        out[m] = dict(c, **({"time_s": statistics.median(times[m]), "rounds": times[m]} if m in times else {}))
    return out


def _run_worker(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.alignment", "--worker", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------------------- the report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.alignment", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=3, help="memory: steps per process (median)")
    p.add_argument("--rounds", type=int, default=5, help="time: interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps per method first (compilation)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        torch.manual_seed(0)
        fn = worker_memory if job.pop("kind") == "memory" else worker_time
        print("RESULT " + json.dumps(fn(**job)), flush=True)
        return 0

    size = dict(QUICK if args.quick else DEFAULT)
    load0 = os.getloadavg()
    print(
        f"sizes: N={size['tokens']} tokens ({size['tokens'] // size['seq']} sequences x S={size['seq']}), "
        f"H={size['hidden']}, V={size['vocab']}, fp32, CPU, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        flush=True,
    )
    results = {}
    for case in args.cases:
        res = {m: {} for m in args.methods}
        for m in args.methods:
            r = _run_worker(
                dict(kind="memory", case=case, method=m, size=size, reps=args.reps, warmup=args.warmup), timeout=1800
            )
            res[m].update(r)
            print(f"  {case} {m}: memory {r}", flush=True)
        t = _run_worker(
            dict(kind="time", case=case, methods=args.methods, size=size, rounds=args.rounds, warmup=args.warmup),
            timeout=3600,
        )
        for m in args.methods:
            res[m].update(t.get(m, {"error": t.get("error", "?")}) if isinstance(t, dict) else {})
        results[case] = res
    load1 = os.getloadavg()

    print("\n| case | method | peak MiB | x full | time s | x full | x liger | loss err vs full | dX err vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, res in results.items():
        full_mem = res.get("full", {}).get("peak_mib")
        liger_t = res.get("liger", {}).get("time_s")
        full_t = res.get("full", {}).get("time_s")
        for m, r in res.items():
            if "error" in r and "peak_mib" not in r:
                print(f"| {case} | {m} | {r['error']} | | | | | | |")
                continue
            mem, ts = r.get("peak_mib"), r.get("time_s")
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(
                f"| {case} | {m} | {fmt(mem, '.1f')} | {fmt(mem / full_mem if mem and full_mem else None, '.3f')} "
                f"| {fmt(ts, '.3f')} | {fmt(ts / full_t if ts and full_t else None, '.2f')} "
                f"| {fmt(ts / liger_t if ts and liger_t else None, '.2f')} "
                f"| {fmt(r.get('loss_rel_err'), '.1e')} | {fmt(r.get('grad_rel_err'), '.1e')} |"
            )
    print(
        f"\nload average before {load0[0]:.2f}, after {load1[0]:.2f} (1-minute); "
        f"targets: fused peak <= 0.15x full, fused time <= 1.0x liger (GRPO: <= 0.85x full, <= 0.6x liger)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "load": [load0, load1], "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
