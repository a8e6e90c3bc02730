"""Write a teacher cache: shards written atomically, resumable after a kill, one writer per rank.

The dataset's sequences are cut into consecutive blocks of ``sequences_per_shard`` (shard ``s`` holds
sequences ``[s * sps, (s + 1) * sps)``); rank ``r`` of ``W`` writes the shards ``s`` with ``s % W == r``.
A shard is written to ``<name>.tmp`` and renamed with ``os.replace`` once complete, so a shard file is
either whole or absent. A rerun with the same spec skips the shards already there (after checking
their fingerprint and token hashes against this run's) and rewrites the rest; sampling is seeded per
sequence, so the rewritten shards hold what an uninterrupted run writes. Rank 0 writes ``index.json``
last, once every rank has written its shards (the caller runs a barrier between the two).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tune_losses.distill_cache.format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    CacheSpec,
    dataset_hash,
    read_shard_metadata,
    shard_metadata,
    shard_name,
    shard_ranges,
    write_json_atomic,
)

# Testing hook: after this many shards written by this process, write the next shard's temporary file
# and exit at once (exit code 17), as a kill in the middle of a write would leave things.
STOP_AFTER_ENV = "TUNE_LOSSES_CACHE_STOP_AFTER_SHARDS"
STOP_EXIT_CODE = 17

Rows = Tuple[torch.Tensor, torch.Tensor]  # ids [r, k] int64, logprobs [r, k] float


class CacheWriter:
    """The shards of one rank. ``spec``: what is cached; ``num_sequences``: the whole dataset's."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        spec: CacheSpec,
        num_sequences: int,
        sequences_per_shard: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_sequences < 1:
            raise ValueError(f"dataset: expected at least 1 sequence to cache, got {num_sequences}")
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.num_sequences = num_sequences
        self.ranges = shard_ranges(num_sequences, sequences_per_shard)
        self.layout = {"num_sequences": num_sequences, "sequences_per_shard": sequences_per_shard}
        self.fingerprint = spec.fingerprint(self.layout)
        self.rank, self.world_size = rank, world_size
        self.mine = [s for s in range(len(self.ranges)) if s % world_size == rank]
        self.written = 0
        stop = os.environ.get(STOP_AFTER_ENV)
        self.stop_after: Optional[int] = int(stop) if stop else None

    def path(self, shard: int) -> Path:
        return self.dir / shard_name(shard, len(self.ranges))

    def pending(self, token_hash_of: Callable[[int], bytes]) -> List[int]:
        """This rank's shards still to write. Its leftover temporary files are removed; a shard already
        there is kept only if written under this spec and layout and over the same tokens (otherwise
        an error says what differs: the output directory belongs to another cache)."""
        for s in self.mine:
            tmp = self.path(s).with_name(self.path(s).name + ".tmp")
            if tmp.exists():
                tmp.unlink()
        todo = []
        for s in self.mine:
            if not self.path(s).exists():
                todo.append(s)
                continue
            self._check_existing(s, token_hash_of)
        return todo

    def _check_existing(self, s: int, token_hash_of: Callable[[int], bytes]) -> None:
        from safetensors import safe_open

        path = self.path(s)
        with safe_open(str(path), framework="pt") as f:
            meta = read_shard_metadata(f.metadata())
            hashes = f.get_tensor("token_hashes")
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"output_dir: {path} was written by a different cache config (spec {meta.get('spec')}, "
                f"layout first_sequence {meta.get('first_sequence')}); this run's spec is "
                f"{self.spec.to_json()} with {self.layout}. Use another output_dir or remove the old cache."
            )
        for j, i in enumerate(self.ranges[s]):
            if bytes(hashes[j].tolist()) != token_hash_of(i):
                raise ValueError(
                    f"output_dir: {path} holds sequence {i} with other tokens than this run's dataset "
                    f"(token hash differs); use another output_dir or remove the old cache"
                )

    def write_shard(self, s: int, rows: Sequence[Rows], lengths: Sequence[int], hashes: Sequence[bytes]) -> Path:
        """Write shard ``s`` from its sequences' rows (in order), token counts and token hashes."""
        from safetensors.torch import save_file

        seqs = self.ranges[s]
        if not len(rows) == len(lengths) == len(hashes) == len(seqs):
            raise ValueError(
                f"shard {s}: expected {len(seqs)} sequences, got {len(rows)} / {len(lengths)} / {len(hashes)}"
            )
        k = self.spec.k
        counts = [r[0].shape[0] for r in rows]
        for i, (n, length) in enumerate(zip(counts, lengths)):
            if n != max(length - 1, 0) or rows[i][0].shape[1:] != (k,):
                raise ValueError(
                    f"sequence {seqs[i]}: expected {max(length - 1, 0)} rows of {k} entries, got {tuple(rows[i][0].shape)}"
                )
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
        tensors = {
            "ids": torch.cat([r[0].cpu() for r in rows]).to(self.spec.ids_dtype).reshape(-1, k),
            "logprobs": torch.cat([r[1].cpu().float() for r in rows]).to(self.spec.logprobs_dtype).reshape(-1, k),
            "offsets": offsets,
            "lengths": torch.tensor(list(lengths), dtype=torch.int64),
            "token_hashes": torch.tensor([list(h) for h in hashes], dtype=torch.uint8),
        }
        path = self.path(s)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=shard_metadata(self.spec, self.fingerprint, seqs.start, len(seqs)))
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; a cache is meant to be shared and read by other tools
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if self.stop_after is not None and self.written >= self.stop_after:
            os._exit(STOP_EXIT_CODE)  # the testing hook: as if killed before the rename
        os.replace(tmp, path)
        self.written += 1
        return path

    def write_index(self, extra: Optional[Dict] = None) -> Path:
        """``index.json`` over every rank's shards (rank 0, after all of them are written)."""
        from safetensors import safe_open

        shards, hashes, total_rows, total_tokens = [], [], 0, 0
        for s, seqs in enumerate(self.ranges):
            path = self.path(s)
            if not path.exists():
                raise FileNotFoundError(f"teacher cache: shard {path} is missing; a rank did not finish")
            with safe_open(str(path), framework="pt") as f:
                if read_shard_metadata(f.metadata()).get("fingerprint") != self.fingerprint:
                    raise ValueError(f"teacher cache: {path} was written by a different cache config")
                h = f.get_tensor("token_hashes")
                rows = f.get_slice("ids").get_shape()[0]
                tokens = int(f.get_tensor("lengths").sum())
            hashes.extend(bytes(row.tolist()) for row in h)
            shards.append(
                {
                    "file": path.name,
                    "first_sequence": seqs.start,
                    "num_sequences": len(seqs),
                    "num_rows": rows,
                    "bytes": path.stat().st_size,
                }
            )
            total_rows += rows
            total_tokens += tokens
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.spec.to_json(),
            "dataset": {
                "num_sequences": self.num_sequences,
                "num_tokens": total_tokens,
                "num_rows": total_rows,
                "token_sha256": dataset_hash(hashes),
            },
            "sequences_per_shard": self.layout["sequences_per_shard"],
            "fingerprint": self.fingerprint,
            "shards": shards,
            **(extra or {}),
        }
        path = self.dir / INDEX_FILE
        write_json_atomic(path, index)
        return path
