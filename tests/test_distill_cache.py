"""The teacher cache (tune_losses.distill_cache): format round trip and dtypes, exact top-k entries,
unbiased sampled entries, refusal of a cache made for other data, atomic shards that a rerun after a
kill completes with the same bytes, one writer per rank, and the batch alignment of the offline recipe.

The teacher here is a fixed random table (``logits = table[token]``): causal, cheap, deterministic.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_losses.distill_cache import (
    CacheMismatchError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    id_dtype,
    sample_entries,
    sequence_generator,
    token_hash,
    topk_entries,
    write_shards,
)
from tune_losses.distill_cache.writer import STOP_AFTER_ENV, STOP_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
V = 50
LENGTHS = [5, 1, 7, 3, 9, 2, 6, 4, 8]


def _teacher(vocab=V, seed=0):
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    return lambda tokens: table[tokens]


def _sequences(vocab=V):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def _write(out, spec, seqs=None, sps=2, rank=0, world=1, index=True, vocab=V):
    seqs = seqs or _sequences(vocab)
    w = CacheWriter(out, spec, len(seqs), sps, rank=rank, world_size=world)
    write_shards(w, _teacher(vocab), lambda i: seqs[i], batch_size=3)
    if index:
        w.write_index()
    return w


def _tensors(directory):
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(Path(directory).glob("shard-*.safetensors"))}


def test_id_dtype_is_the_smallest_signed_type_holding_v_and_minus_one():
    assert id_dtype(4096) == torch.int16 and id_dtype(32768) == torch.int16
    assert id_dtype(32769) == torch.int32 and id_dtype(128256) == torch.int32


@pytest.mark.parametrize("logprob_dtype", ["float16", "bfloat16", "float32"])
def test_topk_round_trip_values_dtypes_and_alignment(tmp_path, logprob_dtype):
    spec = CacheSpec(vocab_size=V, k=6, temperature=2.0, logprob_dtype=logprob_dtype)
    seqs = _sequences()
    _write(tmp_path, spec, seqs)
    cache = TeacherCache(tmp_path)
    teacher = _teacher()
    assert len(cache) == len(seqs) and cache.k == 6 and cache.spec == spec
    for i, s in enumerate(seqs):
        ids, lps = cache.rows(i)
        assert ids.dtype == torch.int16 and lps.dtype == getattr(torch, logprob_dtype)
        assert ids.shape == (len(s) - 1, 6) and cache.length(i) == len(s) and cache.token_hash(i) == token_hash(s)
        # row j: the teacher's distribution over token j + 1 given tokens 0..j, at temperature 2
        ref = torch.log_softmax(teacher(torch.tensor(s[:-1], dtype=torch.long)).double() / 2.0, -1)
        top = ref.topk(6, -1)
        assert torch.equal(ids.long(), top.indices)
        tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-6}[logprob_dtype]
        torch.testing.assert_close(lps.double(), top.values, atol=tol * 8, rtol=tol)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["dataset"]["num_tokens"] == sum(LENGTHS) and index["dataset"]["num_rows"] == sum(LENGTHS) - len(
        LENGTHS
    )
    assert index["ids_dtype"] == "int16" and index["mode"] == "topk" and index["k"] == 6


def test_int32_ids_beyond_int16(tmp_path):
    vocab = 40000
    spec = CacheSpec(vocab_size=vocab, k=3)
    seqs = [[1, 39999, 20000, 5], [7, 8]]
    w = CacheWriter(tmp_path, spec, 2, 8)
    table = torch.zeros(vocab)
    table[[39998, 35000, 3]] = torch.tensor([9.0, 8.0, 7.0])
    write_shards(w, lambda t: table.expand(*t.shape, vocab), lambda i: seqs[i], batch_size=2)
    w.write_index()
    ids, _ = TeacherCache(tmp_path).rows(0)
    assert ids.dtype == torch.int32 and ids[0].tolist() == [39998, 35000, 3]


def test_documented_plain_safetensors_reader_runs(tmp_path):
    """docs/teacher_cache.md's reader (json + safetensors only) reads what the package reads."""
    _write(tmp_path, CacheSpec(vocab_size=V, k=4))
    doc = (ROOT / "docs" / "teacher_cache.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope = {"CACHE_DIR": str(tmp_path), "SEQUENCE": 4}
    exec(code, scope)
    ids, lps = TeacherCache(tmp_path).rows(4)
    assert torch.equal(torch.as_tensor(scope["ids"]), ids) and torch.equal(torch.as_tensor(scope["logprobs"]), lps)


def test_topk_entries_are_exact_log_probabilities():
    z = torch.randn(7, 33, dtype=torch.float64)
    ids, lps = topk_entries(z, 5, temperature=0.5)
    ref = torch.log_softmax(z / 0.5, -1)
    torch.testing.assert_close(lps.double(), ref.gather(1, ids), atol=1e-5, rtol=1e-5)
    full_ids, full = topk_entries(z, 33)
    assert torch.allclose(full.exp().sum(-1), torch.ones(7, dtype=torch.float32), atol=1e-5)


def test_sampled_entries_are_an_unbiased_estimate_of_the_teacher():
    """Mean over many independent draws of the sparse estimate (count / k per id) = softmax(z / T)."""
    z = torch.randn(1, 12, generator=torch.Generator().manual_seed(3)) * 2
    n, k, t = 20000, 8, 1.5
    ids, lps = sample_entries(z.expand(n, -1), k, temperature=t, generator=torch.Generator().manual_seed(0))
    used = ids >= 0
    dense = torch.zeros(n, 12).scatter_add_(1, ids.clamp(min=0), torch.where(used, lps.exp(), torch.zeros_like(lps)))
    p = torch.softmax(z / t, -1)[0]
    assert torch.allclose(dense.sum(-1), torch.ones(n), atol=1e-6)  # counts sum to k
    se = (p * (1 - p) / (k * n)).sqrt()
    assert ((dense.mean(0) - p).abs() <= 5 * se + 1e-6).all(), (dense.mean(0), p)
    # distinct ids per row (ascending), log(count / k) with count in 1..k, -1 / -inf padding after them
    for row_ids, row_lps in zip(ids[:50], lps[:50]):
        u = row_ids[row_ids >= 0]
        assert torch.equal(u, u.unique()) and (row_ids[len(u) :] == -1).all()
        assert torch.isinf(row_lps[len(u) :]).all()
        counts = (row_lps[: len(u)].exp() * k).round()
        assert torch.allclose(row_lps[: len(u)], (counts / k).log()) and counts.sum() == k


def test_sampled_entries_are_seeded_per_sequence():
    z = torch.randn(4, 30)
    a = sample_entries(z, 6, generator=sequence_generator(7, 11))
    b = sample_entries(z, 6, generator=sequence_generator(7, 11))
    c = sample_entries(z, 6, generator=sequence_generator(7, 12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_mismatched_cache_is_refused_naming_each_field(tmp_path):
    spec = CacheSpec(vocab_size=V, k=4, tokenizer={"path": "tok.model", "sha256": "aa" * 32})
    seqs = _sequences()
    _write(tmp_path, spec, seqs)
    cache = TeacherCache(tmp_path)
    hashes = [token_hash(s) for s in seqs]
    cache.check(vocab_size=V, tokenizer_sha256="aa" * 32, token_hashes=hashes, num_sequences=len(seqs))
    with pytest.raises(CacheMismatchError, match=r"vocab_size: expected 64 \(the model's\), found 50"):
        cache.check(vocab_size=64)
    with pytest.raises(
        CacheMismatchError, match=r"tokenizer sha256: expected bb+ \(the run's tokenizer file\), found a+"
    ):
        cache.check(tokenizer_sha256="bb" * 32)
    changed = list(hashes)
    changed[5] = token_hash(seqs[5] + [3])
    with pytest.raises(
        CacheMismatchError, match=r"dataset token_sha256: expected \w+ .*found \w+; first differing sequence: 5"
    ):
        cache.check(token_hashes=changed)
    with pytest.raises(CacheMismatchError, match=r"num_sequences: expected 8 .* found 9") as err:
        cache.check(vocab_size=64, num_sequences=8)
    assert "vocab_size" in str(err.value)  # every differing field in one error


def test_incomplete_cache_and_foreign_output_dir_are_refused(tmp_path):
    _write(tmp_path, CacheSpec(vocab_size=V, k=4), index=False)
    with pytest.raises(FileNotFoundError, match=r"holds 5 shard\(s\) but no index.json.*rerun it"):
        TeacherCache(tmp_path)
    with pytest.raises(ValueError, match="output_dir: .* was written by a different cache config"):
        _write(tmp_path, CacheSpec(vocab_size=V, k=5))
    with pytest.raises(FileNotFoundError, match="no cache"):
        TeacherCache(tmp_path / "nothing")


def test_one_writer_per_rank_gives_the_single_writer_cache(tmp_path):
    spec = CacheSpec(vocab_size=V, k=4, mode="sample", seed=5)
    _write(tmp_path / "one", spec)
    for rank in (1, 0):  # any order; rank 0 writes the index once both are done
        w = _write(tmp_path / "two", spec, rank=rank, world=2, index=False)
        assert w.mine == [s for s in range(5) if s % 2 == rank]
    w.write_index()
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")


def _bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


_WRITER_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_distill_cache import _write
from tune_losses.distill_cache import CacheSpec
_write({out!r}, CacheSpec(vocab_size=50, k=4, mode="sample", temperature=1.5, seed=9))
"""


def test_killed_writer_rerun_completes_the_same_cache(tmp_path):
    """A writer that dies in the middle of its third shard (temporary file written, not renamed)
    leaves two complete shards; the rerun keeps them, rewrites the rest and equals an uninterrupted
    run byte for byte."""
    script = _WRITER_SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path / "killed"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{STOP_AFTER_ENV: "2"})
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == STOP_EXIT_CODE, proc.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert names == [
        "shard-00000-of-00005.safetensors",
        "shard-00001-of-00005.safetensors",
        "shard-00002-of-00005.safetensors.tmp",
    ]
    kept = (tmp_path / "killed" / names[0]).stat().st_mtime_ns
    env.pop(STOP_AFTER_ENV)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "killed" / names[0]).stat().st_mtime_ns == kept  # skipped, not rewritten
    _write(tmp_path / "whole", CacheSpec(vocab_size=50, k=4, mode="sample", temperature=1.5, seed=9))
    assert _bytes(tmp_path / "killed") == _bytes(tmp_path / "whole")
    a, b = _tensors(tmp_path / "killed"), _tensors(tmp_path / "whole")
    assert all(torch.equal(a[f][t], b[f][t]) for f in a for t in a[f])


def test_batches_align_teacher_rows_with_shifted_labels(tmp_path):
    """Row t of a sequence sits at position t, where the shifted label is token t + 1; the last token
    and padding get id -1 (and -inf), exactly the positions whose shifted label is ignored."""
    pytest.importorskip("torchtune")
    from tune_losses.training.data import shift_labels
    from tune_losses.training.offline_kd import CachedTeacherDataset, collate_with_teacher

    seqs = _sequences()
    _write(tmp_path, CacheSpec(vocab_size=V, k=4, logprob_dtype="float32"), seqs)
    cache = TeacherCache(tmp_path)
    ds = CachedTeacherDataset([{"tokens": s, "labels": list(s)} for s in seqs], cache)
    batch = collate_with_teacher([ds[i] for i in (0, 1, 4)], padding_idx=0, ignore_idx=-100)
    labels = shift_labels(batch["labels"], -100)
    ids, lps = batch["teacher_ids"], batch["teacher_logprobs"]
    assert ids.shape == (3, 9, 4) and ids.dtype == torch.int64 and lps.dtype == torch.float32
    assert torch.equal(ids[..., 0] >= 0, labels != -100)
    teacher = _teacher()
    for b, i in enumerate((0, 1, 4)):
        s = seqs[i]
        for t in range(len(s) - 1):
            assert labels[b, t] == s[t + 1]
            ref_ids, ref_lps = topk_entries(teacher(torch.tensor([s[t]])), 4)
            assert torch.equal(ids[b, t], ref_ids[0]) and torch.allclose(lps[b, t], ref_lps[0], atol=1e-6)
        assert torch.isinf(lps[b, len(s) - 1 :]).all()
    wrong = CachedTeacherDataset([{"tokens": s[::-1], "labels": s} for s in seqs], cache)
    with pytest.raises(CacheMismatchError, match="sequence 0: expected 5 tokens with the cached token hash"):
        wrong[0]
    assert math.isfinite(float(lps[ids >= 0].sum()))


def test_loss_temperature_must_be_the_caches(tmp_path):
    pytest.importorskip("torchtune")
    from types import SimpleNamespace

    from tune_losses import SparseDistillationLoss
    from tune_losses.training.offline_kd import check_temperature

    _write(tmp_path, CacheSpec(vocab_size=V, k=4, temperature=2.0))
    cache = TeacherCache(tmp_path)
    check_temperature(SimpleNamespace(temperature=2.0), cache)
    check_temperature(SimpleNamespace(), cache)  # a loss without one (no soft targets at a temperature)
    with pytest.raises(CacheMismatchError, match=r"loss.temperature: expected the cache's temperature 2.0 .*got 1.0"):
        check_temperature(SimpleNamespace(temperature=1.0), cache)
    # The recipes' loss carries its temperature in its options; the check reads it there too.
    check_temperature(SparseDistillationLoss(temperature=2.0), cache)
    with pytest.raises(CacheMismatchError, match="loss.temperature"):
        check_temperature(SparseDistillationLoss(), cache)
