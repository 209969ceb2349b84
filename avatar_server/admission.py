"""Server-wide admission counts and rate buckets: they return decisions and never call back
into a connection.

* :class:`AdmissionRegistry` (one per server) counts open WebSockets and running sessions by
  client address and by session token, and running recordings; :meth:`~AdmissionRegistry.check_connection`
  decides a ``/ws`` handshake (HTTP 503 at ``max_connections``, 429 at
  ``max_connections_per_address``) before any work is done.
* :class:`TokenBucket` paces one connection's messages (``max_messages_per_s``, ``message_burst``).
"""

from __future__ import annotations

import collections
import http
import time
from collections.abc import Callable
from pathlib import Path

from avatar_server.auth import Refusal
from avatar_server.settings import Limits
from streaming.recorder import disk_free_bytes


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` banked; :meth:`take` spends one."""

    def __init__(self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last_s = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last_s) * self.rate_per_s)
        self._last_s = now

    def take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def spend(self) -> None:
        """Take a token whether or not one is there (after waiting :meth:`wait_s`)."""
        self._refill()
        self._tokens -= 1.0

    def wait_s(self) -> float:
        """Seconds until a token is there (0: now)."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate_per_s)

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst


class AdmissionRegistry:
    """Open connections and running sessions by client address and by token, and running
    recordings (one per server).

    Args:
        limits: the limits.
        free_bytes: ``directory -> free bytes of its volume`` (tests inject a fake disk).
    """

    def __init__(self, limits: Limits, *, free_bytes: Callable[[Path], int] = disk_free_bytes) -> None:
        self.limits = limits
        self.free_bytes = free_bytes
        self.connections_by_address: collections.Counter[str] = collections.Counter()
        self.sessions_by_address: collections.Counter[str] = collections.Counter()
        self.sessions_by_token: collections.Counter[str] = collections.Counter()
        self.running_session_ids: set[str] = set()
        self.recordings_running = 0

    def check_connection(self, address: str) -> Refusal | None:
        """The refusal of a ``/ws`` handshake from ``address``: HTTP 503 at ``max_connections``,
        429 at ``max_connections_per_address``; ``None``: it may open."""
        total = sum(self.connections_by_address.values())
        if total >= self.limits.max_connections:
            return Refusal(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "too_many_connections",
                f"server busy: {total} connections; the limit is max_connections = {self.limits.max_connections}",
                (("Retry-After", "5"),),
            )
        limit = self.limits.max_connections_per_address
        if self.connections_by_address[address] >= limit:
            return Refusal(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                "too_many_connections",
                f"too many connections from {address}: the limit is max_connections_per_address = {limit}",
                (("Retry-After", "5"),),
            )
        return None

    @staticmethod
    def drop(counter: collections.Counter[str], key: str) -> None:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]
