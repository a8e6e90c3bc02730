"""Peak memory of one training step at V=128256 (fresh processes): patch() <= 0.2x the stock loss's."""

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_patched_step_peak_at_most_a_fifth_of_stock():
    from benchmarks.hf_memory import run_fresh

    size = dict(vocab=128256, hidden=256, tokens=1024, batch=2, reps=1)
    stock = run_fresh("stock", **size)
    patched = run_fresh("patched", **size)
    assert patched["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    assert patched["peak_bytes"] <= 0.2 * stock["peak_bytes"], (patched, stock)
