"""Shared test constants and fixtures (keep this file small)."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository is checked out with shared/ beside it (locally /work/main and /work/shared).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
MEDIA_DIR = SHARED_DIR / "media"


@pytest.fixture
def media_dir() -> Path:
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"shared media not found at {MEDIA_DIR}")
    return MEDIA_DIR
