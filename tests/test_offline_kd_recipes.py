"""The teacher-cache recipes end to end, launched as users launch them (`tune run`), on a slice of the
tiny default (a few dozen documents, 64 tokens each) so that each run takes seconds after start-up:

* cache_teacher then kd_offline_single_device trains from the cache and saves the student;
* a run whose data differ from the cache's (other max_seq_len: other tokens) stops before step 1,
  naming the field;
* a top-k cache with k = V (fp32 log-probabilities) reproduces online dense KD's first step;
* 2 cache writers under torchrun write the single writer's bytes, and kd_offline_distributed on 2
  ranks x batch 2 matches batch 4 on one (exact token normalization).
"""

import sys
from pathlib import Path

import pytest
from multiproc import child_env, run_command
from test_recipes import SHORT, tune_run

pytestmark = pytest.mark.slow

TUNE = str(Path(sys.executable).with_name("tune"))
EXPORT = Path("epoch_0") / "model-00001-of-00001.bin"


def _subset(tiny_assets, tmp_path, n: int) -> Path:
    lines = (tiny_assets / "data" / "train.jsonl").read_text().splitlines(keepends=True)[:n]
    path = tmp_path / f"train{n}.jsonl"
    path.write_text("".join(lines))
    return path


def _cache(out: Path, data: Path, *overrides: str, nproc: int = 1) -> None:
    dist = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [
        TUNE,
        "run",
        *dist,
        "recipes/cache_teacher.py",
        "--config",
        "configs/tiny/cache_teacher.yaml",
        f"output_dir={out}",
        f"dataset.data_files={data}",
        "tokenizer.max_seq_len=64",
        "cache.sequences_per_shard=8",
        *overrides,
    ]
    run_command(cmd, env=child_env(threads=1 if nproc > 1 else 2))


def _offline(recipe: str, out: Path, cache: Path, data: Path, *overrides: str, **kw):
    return tune_run(
        recipe, "kd_offline", out, *SHORT, f"teacher_cache={cache}", f"dataset.data_files={data}", *overrides, **kw
    )


def test_cache_then_offline_kd_and_mismatch_refused(tmp_path, tiny_assets):
    data = _subset(tiny_assets, tmp_path, 32)
    _cache(tmp_path / "cache", data, "cache.k=16", "cache.mode=sample")
    m = _offline("kd_offline_single_device", tmp_path / "student", tmp_path / "cache", data, "log_loss_memory=true")
    for step in (1, 2):
        expect = 0.5 * m[step]["class_loss"] + 0.5 * m[step]["kd_loss"]
        assert abs(m[step]["loss"] - expect) < 1e-4 * abs(expect) and m[step]["kd_loss"] > 0
    assert m[0]["loss_peak_memory_mib"] > 0 and (tmp_path / "student" / EXPORT).exists()
    proc = _offline(
        "kd_offline_single_device",
        tmp_path / "refused",
        tmp_path / "cache",
        data,
        "tokenizer.max_seq_len=48",
        check=False,
    )
    assert proc.returncode != 0
    assert "CacheMismatchError" in proc.stderr and "dataset token_sha256: expected" in proc.stderr, proc.stderr[-3000:]
    assert (
        not (tmp_path / "refused" / "logs" / "metrics.txt").exists()
        or "Step 1 " not in (tmp_path / "refused" / "logs" / "metrics.txt").read_text()
    )


def test_topk_cache_with_k_equal_v_reproduces_dense_kd(tmp_path, tiny_assets):
    """Every id cached (k = V = 4096, fp32): the sparse renormalized KL is dense forward KL, so the first
    step's loss, parts and gradient norm equal online KD's with the same teacher checkpoint."""
    data = _subset(tiny_assets, tmp_path, 16)
    _cache(tmp_path / "cache", data, "cache.k=4096", "cache.logprob_dtype=float32")
    common = [f"dataset.data_files={data}", "max_steps_per_epoch=1"]
    online = tune_run("kd_single_device", "kd", tmp_path / "online", *SHORT, *common, "tokenizer.max_seq_len=64")
    offline = _offline(
        "kd_offline_single_device", tmp_path / "offline", tmp_path / "cache", data, "max_steps_per_epoch=1"
    )
    for key in ("loss", "class_loss", "kd_loss", "grad_norm"):
        a, b = online[1][key], offline[1][key]
        assert abs(a - b) <= 1e-4 * abs(a), f"{key}: online {a} vs offline {b}"


@pytest.mark.distributed
def test_two_writers_and_two_ranks(tmp_path, tiny_assets):
    data = _subset(tiny_assets, tmp_path, 32)
    _cache(tmp_path / "one", data)
    _cache(tmp_path / "two", data, nproc=2)
    files = sorted(p.name for p in (tmp_path / "one").iterdir() if p.is_file())
    assert len(files) == 5 and files == sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_file())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    cache = tmp_path / "one"
    single = _offline("kd_offline_single_device", tmp_path / "a", cache, data, "batch_size=4")
    ranks = _offline("kd_offline_distributed", tmp_path / "b", cache, data, "batch_size=2", nproc=2)
    for step in (1, 2):
        for key in ("loss", "class_loss", "kd_loss", "grad_norm"):
            a, b = single[step][key], ranks[step][key]
            assert abs(a - b) <= 1e-4 * abs(a), f"step {step} {key}: 1 rank {a} vs 2 ranks {b}"
