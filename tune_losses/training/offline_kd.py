"""Knowledge distillation from a teacher cache: the data side and the recipe class (no teacher loaded).

    tune run recipes/kd_offline_single_device.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR
    tune run --nproc_per_node 2 recipes/kd_offline_distributed.py --config configs/tiny/kd_offline.yaml teacher_cache=DIR

Alignment. The loop shifts labels (``labels[:, t]`` = token ``t + 1``); the cache's row ``t`` of a
sequence is the teacher's distribution over token ``t + 1``. So a batch's ``teacher_ids`` /
``teacher_logprobs`` ``[B, S, k]`` hold row ``t`` at position ``t`` and nothing (id ``-1``,
log-probability ``-inf``) at a sequence's last token and at padding, the positions whose shifted
label is ignored. The loss (``loss._component_``, e.g. :class:`tune_losses.SparseDistillationLoss`) is
called as ``sum_and_count(hidden, teacher_ids, teacher_logprobs, labels, scale=...)``.

Before step 1 the cache is checked against the run (:meth:`TeacherCache.check`): the model's vocabulary
size, the tokenizer file's hash and every sequence's token hash (one pass over the dataset at setup);
a mismatch stops the run naming each field that differs. Each sample is checked again when read.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchtune import config
from torchtune.data import padded_collate_sft

from tune_losses.distill_cache import CacheMismatchError, TeacherCache, files_sha256, token_hash
from tune_losses.heads import output_projection
from tune_losses.options import IGNORE_INDEX
from tune_losses.training import data
from tune_losses.training.cache_teacher import refuse_packed
from tune_losses.training.loop import LossRecipe
from tune_losses.training.memory import peak_memory_of


class CachedTeacherDataset(Dataset):
    """``ds[i]`` plus the cache's ``teacher_ids`` / ``teacher_logprobs`` ``[L - 1, k]`` of sequence ``i``
    (read lazily from the memory-mapped shard; stored dtypes)."""

    def __init__(self, ds: Dataset, cache: TeacherCache):
        self.ds, self.cache = ds, cache

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = dict(self.ds[i])
        tokens = sample["tokens"]
        if len(tokens) != self.cache.length(i) or token_hash(tokens) != self.cache.token_hash(i):
            raise CacheMismatchError(
                f"teacher_cache {self.cache.dir}: sequence {i}: expected {self.cache.length(i)} tokens with the "
                f"cached token hash, found {len(tokens)} tokens that differ; the dataset changed since setup"
            )
        sample["teacher_ids"], sample["teacher_logprobs"] = self.cache.rows(i)
        return sample


def collate_with_teacher(
    samples: List[Dict[str, Any]], padding_idx: int = 0, ignore_idx: int = IGNORE_INDEX
) -> Dict[str, torch.Tensor]:
    """SFT's padded batch plus ``teacher_ids [B, S, k]`` int64 and ``teacher_logprobs [B, S, k]`` fp32,
    row ``t`` at position ``t`` (aligned with the shifted labels), id ``-1`` / ``-inf`` elsewhere."""
    batch = padded_collate_sft(samples, padding_idx=padding_idx, ignore_idx=ignore_idx)
    b, s = batch["tokens"].shape
    k = samples[0]["teacher_ids"].shape[-1]
    ids = torch.full((b, s, k), -1, dtype=torch.int64)
    lps = torch.full((b, s, k), float("-inf"), dtype=torch.float32)
    for i, x in enumerate(samples):
        n = x["teacher_ids"].shape[0]
        ids[i, :n] = x["teacher_ids"]
        lps[i, :n] = x["teacher_logprobs"].float()
    batch["teacher_ids"], batch["teacher_logprobs"] = ids, lps
    return batch


def check_cache(cache: TeacherCache, ds: Dataset, cfg: DictConfig, vocab_size: int) -> None:
    """The cache against the run before step 1: vocabulary, tokenizer file, every sequence's tokens."""
    path = cfg.tokenizer.get("path", None)
    tok_sha = files_sha256([path]) if path else None
    cache.check(
        vocab_size=vocab_size,
        tokenizer_sha256=tok_sha,
        num_sequences=len(ds),
        token_hashes=(token_hash(ds[i]["tokens"]) for i in range(len(ds))),
    )


def check_temperature(loss, cache: TeacherCache) -> None:
    """The loss divides the student's logits by its temperature; the cached log-probabilities are the
    teacher's at the cache's. Different ones would distil towards a distribution at another temperature."""
    t = getattr(loss, "temperature", None)
    if t is not None and float(t) != cache.spec.temperature:
        raise CacheMismatchError(
            f"loss.temperature: expected the cache's temperature {cache.spec.temperature} (its log-probabilities "
            f"are the teacher's at that temperature), got {t}; rebuild the cache at {t} or set loss.temperature"
        )


class OfflineKDRecipe(LossRecipe):
    """Distillation from ``teacher_cache`` (task ``"offline_kd"``): the loop of :class:`LossRecipe`
    (exact token normalization, accumulation, FSDP2) with the teacher's entries read from the batch."""

    tasks = ("offline_kd",)
    config_keys = ("teacher_cache",)

    def __init__(self, cfg: DictConfig, distributed: bool):
        super().__init__(cfg, task="offline_kd", distributed=distributed)

    def _build_data(self, cfg: DictConfig):
        if cfg.get("teacher_cache", None) in (None, ""):
            raise ValueError("teacher_cache: expected the directory recipes/cache_teacher.py wrote, got nothing")
        refuse_packed(cfg.dataset)
        data.validate_text_files(cfg.dataset, warn=self.is_rank_zero)
        ds = config.instantiate(cfg.dataset, self.tokenizer)
        self.cache = TeacherCache(cfg.teacher_cache)
        check_cache(self.cache, ds, cfg, int(output_projection(self.model).weight.shape[0]))
        check_temperature(self.loss.loss, self.cache)
        self.kd_ratio = float(getattr(self.loss.loss, "kd_ratio", 1.0))
        cached = self._load_batches_of(CachedTeacherDataset(ds, self.cache), collate_with_teacher)
        spec = self.cache.spec
        self._note(
            f"teacher cache {self.cache.dir}: {len(self.cache)} sequences, k={spec.k} {spec.mode}, "
            f"temperature {spec.temperature}, {self.cache.nbytes() / 2**20:.1f} MiB on disk; no teacher loaded"
        )
        return cached

    def _micro_batch_loss(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor, scale: torch.Tensor):
        tokens = batch["tokens"]
        kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
        out = self.model(tokens, **kwargs)
        return self.loss(out, batch["teacher_ids"], batch["teacher_logprobs"], labels=labels, scale=scale)

    def _log_loss_memory(self, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Peak memory of the loss alone (output projection + sparse KD, forward and backward), once."""
        if self.distributed:
            return
        with torch.no_grad():
            out = self.model(batch["tokens"])
        ids, lps = batch["teacher_ids"], batch["teacher_logprobs"]

        def region():
            h = out.detach().requires_grad_(True)
            self.loss(h, ids, lps, labels=labels).total.backward()

        peak = peak_memory_of(region, self.device)
        for q in self.model.parameters():
            q.grad = None
        self._note(
            f"loss peak memory (projection + loss, fwd + bwd, batch {tuple(batch['tokens'].shape)}): {peak / 2**20:.1f} MiB"
        )
        if self.metric_logger is not None:
            self.metric_logger.log_dict({"loss_peak_memory_mib": peak / 2**20}, step=0)
