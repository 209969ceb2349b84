"""Shared test constants and fixtures (keep this file small)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repository is checked out with shared/ beside it (locally /work/main and /work/shared).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
MEDIA_DIR = SHARED_DIR / "media"

# What each folder of shared/ holds, for the skip reason when it is absent (README: "Test data").
SHARED_CONTENTS = {
    "spec": "the model and pipeline specification (DIT_STATE_DICT.tsv: the 15 B model's 331 tensors)",
    "fixtures": "reference inputs, weights and outputs of the upstream implementation (parity)",
    "media": "real portraits and human speech used as test input (licences in SOURCES.md)",
}


def shared_skip_reason(path: Path) -> str:
    """The skip reason for a test whose input under ``shared/`` is absent: the missing path and
    what the folder holds."""
    try:
        part = path.resolve().relative_to(SHARED_DIR.resolve()).parts[0]
    except (ValueError, IndexError):
        part = ""
    holds = SHARED_CONTENTS.get(part, "the project's shared test data (spec, fixtures, media)")
    return f"needs {path}, which is absent: shared/{part or ''} holds {holds}; see README.md, 'Test data'"


def require_shared(*parts: str) -> Path:
    """``SHARED_DIR / parts``, or skip the calling test with :func:`shared_skip_reason`."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(shared_skip_reason(path))
    return path


def needs_shared(*parts: str) -> pytest.MarkDecorator:
    """A ``skipif`` mark for tests (or a module's ``pytestmark``) that need ``shared/parts``."""
    path = SHARED_DIR.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=shared_skip_reason(path))


def _missing_shared_path(exc: BaseException) -> Path | None:
    """The path under an absent ``shared/`` that ``exc`` (or its cause) failed to open, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = getattr(exc, "filename", None)
        if isinstance(exc, OSError) and name:
            path = Path(str(name))
            if not path.exists() and str(path.resolve()).startswith(str(SHARED_DIR.resolve())):
                return path
        exc = exc.__cause__ or exc.__context__
    return None


def _skip_if_shared_missing(exc: BaseException) -> None:
    if SHARED_DIR.is_dir() and all((SHARED_DIR / part).is_dir() for part in SHARED_CONTENTS):
        return
    path = _missing_shared_path(exc)
    if path is not None:
        raise pytest.skip.Exception(shared_skip_reason(path), _use_item_location=True) from None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """A test whose shared/ input is absent is skipped with the path and what it holds, never
    reported as a FileNotFoundError (a checkout without ../shared beside it)."""
    try:
        return (yield)
    except Exception as exc:
        _skip_if_shared_missing(exc)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    try:
        return (yield)
    except Exception as exc:
        _skip_if_shared_missing(exc)
        raise


@pytest.fixture
def media_dir() -> Path:
    return require_shared("media")


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
