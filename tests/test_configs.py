"""Every YAML in configs/ instantiates: every `_component_` resolves and takes the arguments given.

Models (student and teacher) are built for real on the meta device (no weights, no memory); losses,
optimizers, schedulers and metric loggers are instantiated; components that need files that only
exist after a download (tokenizers, checkpointers, datasets of real configs) are resolved and their
arguments bound to the signature. The tiny configs' file-backed components are built for real.
"""

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.config._utils import _get_component_from_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
MODEL_KEYS = ("model", "teacher_model")
FILE_KEYS = ("tokenizer", "checkpointer", "teacher_checkpointer", "dataset")


def _components(node, path=()):
    if OmegaConf.is_dict(node):
        if "_component_" in node:
            yield path, node
        for k, v in node.items():
            yield from _components(v, path + (k,))


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"tiny/sft.yaml", "tiny/kd.yaml"} <= names
    assert any("llama3_2" in n and "sft" in n for n in names)
    assert any("8B_to_1B" in n for n in names)
    assert any("qwen2_5" in n and "kd" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_component_instantiates(path, tmp_path, tiny_assets):
    cfg = OmegaConf.load(path)
    cfg.output_dir = str(tmp_path / "out")
    text = path.read_text()
    assert text.lstrip().startswith("#") and "tune run" in text.split("\n\n")[0], (
        "config must open with its tune run command"
    )
    is_tiny = path.parent.name == "tiny"
    seen = 0
    for keys, node in _components(cfg):
        seen += 1
        top = keys[0]
        fn = _get_component_from_path(node._component_)
        if top in MODEL_KEYS:
            with torch.device("meta"):
                model = config.instantiate(node)
            assert sum(p.numel() for p in model.parameters()) > 0
        elif top == "optimizer":
            opt = config.instantiate(node, [torch.nn.Parameter(torch.zeros(2))])
            if "lr_scheduler" in cfg:
                config.instantiate(cfg.lr_scheduler, opt, num_training_steps=10)
        elif top in ("loss", "kd_loss", "metric_logger"):
            config.instantiate(node)
        elif top == "lr_scheduler":
            continue  # built with the optimizer above
        elif top in FILE_KEYS and is_tiny:
            if top == "dataset":
                config.instantiate(node, config.instantiate(cfg.tokenizer))
            else:
                config.instantiate(node)
        else:
            args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "_component_"}
            inspect.signature(fn).bind_partial(**args)
    assert seen >= 5
