"""Read a teacher cache lazily and check it against the data it is meant for.

Shards are opened with safetensors' ``safe_open`` (a memory map): a sequence's rows are read from disk
when asked for, so a cache larger than RAM trains. :meth:`TeacherCache.check` refuses a cache made for
other data before the first step, naming each field that differs with the expected and found values.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from tune_losses.distill_cache.format import CacheSpec, dataset_hash, read_index


class CacheMismatchError(ValueError):
    """The cache was made for other data, tokenizer or vocabulary than the run's."""


class TeacherCache:
    """A complete cache directory. ``spec`` (k, mode, temperature, vocab_size, teacher, tokenizer) and
    ``index`` (the parsed ``index.json``); ``rows(i)`` reads sequence ``i``'s rows."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.index = read_index(self.dir)
        self.spec = CacheSpec.from_json(self.index)
        self.shards = self.index["shards"]
        self.num_sequences = int(self.index["dataset"]["num_sequences"])
        self._firsts = [int(s["first_sequence"]) for s in self.shards]
        self._open: Dict[int, Tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for s in self.shards:
            if not (self.dir / s["file"]).exists():
                raise FileNotFoundError(f"teacher_cache: {self.dir / s['file']} (listed in index.json) is missing")

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def k(self) -> int:
        return self.spec.k

    def _shard(self, i: int):
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"teacher_cache: sequence {i} out of range [0, {self.num_sequences})")
        s = bisect.bisect_right(self._firsts, i) - 1
        if s not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self.dir / self.shards[s]["file"]), framework="pt")
            self._open[s] = (f, f.get_tensor("offsets"), f.get_tensor("lengths"), f.get_tensor("token_hashes"))
        return s, i - self._firsts[s], self._open[s]

    def rows(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``i``'s ``(ids [L - 1, k], logprobs [L - 1, k])`` in the stored dtypes; row ``j`` is the
        teacher's distribution over token ``j + 1``."""
        _, j, (f, offsets, _, _) = self._shard(i)
        a, b = int(offsets[j]), int(offsets[j + 1])
        return f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b]

    def length(self, i: int) -> int:
        """Sequence ``i``'s token count when cached."""
        _, j, (_, _, lengths, _) = self._shard(i)
        return int(lengths[j])

    def token_hash(self, i: int) -> bytes:
        _, j, (_, _, _, hashes) = self._shard(i)
        return bytes(hashes[j].tolist())

    def nbytes(self) -> int:
        """The cache's size on disk (shards and index)."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def check(
        self,
        *,
        vocab_size: Optional[int] = None,
        tokenizer_sha256: Optional[str] = None,
        token_hashes: Optional[Iterable[bytes]] = None,
        num_sequences: Optional[int] = None,
    ) -> None:
        """Refuse this cache for a run whose data differ: every given field is compared, and all that
        differ are named in one :class:`CacheMismatchError` (expected = the run's, found = the cache's).

        ``token_hashes``: the run's dataset, one :func:`~tune_losses.distill_cache.format.token_hash`
        per sequence in order; the first differing sequence is named as well.
        """
        problems = []
        if vocab_size is not None and vocab_size != self.spec.vocab_size:
            problems.append(f"vocab_size: expected {vocab_size} (the model's), found {self.spec.vocab_size}")
        found_tok = self.spec.tokenizer.get("sha256")
        if tokenizer_sha256 is not None and tokenizer_sha256 != found_tok:
            problems.append(
                f"tokenizer sha256: expected {tokenizer_sha256} (the run's tokenizer file), found {found_tok} "
                f"({self.spec.tokenizer.get('path')})"
            )
        if num_sequences is not None and num_sequences != self.num_sequences:
            problems.append(f"num_sequences: expected {num_sequences} (the run's dataset), found {self.num_sequences}")
        if token_hashes is not None:
            hashes = list(token_hashes)
            expected = dataset_hash(hashes)
            found = self.index["dataset"]["token_sha256"]
            if expected != found:
                first = next(
                    (i for i, h in enumerate(hashes[: self.num_sequences]) if h != self.token_hash(i)),
                    min(len(hashes), self.num_sequences),
                )
                problems.append(
                    f"dataset token_sha256: expected {expected} (the run's dataset), found {found}; "
                    f"first differing sequence: {first}"
                )
        if problems:
            raise CacheMismatchError(
                f"teacher_cache {self.dir}: made for other data than this run's: "
                + "; ".join(problems)
                + ". Rebuild it with recipes/cache_teacher.py from this run's dataset and tokenizer."
            )

    def close(self) -> None:
        self._open.clear()
