"""Cases shared by the fused-loss tests (test_fused, test_engine, test_dw_accumulation,
test_custom_divergence and the vocabulary-parallel worker), so that each checks the same matrix."""

from __future__ import annotations

from typing import Dict, List, Tuple

# Every built-in divergence with the parameter values whose math differs: JSD's beta inside (0.5,
# and 0.2, asymmetric) and at both ends (0 and 1: one side of the mixture vanishes, no NaN allowed).
DIVERGENCE_CASES: List[Tuple[str, Dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"sym_kd_ratio": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
]


def case_id(divergence: str, extra: dict) -> str:
    """``jsd-beta0.5``: the divergence, then each option and its value."""
    return divergence + "".join(f"-{k}{v}" for k, v in extra.items())


DIVERGENCE_IDS = [case_id(d, extra) for d, extra in DIVERGENCE_CASES]
