"""The alignment benchmark runs end to end (``python -m benchmarks.alignment --quick``): memory in fresh
processes, interleaved timing, and every method's loss and gradient agree with full logits."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_alignment_benchmark(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = tmp_path / "alignment.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.alignment", "--quick", "--reps", "1", "--rounds", "1", "--json", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| case | method | peak MiB |" in proc.stdout
    results = json.loads(out.read_text())["results"]
    for case in ("dpo", "grpo"):
        for method in ("fused", "full"):
            r = results[case][method]
            assert r["peak_mib"] > 0 and r["time_s"] > 0, (case, method, r)
        assert results[case]["fused"]["loss_rel_err"] < 1e-4 and results[case]["fused"]["grad_rel_err"] < 1e-3
        assert results[case]["fused"]["peak_mib"] < results[case]["full"]["peak_mib"]
        # Liger-Kernel is optional (never a dependency): reported with its error when absent.
        assert "time_s" in results[case]["liger"] or "error" in results[case]["liger"]
