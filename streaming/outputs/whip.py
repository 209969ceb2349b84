"""Push a session to a media server or CDN ingest over WHIP (RFC 9725), with aiortc.

Per RFC 9725 section 4.2: the client POSTs an SDP offer (``Content-Type: application/sdp``)
to the WHIP endpoint URL, with ``Authorization: Bearer <token>`` when the endpoint wants one
(section 4.5); the endpoint answers ``201 Created`` with the SDP answer as the body and the
URL of the session's WHIP resource in ``Location`` (relative references resolve against the
endpoint URL). The session ends with an HTTP ``DELETE`` of that resource (section 4.2.2).
aiortc gathers all its ICE candidates before the offer is created, so the offer is complete
and no trickle ICE (``PATCH``) is needed.

The media come from the session's :class:`~streaming.fanout.MediaFanout` through two
:class:`~streaming.fanout.SinkTrack` s (send-only video and audio transceivers). aiortc's
sender encodes: H.264 or VP8 video at the session's frame size, with the bitrate following
the receiver's REMB estimate and keyframes on PLI/FIR; Opus audio.

A connection that fails (ICE/DTLS failure, the endpoint refusing, a timeout, no RTCP receiver
report from the ingest for ``report_timeout_s``) is closed and,
after :class:`~streaming.outputs.base.Backoff`, a new one is offered. Each change is an
:class:`~streaming.outputs.base.OutputState` event; the bearer token and URL secrets are in
none of them, nor in a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from streaming.fanout import MediaFanout, SinkTrack
from streaming.outputs.base import (
    Backoff,
    OutputState,
    OutputStateName,
    receiver_report_key,
    redact_text,
    redact_url,
    url_secrets,
)
from streaming.webrtc import StereoTrack

logger = logging.getLogger(__name__)

SDP_CONTENT_TYPE = "application/sdp"


class WhipError(ConnectionError):
    """The WHIP endpoint refused or answered something that is not a WHIP answer."""


def default_peer_connection() -> RTCPeerConnection:
    """A peer connection that gathers host candidates only (no STUN server)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class WhipOutput:
    """One WHIP push (see the module docstring).

    Args:
        output_id: the owner's id for it (in events).
        url: the WHIP endpoint (``http://`` or ``https://``).
        fanout: the session's media pump.
        bearer_token: sent as ``Authorization: Bearer``; a secret.
        on_state: called on the event loop with every :class:`OutputState`.
        backoff: reconnect policy.
        connect_timeout_s: limit on one attempt: HTTP exchange plus ICE/DTLS connection.
        report_timeout_s: a live connection without an RTCP receiver report from the ingest
            for this long counts as failed (the ingest dropped it or vanished: ICE consent
            alone would take about 30 s to notice).
        peer_connection_factory: makes each attempt's :class:`RTCPeerConnection` (the server
            passes one with its STUN/TURN servers).

    Raises:
        ValueError: ``url`` is not http(s) with a host.
    """

    type = "whip"

    def __init__(
        self,
        output_id: str,
        url: str,
        fanout: MediaFanout,
        *,
        bearer_token: str | None = None,
        on_state: Callable[[OutputState], None] | None = None,
        backoff: Backoff | None = None,
        connect_timeout_s: float = 15.0,
        report_timeout_s: float = 10.0,
        peer_connection_factory: Callable[[], RTCPeerConnection] = default_peer_connection,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url: scheme {parts.scheme[:10]!r} is not http or https, or the url has no host")
        self.output_id = output_id
        self._url = url
        self.url = redact_url(url)
        self._token = bearer_token
        self._secrets = url_secrets(url) + ([bearer_token] if bearer_token else [])
        self._fanout = fanout
        self._on_state = on_state
        self._backoff = backoff or Backoff()
        self._connect_timeout_s = connect_timeout_s
        self._report_timeout_s = report_timeout_s
        self._pc_factory = peer_connection_factory
        self._task: asyncio.Task[None] | None = None
        self._pc: RTCPeerConnection | None = None
        self._tracks: list[SinkTrack] = []
        self._resource: str | None = None
        self.state: OutputStateName | None = None
        self.reason: str | None = None
        self.connects = 0

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _set_state(self, state: OutputStateName, reason: str | None = None, attempt: int = 0) -> None:
        if state == self.state and reason == self.reason and state != "reconnecting":
            return
        self.state, self.reason = state, reason
        if state in ("reconnecting", "failed"):
            logger.warning("output %s (%s) %s: %s", self.output_id, self.url, state, reason)
        else:
            logger.info("output %s (%s) %s", self.output_id, self.url, state)
        if self._on_state is not None:
            try:
                self._on_state(OutputState(self.output_id, self.type, state, self.url, reason, attempt))
            except Exception:
                logger.exception("output state handler failed")

    def start(self) -> None:
        """Start pushing (idempotent); runs as a task on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"whip-{self.output_id}")

    async def stop(self) -> None:
        """Stop pushing: DELETE the WHIP resource, close the peer connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._teardown()
        if self.state != "failed":
            self._set_state("stopped")

    def stats(self) -> dict[str, object]:
        """Figures for metrics and the API (no secrets)."""
        video = next((t for t in self._tracks if t.kind == "video"), None)
        return {
            "output_id": self.output_id,
            "type": self.type,
            "url": self.url,
            "state": self.state,
            "reason": self.reason,
            "connects": self.connects,
            "video_frames_sent": 0 if video is None else video.delivered,
            "dropped": sum(t.dropped for t in self._tracks),
        }

    async def _run(self) -> None:
        attempt = 0
        self._set_state("connecting")
        while True:
            reason = "connection ended"
            try:
                await self._connect_and_hold()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = redact_text(f"{type(exc).__name__}: {exc}", self._secrets)
            await self._teardown()
            if self.state == "live":
                attempt = 0
            attempt += 1
            limit = self._backoff.max_attempts
            if limit is not None and attempt > limit:
                self._set_state("failed", f"{reason} (after {limit} attempts)", attempt)
                return
            self._set_state("reconnecting", reason, attempt)
            await asyncio.sleep(self._backoff.delay_s(attempt))

    async def _connect_and_hold(self) -> None:
        """One connection: offer, answer, connect; returns or raises when it ends."""
        pc = self._pc = self._pc_factory()
        ended = asyncio.get_running_loop().create_future()

        def on_state() -> None:
            if pc.connectionState == "connected" and self.state != "live":
                self._set_state("live")
            elif pc.connectionState in ("failed", "closed") and not ended.done():
                ended.set_result(pc.connectionState)

        pc.on("connectionstatechange", on_state)
        for kind in ("video", "audio"):
            track = SinkTrack(self._fanout, kind)
            self._tracks.append(track)
            pc.addTransceiver(StereoTrack(track) if kind == "audio" else track, direction="sendonly")
        async with asyncio.timeout(self._connect_timeout_s):
            await pc.setLocalDescription(await pc.createOffer())
            async with httpx.AsyncClient(timeout=self._connect_timeout_s) as http:
                response = await http.post(
                    self._url, content=pc.localDescription.sdp, headers=self._headers(SDP_CONTENT_TYPE)
                )
            if response.status_code != 201:
                raise WhipError(f"WHIP endpoint answered {response.status_code}, not 201 Created")
            if not response.headers.get("content-type", "").startswith(SDP_CONTENT_TYPE):
                raise WhipError(f"WHIP answer has Content-Type {response.headers.get('content-type')!r}")
            location = response.headers.get("location")
            if not location:
                raise WhipError("WHIP answer has no Location header")
            self._resource = urllib.parse.urljoin(str(response.url), location)
            self.connects += 1
            await pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
            while pc.connectionState != "connected":
                if ended.done():
                    raise ConnectionError(f"peer connection {ended.result()} before it connected")
                await asyncio.sleep(0.05)
        on_state()
        key, heard_s = None, time.monotonic()
        while not ended.done():
            await asyncio.wait([ended], timeout=min(1.0, self._report_timeout_s / 4))
            now_s = time.monotonic()
            if (new_key := await receiver_report_key(pc)) != key:
                key, heard_s = new_key, now_s
            elif now_s - heard_s > self._report_timeout_s:
                raise ConnectionError(f"no RTCP receiver report from the ingest for {self._report_timeout_s:g} s")
        raise ConnectionError(f"peer connection {ended.result()}")

    async def _teardown(self) -> None:
        resource, self._resource = self._resource, None
        pc, self._pc = self._pc, None
        for track in self._tracks:
            track.stop()
        self._tracks.clear()
        if resource is not None:
            try:
                async with httpx.AsyncClient(timeout=5.0) as http:
                    await http.delete(resource, headers=self._headers())
            except httpx.HTTPError as exc:
                logger.info(
                    "output %s: DELETE of the WHIP resource failed: %s",
                    self.output_id,
                    redact_text(str(exc), self._secrets),
                )
        if pc is not None:
            try:
                await asyncio.wait_for(pc.close(), 5.0)
            except Exception as exc:  # closing goes on regardless
                logger.debug("output %s: peer connection close: %s", self.output_id, type(exc).__name__)
