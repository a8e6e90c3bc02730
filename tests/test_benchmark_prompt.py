"""The benchmark's prompt-masked CE task: every method computes the same loss and gradients."""

import torch

from benchmarks.cases import METHODS, Size, build, clear_grads, make_inputs, step


def test_ce_prompt_methods_agree():
    size = Size(64, 16, 300)
    inputs = make_inputs("ce_prompt", size)
    assert (inputs["labels"] == -100).float().mean() >= 0.5
    results = {}
    for method in ("plain", "ours", "ours_drop"):
        assert method in METHODS["ce_prompt"]
        clear_grads(inputs)
        loss = build("ce_prompt", method)(inputs)
        loss.backward()
        results[method] = (loss.detach(), inputs["hidden"].grad.clone(), inputs["weight"].grad.clone())
    for method in ("ours", "ours_drop"):
        for a, b in zip(results[method], results["plain"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    clear_grads(inputs)
    step(build("ce_prompt", "floor"), inputs)
