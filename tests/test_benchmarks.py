"""The benchmark command runs end to end (``python -m benchmarks.run --quick``) and writes its outputs."""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        # A smoke test, not a timing: generous, since a cold torch.compile cache and a loaded 2-core
        # machine (it took > 170 s beside other test suites) slow it down.
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | peak MiB |" in proc.stdout
    assert "Targets (CPU fp32" in proc.stdout

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
