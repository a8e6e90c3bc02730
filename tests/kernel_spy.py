"""A spy on a chunk kernel's entry point, for the tests that check which chunk math the engine ran."""

from __future__ import annotations

from typing import List

import torch


def spy(monkeypatch, module, name: str) -> List[torch.dtype]:
    """Wraps ``module.name`` (an entry point taking the logits first) for this test; returns the
    list it appends each call's logits dtype to."""
    calls: List[torch.dtype] = []
    real = getattr(module, name)

    def spied(z, *a, **k):
        calls.append(z.dtype)
        return real(z, *a, **k)

    monkeypatch.setattr(module, name, spied)
    return calls
