"""Data for the loop: the dataset checked before the first step, the loader, and optimizer steps.

A bad line (not UTF-8, not JSON, no text column) found by the tokenizer at step 300 loses the run's
progress and names neither file nor line; :func:`validate_text_files` reads local JSON-lines / text
files once at setup and names both (1-based line).

Resume: the loader is torchdata's ``StatefulDataLoader`` over a ``StatefulDistributedSampler`` (as
torchtune's recipes), so a checkpoint holds where the epoch's sampler stands (:func:`loader_state`)
and a resumed run continues from there without reading or collating the batches it already trained
on. A checkpoint written before the loader state was saved resumes by reading them (a log line
says so): the same batches either way.
"""

from __future__ import annotations

import json
import logging
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune.data import padded_collate_sft

from tune_losses.chunking import shift_labels  # noqa: F401 - data.shift_labels: the loop's name for it

log = logging.getLogger(__name__)

Batch = Dict[str, torch.Tensor]


def _data_files(cfg_dataset: DictConfig) -> List[Path]:
    files = cfg_dataset.get("data_files", None)
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    elif isinstance(files, (DictConfig, dict)):  # {split: path or [paths]}
        files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    elif not isinstance(files, (ListConfig, list, tuple)):
        return []
    return [Path(str(f)) for f in files]


def validate_text_files(cfg_dataset: DictConfig, warn: bool = True) -> Tuple[int, int]:
    """Check the local files of a ``source: json`` or ``source: text`` dataset line by line.

    Raises ``ValueError`` naming the file and the 1-based line of the first line that is not UTF-8,
    not a JSON object, or lacks the text column (``column``, default ``text``) as a string. Empty
    documents are counted and warned about once (when ``warn``). Returns ``(documents, empty documents)``; ``(0, 0)``
    for datasets this cannot read (hub datasets, other formats).
    """
    source = cfg_dataset.get("source", None)
    if source not in ("json", "text"):
        return 0, 0
    column = cfg_dataset.get("column", "text")
    docs = empty = 0
    first_empty = None
    for path in _data_files(cfg_dataset):
        if not path.is_file():
            continue  # a glob or a remote path: left to the loader
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"dataset: {path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{where}: not valid UTF-8 (byte {err.start}: {raw[err.start : err.start + 1]!r})"
                    ) from None
                if not line.strip():
                    continue  # blank lines are skipped by the loaders
                if source == "text":
                    text = line.rstrip("\n")
                else:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                    if not isinstance(record, dict) or column not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(f"{where}: expected a JSON object with the text column {column!r}, got {keys}")
                    text = record[column]
                    if not isinstance(text, str):
                        raise ValueError(f"{where}: column {column!r}: expected a string, got {type(text).__name__}")
                docs += 1
                if not text.strip():
                    empty += 1
                    first_empty = first_empty or f"{path} line {lineno}"
    if empty and warn:
        log.warning(
            f"dataset: {empty} of {docs} documents are empty (first: {first_empty}); "
            f"they train on their special tokens only"
        )
    return docs, empty


def build_dataloader(
    ds: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    dp_size: int,
    dp_rank: int,
    pad_id: int,
    ignore_index: int,
    collate=padded_collate_sft,
) -> Tuple[StatefulDataLoader, StatefulDistributedSampler]:
    """Padded batches (``collate(samples, padding_idx, ignore_idx)``, SFT's by default); ranks of one
    data-parallel group (its tp ranks) read the same samples. The loader's ``state_dict()`` is where
    the current epoch stands (:func:`loader_state`)."""
    sampler = StatefulDistributedSampler(
        ds, num_replicas=dp_size, rank=dp_rank, shuffle=shuffle, seed=seed, drop_last=True
    )
    collate = partial(collate, padding_idx=pad_id, ignore_idx=ignore_index)
    with warnings.catch_warnings():
        # torchdata 0.11's constructor calls torch.set_vital, which newer torch deprecates: its own
        # call, harmless, and printed once per run otherwise.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        loader = StatefulDataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=True)
    return loader, sampler


def steps_per_epoch(
    num_samples: int,
    loader: DataLoader,
    *,
    batch_size: int,
    grad_accum: int,
    dp_size: int,
    max_steps_per_epoch: Union[int, None],
) -> int:
    """Optimizer steps per epoch; a dataset too small for one step is an error naming the sizes."""
    steps = len(loader) // grad_accum
    if steps == 0:
        per_step = batch_size * grad_accum * dp_size
        raise ValueError(
            f"dataset: {num_samples} samples make no optimizer step of batch_size {batch_size} x "
            f"gradient_accumulation_steps {grad_accum} x {dp_size} data-parallel rank(s) = {per_step} samples; "
            f"use a smaller batch or more data"
        )
    return steps if max_steps_per_epoch is None else min(steps, max_steps_per_epoch)


def loader_state(loader: StatefulDataLoader, epoch: int, batches: int, epoch_done: bool) -> Dict[str, Any]:
    """What a checkpoint keeps of the data: the epoch, the micro-batches it has read, and the loader's
    ``state_dict()`` (None once the epoch is done: the next one starts from its beginning).

    Read on rank 0 and loaded on every rank: the sampler's state counts the samples read, which is the
    same on every data-parallel rank (equal shards, ``drop_last``); the rank is in the sampler itself.
    """
    return {"epoch": epoch, "batches": batches, "loader": None if epoch_done else loader.state_dict()}


def step_batches(
    loader: StatefulDataLoader,
    sampler: StatefulDistributedSampler,
    epoch: int,
    steps: int,
    done: int,
    grad_accum: int,
    resume: Optional[Dict[str, Any]] = None,
) -> Iterator[List[Batch]]:
    """The optimizer steps of one epoch, each a list of ``grad_accum`` micro-batches, after the ``done``
    steps a resumed run has already taken.

    ``resume``: the checkpoint's :func:`loader_state` (None: a checkpoint without one). With ``done``
    steps to pass over, the loader continues from it; without it, the done batches are read and dropped.
    """
    sampler.set_epoch(epoch)
    done = max(done, 0)
    skip = done * grad_accum
    if skip and resume is not None:
        if (resume["epoch"], resume["batches"]) != (epoch, skip) or resume["loader"] is None:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint's data state is at epoch {resume['epoch']} after "
                f"{resume['batches']} micro-batches, the run resumes at epoch {epoch} after {skip} "
                f"({done} steps x gradient_accumulation_steps {grad_accum}); resume with the same batch settings"
            )
        loader.load_state_dict(resume["loader"])
        skip = 0
    elif skip:
        log.warning(
            f"resume: the checkpoint has no data loader state (written by an older version); "
            f"reading and dropping the {skip} micro-batches of epoch {epoch} already trained on"
        )
    it = iter(loader)
    for _ in islice(it, skip):
        pass
    for _ in range(steps - done):
        micro = list(islice(it, grad_accum))
        if len(micro) < grad_accum:
            return
        yield micro


def to_device(micro: Sequence[Batch], device: torch.device) -> None:
    from torchtune import utils

    for batch in micro:
        utils.batch_to_device(batch, device)
