"""First use, as the README tells a new user: its commands, exactly as written, work.

- The README's complete Python example (section "Plain PyTorch") runs as it stands (fast).
- Slow: a clone of this repository's HEAD into a folder named ``tune-losses`` (the obvious name, which
  the virtual environment's path then contains) runs the README's set-up block and its single-device
  ``tune run`` commands for SFT and KD, from the clone root, each with a couple of steps appended as
  overrides. The set-up is the real one: a new ``.venv`` installed by pip (from the local wheels and
  pip's cache, so without the network); a second set-up call must then be a matter of seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(text: str, heading: str) -> str:
    """The README's text under the heading line ``heading`` up to the next heading (code blocks skipped)."""
    out, inside, fenced = [], False, False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            if inside:
                break
            inside = re.sub(r"^#+ ", "", line).strip() == heading
            continue
        if inside:
            out.append(line)
    assert out, f"README.md has no section {heading!r}"
    return "".join(out)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def _commands(block: str) -> list[str]:
    """The command lines of a bash block, comments dropped."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def readme_setup() -> list[str]:
    """The README's set-up block: the first bash block that runs scripts/setup_env.sh."""
    for block in _blocks(README.read_text(), "bash"):
        cmds = _commands(block)
        if any(c.startswith("bash scripts/setup_env.sh") for c in cmds):
            return cmds
    raise AssertionError("README.md has no bash block running scripts/setup_env.sh")


def readme_tune_run(recipe: str) -> str:
    """The README's `tune run` command line for ``recipes/<recipe>.py`` (single device)."""
    for block in _blocks(README.read_text(), "bash"):
        for cmd in _commands(block):
            if cmd.startswith(f"tune run recipes/{recipe}.py"):
                return cmd
    raise AssertionError(f"README.md has no `tune run recipes/{recipe}.py` command")


def test_readme_python_example_runs():
    """The README's Python example is complete: it runs as written, in a fresh namespace."""
    blocks = _blocks(_section(README.read_text(), "Plain PyTorch"), "python")
    assert len(blocks) == 1, "the Plain PyTorch section should hold one complete example"
    exec(compile(blocks[0], "README.md (Plain PyTorch)", "exec"), {"__name__": "__readme__"})


def test_readme_commands_are_found():
    setup = readme_setup()
    assert setup[0].startswith("bash scripts/setup_env.sh")
    assert any(c.startswith("source .venv/bin/activate") for c in setup)
    for recipe in ("sft_single_device", "kd_single_device"):
        assert "--config configs/tiny/" in readme_tune_run(recipe)


@pytest.mark.slow
def test_fresh_clone_runs_the_readme_commands():
    setup = readme_setup()
    sft, kd = readme_tune_run("sft_single_device"), readme_tune_run("kd_single_device")
    short = "stop_after_steps=2 log_every_n_steps=1"
    # A user's shell: no virtual environment of ours active, nothing of this checkout on the path.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT)))
    parent = Path(tempfile.mkdtemp(prefix="first_use_"))
    clone = parent / "tune-losses"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)

        def bash(script: str, timeout: int) -> tuple[str, float]:
            start = time.perf_counter()
            proc = subprocess.run(
                ["bash", "-c", "set -euo pipefail\n" + script],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            took = time.perf_counter() - start
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"exit {proc.returncode} after {took:.0f} s:\n{out[-4000:]}"
            return out, took

        out, t_setup = bash("\n".join(setup), timeout=900)
        assert "Skipping import of cpp extensions" not in out, out
        out, t_again = bash(setup[0], timeout=120)
        assert "pip skipped" in out and t_again < 30, f"repeat set-up took {t_again:.0f} s:\n{out}"
        activate = "source .venv/bin/activate\n"
        out, t_sft = bash(activate + f"{sft} {short}", timeout=600)
        assert "Skipping import of cpp extensions" not in out, out
        out, t_kd = bash(activate + f"{kd} {short}", timeout=600)
        for run in ("sft_teacher", "kd_student"):
            metrics = (clone / "outputs" / "tiny" / run / "logs" / "metrics.txt").read_text()
            assert re.search(r"^Step 2 \| .*loss:", metrics, re.M), metrics
        print(
            f"\nfresh clone: set-up {t_setup:.0f} s, repeat set-up {t_again:.1f} s, "
            f"SFT (2 steps) {t_sft:.0f} s, KD (2 steps) {t_kd:.0f} s, load {os.getloadavg()[0]:.1f}"
        )
    finally:
        shutil.rmtree(parent, ignore_errors=True)
