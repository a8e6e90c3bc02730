"""Teacher cache: run a teacher once, keep k log-probabilities per token on disk, distil from them later.

A real on-disk format (safetensors shards + ``index.json``; docs/teacher_cache.md) that other tools
read with ``safetensors`` and ``json`` alone. Modules, one job each: ``format`` (names, dtypes, spec,
hashes), ``select`` (top-k / sampled entries from logits), ``writer`` (atomic, resumable shards, one
writer per rank), ``build`` (a teacher over a dataset into shards), ``reader`` (lazy memory-mapped
reads and the check against a run's data). Needs ``safetensors`` (the ``train`` extra).
"""

from tune_losses.distill_cache.build import write_shards
from tune_losses.distill_cache.format import CacheSpec, dataset_hash, files_sha256, id_dtype, token_hash
from tune_losses.distill_cache.reader import CacheMismatchError, TeacherCache
from tune_losses.distill_cache.select import sample_entries, sequence_generator, topk_entries
from tune_losses.distill_cache.writer import CacheWriter
from tune_losses.extras import require_extra

# The modules above import safetensors where they read or write a shard; the check is here, so that
# importing any part of the package names the extra.
require_extra("train", "tune_losses.distill_cache", ("safetensors",))

__all__ = [
    "CacheMismatchError",
    "CacheSpec",
    "CacheWriter",
    "TeacherCache",
    "dataset_hash",
    "files_sha256",
    "id_dtype",
    "sample_entries",
    "sequence_generator",
    "token_hash",
    "topk_entries",
    "write_shards",
]
