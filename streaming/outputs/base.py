"""What every live output shares: its state event, reconnect backoff and secret redaction.

An output (RTMP/RTMPS push, WHIP push) reports its state as :class:`OutputState` events:
``connecting`` (first attempt), ``live`` (media is flowing to the remote), ``reconnecting``
(a network failure; ``reason`` says which, the next attempt follows after a backoff),
``failed`` (given up; ``reason``), ``stopped`` (stopped by its owner).

Stream keys (the path of an RTMP URL after the application), URL credentials and query
strings, and WHIP bearer tokens are secrets: they never appear in logs, metrics or events.
:func:`redact_url` gives the printable form of an output URL and :func:`redact_text` removes
given secrets from any text (error messages from FFmpeg or aiortc quote the URL).
"""

from __future__ import annotations

import random
import re
import threading
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

OutputStateName = Literal["connecting", "live", "reconnecting", "failed", "stopped"]
REDACTED = "***"


@dataclass(frozen=True)
class OutputState:
    """A live output changed state (``output.state`` on the wire).

    Attributes:
        output_id: the id its owner gave it.
        type: ``rtmp`` or ``whip``.
        state: see the module docstring.
        url: the output URL with secrets redacted (:func:`redact_url`).
        reason: why (``reconnecting``, ``failed``), secrets redacted; else ``None``.
        attempt: reconnect attempts since the output was last live (0 on the first connect).
    """

    output_id: str
    type: str
    state: OutputStateName
    url: str
    reason: str | None = None
    attempt: int = 0


def redact_url(url: str) -> str:
    """``url`` without its secrets: password and user, query and fragment, and for
    ``rtmp``/``rtmps`` every path segment after the first (the application), which is where
    platforms put the stream key. ``rtmp://a.example/live2/abc?x=1`` ->
    ``rtmp://a.example/live2/***``; ``https://u:p@h/whip?token=t`` -> ``https://***@h/whip?***``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"{REDACTED}@{netloc}"
    path = parts.path
    if parts.scheme.lower() in ("rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpte", "rtmpts"):
        segments = path.split("/")  # ["", app, key...]
        if len(segments) > 2 and any(segments[2:]):
            path = "/".join(segments[:2] + [REDACTED])
    query = f"?{REDACTED}" if parts.query else ""
    fragment = f"#{REDACTED}" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{path}{query}{fragment}"


def url_secrets(url: str) -> list[str]:
    """The secret substrings of ``url`` (see :func:`redact_url`), longest first, for
    :func:`redact_text`."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    if parts.scheme.lower().startswith("rtmp"):
        segments = parts.path.split("/")
        if len(segments) > 2:
            found.append("/".join(segments[2:]))
            found.extend(segments[2:])
    for piece in (parts.password, parts.username, parts.query, parts.fragment):
        if piece:
            found.append(piece)
            found.append(urllib.parse.unquote(piece))
    for _name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if value:
            found.append(value)
    return sorted({s for s in found if len(s) >= 3}, key=lambda s: (-len(s), s))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (case-sensitive) replaced by ``***``.
    Secrets shorter than 3 characters are left alone (they would shred ordinary words)."""
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return re.sub(r"(?i)(bearer\s+)\S+", rf"\1{REDACTED}", text)


@dataclass(frozen=True)
class Backoff:
    """Exponential reconnect backoff with jitter: attempt ``n`` (1, 2, ...) waits
    ``min(max_s, initial_s * factor ** (n - 1))`` seconds, times a uniform factor in
    ``[1 - jitter, 1]``; after ``max_attempts`` failed attempts in a row (``None``: never)
    the output gives up (``failed``)."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0
    jitter: float = 0.2
    max_attempts: int | None = None

    def delay_s(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1))
        return base * (1.0 - self.jitter * random.random())


async def receiver_report_key(pc) -> tuple:
    """What the remote's RTCP receiver reports (RFC 3550 section 6.4.2) have said so far, as a
    comparable key: it changes whenever a new report arrives for any sender of ``pc`` (an
    aiortc ``RTCPeerConnection``). A key that stays the same for several report intervals
    means the remote stopped reading or vanished, long before ICE consent (about 30 s) fails."""
    reports = []
    for transceiver in pc.getTransceivers():
        try:
            stats = await transceiver.sender.getStats()
        except Exception:  # a sender without a transport yet
            continue
        reports += [
            (s.id, s.timestamp, s.packetsReceived)
            for s in stats.values()
            if getattr(s, "type", "") == "remote-inbound-rtp"
        ]
    return tuple(sorted(reports, key=str))


class StopFlag(threading.Event):
    """A stop request readable from a writer thread; ``wait`` doubles as an interruptible sleep."""
