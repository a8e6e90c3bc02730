"""Read back the metrics a recipe logged with torchtune's DiskLogger (``Step N | key:value ...`` lines)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict


def read_metrics(path: Path) -> Dict[int, Dict[str, float]]:
    """``{step: {metric: value}}`` from a DiskLogger file; later lines for a step update earlier ones."""
    steps: Dict[int, Dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"Step (\d+) \| (.*)", line)
        if m:
            steps.setdefault(int(m.group(1)), {}).update(
                {k: float(v) for k, v in (kv.split(":") for kv in m.group(2).split())}
            )
    return steps
