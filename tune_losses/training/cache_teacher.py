"""Recipe body of ``recipes/cache_teacher.py``: run a teacher once over a dataset and write its cache.

    tune run recipes/cache_teacher.py --config configs/tiny/cache_teacher.yaml
    tune run --nproc_per_node 2 recipes/cache_teacher.py --config configs/tiny/cache_teacher.yaml

No gradient, the teacher in eval mode, one batch of logits alive at a time. Under torchrun every rank
holds the whole teacher (inference needs no sharded optimizer state) and writes its own shards
(:class:`tune_losses.distill_cache.CacheWriter`); rank 0 writes ``index.json`` once all have finished.
A rerun after a kill skips the complete shards. Config keys: see configs/tiny/cache_teacher.yaml.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from tune_losses.distill_cache import CacheSpec, CacheWriter, files_sha256, write_shards
from tune_losses.heads import output_projection
from tune_losses.training.distributed import Parallelism, barrier, init_process_group
from tune_losses.training.loop import run
from tune_losses.training.model import build_model
from tune_losses.training.settings import warn_unknown_keys

log = utils.get_logger("INFO")

CONFIG_KEYS = (
    "output_dir",
    "teacher_model",
    "teacher_checkpointer",
    "tokenizer",
    "dataset",
    "cache",
    "batch_size",
    "device",
    "dtype",
    "process_group_timeout_s",
    "metric_logger",
)


def refuse_packed(cfg_dataset: DictConfig) -> None:
    """A packed sample mixes documents under a block mask: the cache is made and read per document."""
    if cfg_dataset.get("packed", False):
        raise ValueError("dataset.packed: expected false for a teacher cache (it is written per sequence), got true")


def tokenizer_record(cfg_tokenizer: DictConfig) -> Dict[str, Any]:
    path = cfg_tokenizer.get("path", None)
    return {
        "component": cfg_tokenizer.get("_component_"),
        "path": path,
        "max_seq_len": cfg_tokenizer.get("max_seq_len", None),
        "sha256": files_sha256([path]) if path and Path(path).is_file() else None,
    }


def checkpoint_paths(cfg_ckpt: DictConfig) -> List[Path]:
    return [Path(cfg_ckpt.checkpoint_dir) / f for f in cfg_ckpt.checkpoint_files]


class CacheTeacherRecipe:
    """setup / train / cleanup, torchtune-shaped (``train`` runs the teacher and writes the cache, so
    :func:`tune_losses.training.loop.run` drives it as it drives the training recipes); ``output_dir``
    receives the cache."""

    def __init__(self, cfg: DictConfig):
        self.device = utils.get_device(cfg.device)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.timeout_s = float(cfg.get("process_group_timeout_s", 600))
        if self.distributed:
            init_process_group(self.device, self.timeout_s)
        self.par = Parallelism.build(self.device, self.distributed, 1)
        if self.par.is_rank_zero:
            warn_unknown_keys(cfg, CONFIG_KEYS)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)

    def setup(self, cfg: DictConfig) -> None:
        refuse_packed(cfg.dataset)
        self.metric_logger = None
        if self.par.is_rank_zero and cfg.get("metric_logger", None) is not None:
            self.metric_logger = config.instantiate(cfg.metric_logger)
        self.output_dir = Path(cfg.output_dir)
        self.batch_size = int(cfg.batch_size)
        c = cfg.cache
        self.sequences_per_shard = int(c.get("sequences_per_shard", 256))
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.ds = config.instantiate(cfg.dataset, self.tokenizer)
        state = config.instantiate(cfg.teacher_checkpointer).load_checkpoint()[training.MODEL_KEY]
        self.teacher = build_model(
            cfg.teacher_model,
            state,
            device=self.device,
            dtype=self.dtype,
            trainable=False,
            distributed=False,  # every rank runs the whole teacher on its own shards
            par=self.par,
        )
        self.teacher.eval()
        vocab = int(output_projection(self.teacher).weight.shape[0])
        teacher_cfg = OmegaConf.to_container(cfg.teacher_model, resolve=True)
        files = checkpoint_paths(cfg.teacher_checkpointer)
        self.spec = CacheSpec(
            vocab_size=vocab,
            k=int(c.k),
            mode=str(c.get("mode", "topk")),
            temperature=float(c.get("temperature", 1.0)),
            logprob_dtype=str(c.get("logprob_dtype", "float16")),
            seed=int(c.get("seed", 0)),
            teacher={
                "model": teacher_cfg,
                "checkpoint_dir": str(cfg.teacher_checkpointer.checkpoint_dir),
                "checkpoint_files": [f.name for f in files],
                "sha256": files_sha256(files),
            },
            tokenizer=tokenizer_record(cfg.tokenizer),
        )

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.teacher(tokens)
        return torch.cat(out, dim=1) if isinstance(out, list) else out  # chunked-output models

    def train(self) -> None:
        p = self.par
        writer = CacheWriter(
            self.output_dir, self.spec, len(self.ds), self.sequences_per_shard, rank=p.rank, world_size=p.world_size
        )
        start = time.perf_counter()

        def progress(done: int, total: int) -> None:
            log.info(f"rank {p.rank}: shard {done}/{total} written ({time.perf_counter() - start:.1f} s)")

        n = write_shards(
            writer,
            self._logits,
            lambda i: self.ds[i]["tokens"],
            batch_size=self.batch_size,
            pad_id=int(getattr(self.tokenizer, "pad_id", 0) or 0),
            device=self.device,
            on_shard=progress,
        )
        skipped = len(writer.mine) - n
        log.info(f"rank {p.rank}: wrote {n} shard(s), kept {skipped} complete one(s) from an earlier run")
        barrier("barrier before writing the cache index", self.timeout_s)
        if p.is_rank_zero:
            index = writer.write_index()
            size = sum(f.stat().st_size for f in self.output_dir.iterdir() if f.is_file())
            seconds = time.perf_counter() - start
            log.info(
                f"teacher cache complete: {index} ({len(writer.ranges)} shards, {len(self.ds)} sequences, "
                f"k={self.spec.k} {self.spec.mode}, {size / 2**20:.1f} MiB, {seconds:.1f} s)"
            )
            if self.metric_logger is not None:
                summary = {"sequences": len(self.ds), "shards_written": n, "shards_kept": skipped}
                summary.update(cache_mib=size / 2**20, seconds=seconds)
                self.metric_logger.log_dict(summary, step=0)
        barrier("barrier after writing the cache index", self.timeout_s)

    def cleanup(self) -> None:
        if getattr(self, "metric_logger", None) is not None:
            self.metric_logger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_cache_teacher(cfg: DictConfig) -> None:
    """Entry point of recipes/cache_teacher.py: setup, train (write the cache), and cleanup even on error."""
    run(CacheTeacherRecipe, cfg)
