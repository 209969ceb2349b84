"""MediaClock: media time <-> monotonic wall time."""

from __future__ import annotations

import asyncio
import time

import pytest

from streaming.clock import MediaClock


class FakeTime:
    def __init__(self, now_s: float = 100.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def test_conversions_with_a_fake_clock() -> None:
    fake = FakeTime(100.0)
    clock = MediaClock(fake)
    assert not clock.started
    assert clock.media_time_s() == 0.0
    assert clock.start() == 100.0
    fake.now_s = 101.5
    assert clock.start() == 100.0  # a second start is a no-op
    assert clock.media_time_s() == pytest.approx(1.5)
    assert clock.media_time_ms() == pytest.approx(1500.0)
    assert clock.wall_time_s(2.0) == pytest.approx(102.0)
    assert clock.media_time_s(clock.wall_time_s(3.25)) == pytest.approx(3.25)


def test_index_at_is_floor_and_exact_on_boundaries() -> None:
    fake = FakeTime(0.0)
    clock = MediaClock(fake)
    clock.start()
    fake.now_s = 0.12  # exactly three 40 ms frames, six 20 ms chunks
    assert clock.index_at(0.04) == 3
    assert clock.index_at(0.02) == 6
    fake.now_s = 0.159
    assert clock.index_at(0.04) == 3


async def test_sleep_until_media_time_paces_on_the_monotonic_clock() -> None:
    clock = MediaClock()
    start_s = clock.start()
    await clock.sleep_until_media_s(0.05)
    assert time.monotonic() - start_s >= 0.05
    before = time.monotonic()
    await clock.sleep_until_media_s(0.0)  # in the past: returns at once
    assert time.monotonic() - before < 0.02
    await asyncio.sleep(0)
