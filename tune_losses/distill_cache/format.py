"""The teacher cache's on-disk format: names, dtypes, the index (JSON) and the hashes that tie it to a dataset.

A cache directory holds (docs/teacher_cache.md describes every field)::

    index.json                        written last, atomically: the cache is complete when it exists
    shard-00000-of-00004.safetensors  tensors of the sequences [s * sequences_per_shard, ...)
    ...

Each shard is a plain safetensors file with five tensors (``R`` = the shard's rows, ``n`` = its sequences):

* ``ids`` ``[R, k]``: the teacher's token ids, the smallest signed integer type that holds ``V - 1``
  (int16 up to V = 32768, else int32); ``-1`` marks an unused slot;
* ``logprobs`` ``[R, k]``: their log-probabilities at the cache's temperature (float16 by default;
  bfloat16 or float32 on request); an unused slot holds ``-inf`` (probability 0);
* ``offsets`` ``[n + 1]`` int64: sequence ``first_sequence + j`` owns rows ``offsets[j]:offsets[j+1]``;
* ``lengths`` ``[n]`` int64: its token count ``L`` (it owns ``max(L - 1, 0)`` rows);
* ``token_hashes`` ``[n, 16]`` uint8: BLAKE2b-128 of its token ids (int64 little-endian bytes).

Row ``j`` of a sequence is the teacher's distribution over token ``j + 1`` given tokens ``0..j``: the
position whose (shifted) training label is token ``j + 1``. The last token predicts nothing, so it
has no row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

FORMAT = "tune-losses-teacher-cache"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
MODES = ("topk", "sample")
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TENSORS = ("ids", "logprobs", "offsets", "lengths", "token_hashes")
TOKEN_HASH_BYTES = 16


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed integer dtype holding ids ``0..vocab_size - 1`` and ``-1`` (unused slot)."""
    if vocab_size <= 2**15:
        return torch.int16
    if vocab_size <= 2**31:
        return torch.int32
    raise ValueError(f"vocab_size: expected at most 2**31, got {vocab_size}")


def token_hash(tokens: Sequence[int] | torch.Tensor) -> bytes:
    """BLAKE2b-128 of one sequence's token ids, as int64 little-endian bytes (independent of their dtype)."""
    t = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1).contiguous()
    return hashlib.blake2b(t.numpy().astype("<i8").tobytes(), digest_size=TOKEN_HASH_BYTES).digest()


def dataset_hash(hashes: Iterable[bytes]) -> str:
    """SHA-256 (hex) over the per-sequence token hashes in sequence order: the whole dataset's token hash."""
    h = hashlib.sha256()
    for d in hashes:
        h.update(d)
    return h.hexdigest()


def files_sha256(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 (hex) over the files' names and bytes, in the given order (a teacher checkpoint, a tokenizer)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds and what produced it: everything but the data and its layout.

    ``teacher`` and ``tokenizer`` are free-form records (the recipe writes ``{"checkpoint": ..., "files":
    [...], "sha256": ...}`` and ``{"path": ..., "sha256": ...}``); ``vocab_size`` is the teacher's
    output rows; ``seed`` only matters for ``mode="sample"``.
    """

    vocab_size: int
    k: int
    mode: str = "topk"
    temperature: float = 1.0
    logprob_dtype: str = "float16"
    seed: int = 0
    teacher: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key, minimum in (("vocab_size", 1), ("k", 1), ("seed", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{key}: expected an int >= {minimum}, got {value!r}")
        if self.k > self.vocab_size:
            raise ValueError(f"k: expected at most vocab_size {self.vocab_size}, got {self.k}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) < float("inf"):
            raise ValueError(f"temperature: expected a finite number > 0, got {t!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype: expected one of {list(LOGPROB_DTYPES)}, got {self.logprob_dtype!r}")
        id_dtype(self.vocab_size)

    @property
    def ids_dtype(self) -> torch.dtype:
        return id_dtype(self.vocab_size)

    @property
    def logprobs_dtype(self) -> torch.dtype:
        return LOGPROB_DTYPES[self.logprob_dtype]

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["temperature"] = float(self.temperature)
        d["ids_dtype"] = str(self.ids_dtype).removeprefix("torch.")
        return d

    def fingerprint(self, layout: Dict[str, Any]) -> str:
        """SHA-256 of the spec and the shard layout: a shard written under another one is not reused."""
        text = json.dumps({"spec": self.to_json(), "layout": layout}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> CacheSpec:
        keys = ("vocab_size", "k", "mode", "temperature", "logprob_dtype", "seed", "teacher", "tokenizer")
        return cls(**{k: d[k] for k in keys if k in d})


def shard_ranges(num_sequences: int, sequences_per_shard: int) -> List[range]:
    """The sequences of each shard: consecutive blocks of ``sequences_per_shard`` (the last may be shorter)."""
    if isinstance(sequences_per_shard, bool) or not isinstance(sequences_per_shard, int) or sequences_per_shard < 1:
        raise ValueError(f"sequences_per_shard: expected an int >= 1, got {sequences_per_shard!r}")
    return [range(a, min(a + sequences_per_shard, num_sequences)) for a in range(0, num_sequences, sequences_per_shard)]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def read_index(directory: str | os.PathLike) -> Dict[str, Any]:
    """``index.json`` of a cache directory, checked to be this format; a missing one says why."""
    d = Path(directory)
    path = d / INDEX_FILE
    if not path.exists():
        shards = sorted(d.glob("shard-*.safetensors")) if d.is_dir() else []
        what = f"{len(shards)} shard(s) but no {INDEX_FILE}" if shards else "no cache"
        raise FileNotFoundError(
            f"teacher_cache: {d} holds {what}; the cache is complete only once recipes/cache_teacher.py "
            f"has finished (rerun it with the same config to complete it)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"teacher_cache: {path}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
            f"got {index.get('format')!r} version {index.get('format_version')!r}"
        )
    return index


SHARD_METADATA_KEY = "tune_losses_teacher_cache"


def shard_metadata(spec: CacheSpec, fingerprint: str, first: int, count: int) -> Dict[str, str]:
    """The safetensors header's ``__metadata__`` of one shard: one key holding sorted JSON (safetensors
    keeps string pairs only, and writes several in no fixed order; one keeps the file byte-reproducible)."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "first_sequence": first,
        "num_sequences": count,
        "spec": spec.to_json(),
    }
    return {SHARD_METADATA_KEY: json.dumps(record, sort_keys=True)}


def read_shard_metadata(metadata: Optional[Dict[str, str]]) -> Dict[str, Any]:
    """The record :func:`shard_metadata` wrote (empty for a file that is not a shard of this format)."""
    text = (metadata or {}).get(SHARD_METADATA_KEY)
    return json.loads(text) if text else {}
