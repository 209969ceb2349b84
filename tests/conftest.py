"""Shared test constants and fixtures (keep this file small)."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(autouse=True, scope="session")
def _recordings_ignore_free_disk() -> Iterator[None]:
    """Servers started by the tests (in-process and child processes) record whatever the free
    space of the test machine: the free-disk floor of recordings (1 GiB by default) is tested
    with an injected disk in tests/test_recording_limits.py, not with the machine's own disk."""
    name = "AVATAR_SERVER_LIMITS__MIN_RECORDING_FREE_BYTES"
    before = os.environ.get(name)
    os.environ[name] = "0"
    yield
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before
