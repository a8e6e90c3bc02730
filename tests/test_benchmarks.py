"""The benchmark commands run end to end and write their outputs: ``python -m benchmarks.run --quick``
(CE / KD) and ``python -m benchmarks.alignment --quick`` (DPO / GRPO: memory in fresh processes,
interleaved timing, and every method's loss and gradient agree with full logits)."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(module: str, *args: str) -> str:
    """``python -m benchmarks.<module> *args`` from the repository root, offline; its stdout (the table)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        # A smoke test, not a timing: generous, since a cold torch.compile cache and a loaded 2-core
        # machine (it took > 170 s beside other test suites) slow it down.
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    stdout = run_benchmark("run", "--quick", "--out", str(tmp_path))
    assert "| method | peak MiB |" in stdout
    assert "Targets (CPU fp32" in stdout

    results = json.loads((tmp_path / "results.json").read_text())
    assert {c["task"] for c in results["cases"]} == {"ce", "kd"}
    for case in results["cases"]:
        assert case["methods"]["floor"]["time_s"] > 0  # the matmul floor, timed in the same run
        for method in ("plain", "ours", "ours_eager", "ours_recompute"):
            entry = case["methods"][method]
            assert entry["status"] == "ok", (case["task"], method, entry)
            assert entry["peak_bytes"] > 0 and entry["time_s"] > 0
        # Peers that cannot run here are reported with a reason, never dropped.
        assert all(e["status"] == "ok" or e["reason"] for e in case["methods"].values())
    assert "| method | peak MiB |" in (tmp_path / "results.md").read_text()
    png = tmp_path / "memory_vs_tokens.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_alignment_benchmark(tmp_path):
    out = tmp_path / "alignment.json"
    stdout = run_benchmark("alignment", "--quick", "--reps", "1", "--rounds", "1", "--json", str(out))
    assert "| case | method | peak MiB |" in stdout
    results = json.loads(out.read_text())["results"]
    for case in ("dpo", "grpo"):
        for method in ("fused", "full"):
            r = results[case][method]
            assert r["peak_mib"] > 0 and r["time_s"] > 0, (case, method, r)
        assert results[case]["fused"]["loss_rel_err"] < 1e-4 and results[case]["fused"]["grad_rel_err"] < 1e-3
        assert results[case]["fused"]["peak_mib"] < results[case]["full"]["peak_mib"]
        # Liger-Kernel is optional (never a dependency): reported with its error when absent.
        assert "time_s" in results[case]["liger"] or "error" in results[case]["liger"]
