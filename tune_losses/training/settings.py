"""The loop's scalar settings, read from the YAML config once and checked at setup.

A meaningless value (``gradient_accumulation_steps: 0``, ``max_steps_per_epoch: 0``) is rejected here,
naming the key and the value, instead of surfacing as a ``ZeroDivisionError`` mid-run or a run of zero
steps that exports untrained weights. Unknown top-level keys (typos such as ``batch_sise``) are
warned about once, with the nearest known key.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, fields
from typing import Any, Iterable, List, Optional

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Top-level keys that hold components or are read elsewhere than LoopSettings.
COMPONENT_KEYS = frozenset(
    {
        "model",
        "tokenizer",
        "checkpointer",
        "dataset",
        "loss",
        "optimizer",
        "lr_scheduler",
        "metric_logger",
        "device",
        "dtype",
        "teacher_model",
        "teacher_checkpointer",
        "kd_loss",
        "kd_ratio",
        # DPO (tune_losses.training.dpo)
        "ref_model",
        "ref_checkpointer",
        "eval_dataset",
        "eval_every_n_steps",
        "eval_batch_size",
        # offline KD (tune_losses.training.offline_kd)
        "teacher_cache",
    }
)


def _check_int(key: str, value: Any, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or null" if allow_none else "")
        raise ValueError(f"{key}: expected {expected}, got {value!r}")
    return value


def _check_float(key: str, value: Any, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < float(value) < float("inf")
    if not ok:
        raise ValueError(
            f"{key}: expected a finite number > 0" + (" or null" if allow_none else "") + f", got {value!r}"
        )
    return float(value)


def _check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class LoopSettings:
    """Every non-component setting of the loop; see configs/tiny/sft.yaml for each, commented."""

    output_dir: str
    epochs: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    max_steps_per_epoch: Optional[int] = None
    clip_grad_norm: Optional[float] = None
    log_every_n_steps: int = 1
    save_every_n_steps: Optional[int] = None
    stop_after_steps: Optional[int] = None
    max_nonfinite_steps: int = 3
    process_group_timeout_s: float = 600.0
    seed: int = 0
    shuffle: bool = True
    resume_from_checkpoint: bool = False
    tensor_parallel_dim: int = 1
    log_loss_memory: bool = False
    enable_activation_checkpointing: bool = False
    progress_every_n_steps: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: expected a non-empty path, got {self.output_dir!r}")
        for key in (
            "epochs",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every_n_steps",
            "max_nonfinite_steps",
            "tensor_parallel_dim",
        ):
            _check_int(key, getattr(self, key), 1)
        _check_int("seed", self.seed, 0)
        for key in ("max_steps_per_epoch", "save_every_n_steps", "stop_after_steps", "progress_every_n_steps"):
            _check_int(key, getattr(self, key), 1, allow_none=True)
        _check_float("clip_grad_norm", self.clip_grad_norm, allow_none=True)
        _check_float("process_group_timeout_s", self.process_group_timeout_s)
        for key in ("shuffle", "resume_from_checkpoint", "log_loss_memory", "enable_activation_checkpointing"):
            _check_bool(key, getattr(self, key))

    @classmethod
    def from_config(cls, cfg: DictConfig) -> LoopSettings:
        """Read every field from ``cfg`` (missing keys take the defaults; ``seed: null`` is 0)."""
        values = {}
        for f in fields(cls):
            if f.name in cfg:
                values[f.name] = cfg[f.name]
        if values.get("seed", 0) is None:
            values["seed"] = 0  # every rank and every resumed run must agree on it
        if (
            "clip_grad_norm" in values
            and isinstance(values["clip_grad_norm"], int)
            and not isinstance(values["clip_grad_norm"], bool)
        ):
            values["clip_grad_norm"] = float(values["clip_grad_norm"])
        missing = [k for k in ("output_dir", "epochs", "batch_size") if k not in values]
        if missing:
            raise ValueError(f"config: missing required key(s) {missing}")
        return cls(**values)


def known_keys(extra: Iterable[str] = ()) -> frozenset:
    return frozenset(f.name for f in fields(LoopSettings)) | COMPONENT_KEYS | frozenset(extra)


def warn_unknown_keys(cfg: DictConfig, known: Iterable[str]) -> List[str]:
    """Warn once per unknown top-level key of ``cfg``, naming the nearest known key; returns them."""
    known = sorted(known)
    unknown = [k for k in cfg.keys() if k not in known]
    for key in unknown:
        near = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        log.warning(f"config: unknown top-level key {key!r} is ignored{hint}")
    return unknown
