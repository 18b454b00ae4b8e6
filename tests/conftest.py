"""Shared fixtures: locations of the shared data and bad-input cases, and thread limits."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
CASES = SHARED / "cases"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data lives beside the repository)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The real datasets folder, skipping the test when it is absent."""
    return _require(DATA)


@pytest.fixture
def cases_dir() -> Path:
    """The bad-input cases folder, skipping the test when it is absent."""
    return _require(CASES)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tests run two at a time on two cores: one thread each avoids oversubscription."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
