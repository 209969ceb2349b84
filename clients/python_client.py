"""Python client on aiortc: image + text (or an audio file as its microphone) in, MP4 out.

:class:`AvatarClient` speaks the protocol of docs/PROTOCOL.md over ``/ws`` and receives the
avatar over WebRTC. The client reads each received track itself, logs every frame (arrival
time, pts, and for audio the samples; tests measure on this log) and then hands the frame on
to aiortc's ``MediaRecorder`` (optional MP4). The log is written before the recorder sees the
frame because PyAV's encoder rebases a frame's ``pts`` in place.

``avatar-server client`` (see :func:`run_cli`) drives it from the command line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer, MediaRecorder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection, connect

from avatar_server.settings import is_loopback_host
from avatar_server.webrtc import make_peer_connection, use_host_addresses, wait_connected

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class VideoRecord:
    """One received video frame: arrival (monotonic s), pts in seconds, size, mean luma (0-255)."""

    arrival_s: float
    pts_s: float
    width: int
    height: int
    mean_luma: float


@dataclass
class AudioRecord:
    """One received audio frame: arrival (monotonic s), pts in seconds, mono float32 samples."""

    arrival_s: float
    pts_s: float
    sample_rate: int
    samples: np.ndarray


@dataclass
class Received:
    """Everything the client received, in order."""

    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    video: list[VideoRecord] = field(default_factory=list)
    audio: list[AudioRecord] = field(default_factory=list)

    def audio_samples(self) -> np.ndarray:
        if not self.audio:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([rec.samples for rec in self.audio])


class _ForwardTrack(MediaStreamTrack):
    """Frames pushed by the client's reader, for the recorder; ``None`` ends the track."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.frame.Frame | None] = asyncio.Queue()

    def push(self, frame: av.frame.Frame | None) -> None:
        self._queue.put_nowait(frame)

    async def recv(self) -> av.frame.Frame:
        frame = await self._queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


def ws_url(url: str) -> str:
    """``http://h:p/`` or ``ws://h:p`` -> ``ws://h:p/ws``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class AvatarClient:
    """One avatar session from Python.

    Args:
        url: server URL (``http://127.0.0.1:8080/`` or ``ws://127.0.0.1:8080/ws``).
        record_path: write what is received to this MP4 (``None``: no recording).
        ice_servers: STUN/TURN URLs (none by default).
        host_addresses: ICE host candidates; default ``["127.0.0.1"]`` for a loopback server.
        keep_audio: keep received audio samples in :attr:`received` (for analysis).
        on_video_frame: called with every received ``av.VideoFrame`` (after logging it).
        token: session token (from the server's ``POST /v1/tokens``), sent as
            ``Authorization: Bearer``; needed when the server has an api key.
    """

    def __init__(
        self,
        url: str,
        *,
        record_path: str | Path | None = None,
        ice_servers: Sequence[str] = (),
        host_addresses: Sequence[str] | None = None,
        keep_audio: bool = True,
        on_video_frame: Callable[[av.VideoFrame], None] | None = None,
        token: str | None = None,
    ) -> None:
        self.url = ws_url(url)
        self.token = token
        self.record_path = None if record_path is None else Path(record_path)
        self.ice_servers = list(ice_servers)
        host = urlsplit(self.url).hostname or ""
        if host_addresses is None and is_loopback_host(host):
            host_addresses = ["127.0.0.1"]
        self.host_addresses = host_addresses
        self.keep_audio = keep_audio
        self.on_video_frame = on_video_frame
        self.received = Received()
        self.session: dict[str, Any] | None = None
        self.pc: RTCPeerConnection | None = None
        self._ws: ClientConnection | None = None
        self._recorder: MediaRecorder | None = None
        self._player: MediaPlayer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._new_message = asyncio.Condition()
        self._cursor = 0

    # ----------------------------------------------------------------------------- control
    async def connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self._ws = await connect(self.url, max_size=MAX_MESSAGE_BYTES, compression=None, additional_headers=headers)
        self._tasks.append(asyncio.get_running_loop().create_task(self._read_loop(), name="client-ws-read"))

    async def send(self, message: dict[str, Any] | str) -> None:
        """Send a JSON message (a dict) or a raw text frame (a str, e.g. to test bad input)."""
        assert self._ws is not None, "connect() first"
        await self._ws.send(message if isinstance(message, str) else json.dumps(message))

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                async with self._new_message:
                    self.received.messages.append((time.monotonic(), message))
                    self._new_message.notify_all()
        except websockets.ConnectionClosed:
            pass

    async def wait_for(
        self, type_: str, predicate: Callable[[dict[str, Any]], bool] | None = None, *, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """The next message of ``type_`` (after the last one returned) matching ``predicate``."""

        def find() -> dict[str, Any] | None:
            for index in range(self._cursor, len(self.received.messages)):
                message = self.received.messages[index][1]
                if message.get("type") == type_ and (predicate is None or predicate(message)):
                    self._cursor = index + 1
                    return message
            return None

        async with asyncio.timeout(timeout_s), self._new_message:
            while (found := find()) is None:
                await self._new_message.wait()
            return found

    def messages(self, type_: str) -> list[dict[str, Any]]:
        return [m for _, m in self.received.messages if m.get("type") == type_]

    async def start_session(self, image: bytes, prompt: str = "", *, timeout_s: float = 30.0) -> dict[str, Any]:
        await self.send({"type": "session.start", "image": base64.b64encode(image).decode(), "prompt": prompt})
        ready = await self._wait_ready_or_error(timeout_s)
        self.session = ready
        return ready

    async def _wait_ready_or_error(self, timeout_s: float) -> dict[str, Any]:
        message = await self._wait_any(("session.ready", "error"), timeout_s)
        if message["type"] == "error":
            raise RuntimeError(f"session.start refused: {message['code']}: {message['message']}")
        return message

    async def _wait_any(self, types: Sequence[str], timeout_s: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s), self._new_message:
            while True:
                for index in range(self._cursor, len(self.received.messages)):
                    message = self.received.messages[index][1]
                    if message.get("type") in types:
                        self._cursor = index + 1
                        return message
                await self._new_message.wait()

    async def speak(self, utterance_id: str, chunks: Sequence[str], *, language: str | None = None) -> None:
        """Send an utterance as text chunks, then ``speak.end``."""
        for chunk in chunks:
            message: dict[str, Any] = {"type": "speak", "utterance_id": utterance_id, "text": chunk}
            if language:
                message["language"] = language
            await self.send(message)
        await self.send({"type": "speak.end", "utterance_id": utterance_id})

    async def interrupt(self) -> None:
        await self.send({"type": "interrupt"})

    # ----------------------------------------------------------------------------- media
    async def start_media(self, *, microphone: str | Path | None = None, timeout_s: float = 20.0) -> None:
        """Negotiate WebRTC: receive video+audio; send ``microphone`` (an audio file) if given."""
        use_host_addresses(self.host_addresses)
        # The server's STUN/TURN servers (session.ready) unless the caller chose its own.
        pc = make_peer_connection(self.ice_servers or (self.session or {}).get("ice_servers") or [])
        self.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            self._player = MediaPlayer(str(microphone))
            if self._player.audio is None:
                raise ValueError(f"microphone: {microphone} has no audio stream")
            pc.addTrack(self._player.audio)
        else:
            pc.addTransceiver("audio", direction="recvonly")
        if self.record_path is not None:
            self._recorder = MediaRecorder(str(self.record_path))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            forward = None
            if self._recorder is not None:
                forward = _ForwardTrack(track.kind)
                self._recorder.addTrack(forward)
            consume = self._consume_video if track.kind == "video" else self._consume_audio
            self._tasks.append(asyncio.get_running_loop().create_task(consume(track, forward)))

        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        await self.send({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
        answer = await self._wait_any(("webrtc.answer", "error"), timeout_s)
        if answer["type"] == "error":
            raise RuntimeError(f"webrtc.offer refused: {answer['code']}: {answer['message']}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        if self._recorder is not None:
            await self._recorder.start()
        await wait_connected(pc, timeout_s)

    async def _consume_video(self, track: MediaStreamTrack, forward: _ForwardTrack | None) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if forward is not None:
                    forward.push(None)
                return
            arrival_s = time.monotonic()
            luma = frame.to_ndarray(format="gray")
            self.received.video.append(
                VideoRecord(arrival_s, float(frame.pts * frame.time_base), frame.width, frame.height, float(luma.mean()))
            )
            if self.on_video_frame is not None:
                self.on_video_frame(frame)
            if forward is not None:
                forward.push(frame)

    async def _consume_audio(self, track: MediaStreamTrack, forward: _ForwardTrack | None) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if forward is not None:
                    forward.push(None)
                return
            arrival_s = time.monotonic()
            samples = np.zeros(0, dtype=np.float32)
            if self.keep_audio:
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                if frame.format.is_planar:
                    mono = pcm.reshape(channels, -1).astype(np.float32).mean(axis=0)
                else:
                    mono = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1)
                scale = 32768.0 if pcm.dtype == np.int16 else 1.0
                samples = mono / scale
            self.received.audio.append(
                AudioRecord(arrival_s, float(frame.pts * frame.time_base), frame.sample_rate, samples)
            )
            if forward is not None:
                forward.push(frame)

    async def close(self) -> None:
        """Stop recording (flushing the MP4), close the peer connection and the WebSocket."""
        if self._recorder is not None:
            with contextlib.suppress(Exception):
                await self._recorder.stop()
        if self.pc is not None:
            await self.pc.close()
        if self._player is not None and self._player.audio is not None:
            self._player.audio.stop()
        if self._ws is not None:
            await self._ws.close()
        for task in reversed(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def split_chunks(text: str, words_per_chunk: int) -> list[str]:
    """Split ``text`` into chunks of ``words_per_chunk`` words, keeping the spaces (as a
    streaming LLM would send them)."""
    words = text.split(" ")
    return [
        " ".join(words[i : i + words_per_chunk]) + (" " if i + words_per_chunk < len(words) else "")
        for i in range(0, len(words), words_per_chunk)
    ]


async def run_client(
    *,
    url: str,
    image: bytes,
    prompt: str,
    says: Sequence[str],
    language: str | None,
    microphone: Path | None,
    record: Path | None,
    chunk_words: int,
    duration_s: float,
    timeout_s: float,
    out: Callable[[str], None] = print,
    token: str | None = None,
) -> dict[str, Any]:
    """What ``avatar-server client`` does; returns the summary it prints last."""
    client = AvatarClient(url, record_path=record, keep_audio=False, token=token)
    started = time.monotonic()
    await client.connect()
    try:
        ready = await client.start_session(image, prompt, timeout_s=timeout_s)
        out(json.dumps(ready))
        await client.start_media(microphone=microphone, timeout_s=timeout_s)
        printed = len(client.received.messages)
        for number, text in enumerate(says, start=1):
            utterance_id = f"u{number}"
            await client.speak(utterance_id, split_chunks(text, chunk_words), language=language)
            await client.wait_for("speak.ended", lambda m, u=utterance_id: m["utterance_id"] == u, timeout_s=timeout_s)
            for _, message in client.received.messages[printed:]:
                if message["type"] != "stats":
                    out(json.dumps(message))
            printed = len(client.received.messages)
        await asyncio.sleep(duration_s)
        for _, message in client.received.messages[printed:]:
            if message["type"] != "stats":
                out(json.dumps(message))
    finally:
        await client.close()
    elapsed_s = time.monotonic() - started
    video = client.received.video
    span_s = video[-1].arrival_s - video[0].arrival_s if len(video) > 1 else 0.0
    summary = {
        "type": "summary",
        "video_frames": len(video),
        "video_fps": round((len(video) - 1) / span_s, 2) if span_s > 0 else None,
        "audio_frames": len(client.received.audio),
        "elapsed_s": round(elapsed_s, 2),
        "recording": None if record is None else str(record),
    }
    out(json.dumps(summary))
    return summary
