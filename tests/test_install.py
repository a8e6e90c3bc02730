"""What `pip install tune-losses` promises: torch is the one dependency, extras carry lower bounds,
and a part whose extra is missing says which extra to install.

Slow (CI runs both; each builds a throwaway venv, minutes): a venv with torch alone (the CPU wheel of
constraints.txt) and this repository installed without dependencies imports the package, runs a fused
loss forward and backward, gets an ImportError naming the extra for each optional part, and `pip
check` is clean; a venv with torch, then `.[hf]`, then the newest PEFT: `pip check` clean, no
torchtune or torchao, `patch` working on a PEFT model. Both install packages (a package index or
pip's configured local wheels); TUNE_LOSSES_INSTALL_CHECKS=0 skips them on a machine with neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

fresh_venv = pytest.mark.skipif(
    os.environ.get("TUNE_LOSSES_INSTALL_CHECKS") == "0", reason="TUNE_LOSSES_INSTALL_CHECKS=0: no fresh venvs"
)


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
            version = r.split(";")[0]  # the environment marker may compare with ==
            assert "==" not in version and "<" not in version, f"[{extra}] {r}: extras carry lower bounds only"
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


def test_the_teacher_cache_without_safetensors_names_the_train_extra(monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "safetensors" else real(n, *a))
    for name in [m for m in sys.modules if m.startswith("tune_losses.distill_cache")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards
    with pytest.raises(ImportError, match=r"tune_losses.distill_cache needs safetensors, .*'tune-losses\[train\]'"):
        importlib.import_module("tune_losses.distill_cache")


def _venv_with_torch(tmp_path) -> list:
    """A fresh venv with torch alone (constraints.txt's wheel): its ``python -m pip`` command line."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["install", "-q", "-c", str(ROOT / "constraints.txt"), "torch"], check=True, timeout=900)
    return pip


def _check_and_run(pip: list, script: str, tmp_path, **env: str) -> str:
    """`pip check` is clean in the venv, and ``script`` runs there outside the repository with a bare
    environment (plus ``env``): its output."""
    check = subprocess.run(pip + ["check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    out = subprocess.run(
        [pip[0], "-W", "ignore", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


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
                    ("tune_losses.distill_cache", "train"), ("tune_losses.integrations.trl", "hf")]:
    try:
        importlib.import_module(part)
    except ImportError as e:
        assert f"pip install 'tune-losses[{extra}]'" in str(e), str(e)
    else:
        raise AssertionError(f"{part} imported without its extra")
print("torch-only ok", tl.__version__)
"""


@pytest.mark.slow
@fresh_venv
def test_torch_only_environment(tmp_path):
    """A fresh venv with torch alone: the losses import and run, `pip check` is clean (about 2-3 min:
    torch's wheel)."""
    pip = _venv_with_torch(tmp_path)
    subprocess.run(pip + ["install", "-q", "--no-deps", "-e", str(ROOT)], check=True, timeout=300)
    assert "torch-only ok" in _check_and_run(pip, _TORCH_ONLY_CHECK, tmp_path)


_HF_CHECK = r"""
import importlib.util
import peft, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tune_losses.integrations.transformers import patch
assert importlib.util.find_spec("torchtune") is None and importlib.util.find_spec("torchao") is None
cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4)
torch.manual_seed(0)
model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, 257, (2, 9))
ref = model(input_ids=ids, labels=ids).loss
patch(model)
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
torch.testing.assert_close(loss, ref)
print("hf ok, peft", peft.__version__)
"""


@pytest.mark.slow
@fresh_venv
def test_hf_environment_with_the_newest_peft(tmp_path):
    """torch, then `.[hf]`, then `pip install -U peft`: `pip check` is clean, no torchtune or torchao
    came along, and `patch` runs on a PEFT model with the loss of the unpatched model."""
    pip = _venv_with_torch(tmp_path)
    subprocess.run(pip + ["install", "-q", "-e", f"{ROOT}[hf]"], check=True, timeout=1200)
    subprocess.run(pip + ["install", "-q", "-U", "peft"], check=True, timeout=600)
    assert "hf ok" in _check_and_run(pip, _HF_CHECK, tmp_path, HF_HUB_OFFLINE="1")
