"""What `pip install tune-losses` promises: torch is the one dependency, extras carry lower bounds,
and a part whose extra is missing says which extra to install.

Slow: a throwaway venv with torch alone (the CPU wheel of constraints.txt) and this repository
installed without dependencies imports the package, runs a fused loss forward and backward, and
gets an ImportError naming the extra for each optional part.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].split("!")[0].strip()


def test_torch_is_the_only_dependency_and_extras_have_no_pins():
    project = _project()
    assert [_name(r) for r in project["dependencies"]] == ["torch"]
    for extra, reqs in project["optional-dependencies"].items():
        for r in reqs:
            assert "==" not in r and "<" not in r, f"[{extra}] {r}: extras carry lower bounds only"
    hf = [_name(r) for r in project["optional-dependencies"]["hf"]]
    assert not {"torchtune", "torchao", "tune-losses"} & set(hf), hf


def test_constraints_pin_every_package_the_extras_name():
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    names = {_name(r).lower() for reqs in _project()["optional-dependencies"].values() for r in reqs}
    names |= {"torch"}
    assert names - {"tune-losses"} <= pins, sorted(names - pins - {"tune-losses"})


def test_a_missing_extra_names_it(monkeypatch):
    import importlib.util

    from tune_losses.extras import require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "omegaconf" else real(n, *a))
    with pytest.raises(
        ImportError, match=r"tune_losses.training needs omegaconf, .*pip install 'tune-losses\[train\]'"
    ):
        require_extra("train", "tune_losses.training", ("omegaconf", "torch"))
    require_extra("train", "tune_losses.training", ("torch",))


_TORCH_ONLY_CHECK = r"""
import importlib, importlib.util
import torch
import tune_losses as tl
assert importlib.util.find_spec("torchtune") is None and importlib.util.find_spec("omegaconf") is None
x = torch.randn(2, 5, 8, requires_grad=True)
w = torch.randn(11, 8, requires_grad=True)
y = torch.randint(0, 11, (2, 5))
loss = tl.linear_cross_entropy(x, w, y)
loss.backward()
ref = torch.nn.functional.cross_entropy((x @ w.T).reshape(-1, 11), y.reshape(-1))
torch.testing.assert_close(loss, ref)
for part, extra in [("tune_losses.training", "train"), ("tune_losses.tiny", "train"),
                    ("tune_losses.integrations.trl", "hf")]:
    try:
        importlib.import_module(part)
    except ImportError as e:
        assert f"pip install 'tune-losses[{extra}]'" in str(e), str(e)
    else:
        raise AssertionError(f"{part} imported without its extra")
print("torch-only ok", tl.__version__)
"""


@pytest.mark.slow
def test_torch_only_environment(tmp_path):
    """A fresh venv with torch alone: the losses import and run (about 2-3 min: torch's wheel)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["-c", str(ROOT / "constraints.txt"), "torch"], check=True, timeout=900)
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True, timeout=300)
    out = subprocess.run(
        [py, "-W", "ignore", "-c", _TORCH_ONLY_CHECK],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch-only ok" in out.stdout
