"""Shared fixtures: the tiny offline assets, built once per test session (seconds)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_assets():
    """Build (or reuse) assets/tiny in the repository; configs refer to it by relative path."""
    from tune_losses.tiny import build

    build(ROOT / "assets" / "tiny")
    os.chdir(ROOT)
    return ROOT / "assets" / "tiny"
