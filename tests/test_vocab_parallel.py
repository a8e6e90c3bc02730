"""Vocabulary-parallel fused losses on 2 gloo ranks (CPU), against the single-rank fused loss and the
fp64 full-logits reference, to 1e-5 in fp32.

One ``torchrun --nproc_per_node 2`` launch of tests/vocab_parallel_worker.py runs every case (a
launch costs seconds of imports); each test here checks one suite's lines:

* ``pg``: a local weight shard + ``process_group``: CE (mean / sum / none, both algorithms, several
  chunk sizes, label smoothing, z-loss, softcap), log-probabilities with entropy, KD (every
  divergence, temperature 1 and 2), NaN / inf hidden states giving non-finite losses on every rank,
  distillation, V = 257 (uneven shards 129 / 128) and 256, ignored tokens none / some / all, explicit
  ``vocab_start``, no-grad mode, errors raised on every rank alike;
* ``dtensor``: DTensor weights ``Shard(0)`` on a ``"tp"`` mesh (gradients come back as DTensors of
  the same placements, weights never gathered), 2-D ``(dp, tp)`` meshes (dp gathered with FSDP's mean
  gradient, a dp rank whose tokens are all ignored), ``vocab_parallel=True / False``, and a llama2
  with its output projection ``ColwiseParallel`` over tp and FSDP2 over dp (the recipe's layout);
* ``memory``: no op on any rank produces a tensor larger than one chunk of its shard's logits;
* ``ignored``: data-parallel ranks whose tokens are all ignored on one rank: the step's token count
  and the sharded weight's collectives still run, gradients exact;
* ``mesh2x2`` (a second launch, 4 ranks on a (dp=2, tp=2) mesh): FSDP2 data parallelism and
  vocabulary parallelism together.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from multiproc import run_command, torchrun

WORKER = Path(__file__).with_name("vocab_parallel_worker.py")
# Cases per suite: a suite that silently ran fewer cases fails.
EXPECTED = {"pg": 92, "dtensor": 16, "memory": 6, "ignored": 2}


def _launch(nproc: int, *suites: str) -> dict:
    start = time.perf_counter()
    proc = torchrun(WORKER, nproc, *suites, check=False)
    elapsed = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok ", "FAIL "))]
    return {"returncode": proc.returncode, "lines": lines, "log": log, "elapsed": elapsed}


@pytest.fixture(scope="module")
def worker_lines():
    return _launch(2)


def _suite(worker_lines, prefixes):
    lines = [ln for ln in worker_lines["lines"] if ln.split(" ", 1)[1].startswith(prefixes)]
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert lines, f"no case ran:\n{worker_lines['log'][-4000:]}"
    assert not failed, "\n".join(failed)
    return lines


@pytest.mark.distributed
def test_local_shard_and_process_group(worker_lines):
    assert len(_suite(worker_lines, ("pg ",))) == EXPECTED["pg"]


@pytest.mark.distributed
def test_dtensor_tp_mesh_2d_mesh_and_fsdp2_tp_model(worker_lines):
    assert len(_suite(worker_lines, ("dtensor ", "fsdp2 "))) == EXPECTED["dtensor"]
    assert "mixed torch.Tensor and DTensor" not in worker_lines["log"]


@pytest.mark.distributed
def test_no_rank_allocates_more_than_one_chunk_of_its_shard(worker_lines):
    assert len(_suite(worker_lines, ("memory ",))) == EXPECTED["memory"]


@pytest.mark.distributed
def test_one_rank_all_ignored_runs_every_collective(worker_lines):
    assert len(_suite(worker_lines, ("ignored:",))) == EXPECTED["ignored"]


@pytest.mark.distributed
def test_worker_exit_status_and_time(worker_lines):
    assert worker_lines["returncode"] == 0, worker_lines["log"][-6000:]
    assert len(worker_lines["lines"]) == sum(EXPECTED.values())
    assert worker_lines["elapsed"] < 90, f"took {worker_lines['elapsed']:.0f} s"


@pytest.mark.distributed
def test_fsdp2_over_dp_and_tensor_parallel_over_tp_on_4_ranks():
    """Mesh (dp=2, tp=2): real data parallelism under FSDP2 and vocabulary parallelism together; the
    output layer either in the FSDP2 root or its own FSDP2 unit (2-D (_StridedShard, Shard) weight:
    only this rank's tp rows are gathered over dp)."""
    result = _launch(4, "mesh2x2")
    assert result["returncode"] == 0, result["log"][-6000:]
    assert len(_suite(result, ("mesh2x2 ",))) == 2
    assert result["elapsed"] < 90, f"took {result['elapsed']:.0f} s"


# ------------------------------------------------------------------------ single process


def test_shard_sizes_follow_torch_shard0():
    from torch.distributed.tensor import Shard

    from tune_losses.fused.vocab_parallel import even_shard_sizes

    for vocab, ranks in [(257, 2), (256, 2), (10, 4), (5, 4), (7, 3), (4096, 8)]:
        sizes = even_shard_sizes(vocab, ranks)
        assert sum(sizes) == vocab and sizes == sorted(sizes, reverse=True)
        chunks = torch.arange(vocab).chunk(ranks)
        expected = [len(c) for c in chunks] + [0] * (ranks - len(chunks))
        assert sizes == expected, (vocab, ranks)
        for rank in range(ranks):  # torch's own Shard(0) arithmetic
            size, offset = Shard.local_shard_size_and_offset(vocab, ranks, rank)
            assert (size, offset if size else sum(sizes[:rank])) == (sizes[rank], sum(sizes[:rank]))


@pytest.mark.parametrize(
    "divergence,extra",
    [("forward_kl", {"true_kl": False}), ("symmetric_kl", {}), ("jsd", {"beta": 0.3}), ("reverse_kl", {}), ("tvd", {})],
)
def test_kd_terms_of_vocab_slices_add_up_to_the_divergence(divergence, extra):
    """The split the parallel path relies on: terms over slices of the vocabulary, from log-probs
    normalized over the whole vocabulary, sum to the divergence (with masked -inf entries)."""
    from reference import ref_kd

    from tune_losses.divergences import ChunkRun, VocabReducer, divergence_terms, kd_chunk
    from tune_losses.options import KDOptions

    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 33, generator=g) * 3, torch.randn(6, 33, generator=g) * 3
    zs[0, 3] = zt[1, 5] = zs[2, 7] = zt[2, 7] = float("-inf")
    opts = KDOptions(divergence, temperature=2.0, **extra)
    expected, _ = kd_chunk(zs.clone(), zt.clone(), opts, ChunkRun(VocabReducer(33)))
    log_q, log_p = torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1)
    total = sum(
        divergence_terms(log_p[:, sl].clone(), log_q[:, sl].clone(), opts, False)[0].sum(-1)
        for sl in (slice(0, 17), slice(17, 33))
    )
    torch.testing.assert_close(total * opts.loss_scale, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(expected).all()
    keep = torch.ones(33, dtype=torch.bool)
    keep[[3, 5, 7]] = False  # rows 3+ have no masked entry: the reference on the full vocabulary
    ref = ref_kd(
        zs[3:].double(),
        zt[3:].double(),
        torch.zeros(3, dtype=torch.long),
        divergence=divergence,
        temperature=2.0,
        reduction="none",
        **extra,
    )
    torch.testing.assert_close(expected[3:].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_benchmark_smoke(tmp_path):
    """``python -m benchmarks.distributed`` runs and writes its table (tiny size, CE, 2 ranks)."""
    import json

    cmd = [
        sys.executable,
        "-m",
        "benchmarks.distributed",
        "--size",
        "256,32,4096",
        "--tasks",
        "ce",
        "--ranks",
        "1,2",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
    ]
    run_command(cmd, timeout=300)
    results = json.loads((tmp_path / "distributed.json").read_text())
    by = {(c["method"], c["ranks"]): c for c in results["cases"]}
    assert set(by) == {("plain", 1), ("ours", 1), ("ours", 2), ("loss_parallel", 2)}
    assert all(c["peak_mib"] > 0 for c in by.values())
    assert "| ce | ours | 2 |" in (tmp_path / "distributed.md").read_text()
