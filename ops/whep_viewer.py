"""WHEP viewers for tests and measurements: an in-process aiortc viewer, and one in a subprocess
(``python -m ops.whep_viewer``: offer and answer as JSON lines on stdout/stdin), which a test can
freeze with SIGSTOP (a viewer that stops reading and stops sending RTCP, like a vanished one)
and a measurement uses to keep the viewers' decoding out of the server's process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


class Viewer:
    """A receive-only aiortc peer that counts decoded frames (``frames[kind]``, with times)."""

    def __init__(self, *, video_codec: str | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames: dict[str, list[float]] = {"video": [], "audio": []}
        self.video_pts_s: list[float] = []  # media time of each decoded video frame
        self.shapes: set[tuple] = set()
        self.tasks: list[asyncio.Task] = []
        self.video_codec = video_codec

    async def offer(self) -> str:
        video = self.pc.addTransceiver("video", direction="recvonly")
        if self.video_codec:
            video.setCodecPreferences(
                [c for c in RTCRtpReceiver.getCapabilities("video").codecs if c.mimeType.lower() == self.video_codec]
            )
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda track: self.tasks.append(asyncio.ensure_future(self._consume(track))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def _consume(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames[track.kind].append(time.monotonic())
            if track.kind == "video":
                self.shapes.add((frame.height, frame.width))
                self.video_pts_s.append(float(frame.pts * frame.time_base))

    def media_rate(self, since_s: float, until_s: float) -> float:
        """Video frames decoded per second of *media* time, over the frames that arrived between
        the two wall times: 25 when every frame of a 25 fps stream was decoded, however late
        (a loaded machine delays frames; a viewer that misses frames counts fewer)."""
        pts = [p for t, p in zip(self.frames["video"], self.video_pts_s, strict=True) if since_s <= t < until_s]
        return (len(pts) - 1) / (pts[-1] - pts[0]) if len(pts) > 1 and pts[-1] > pts[0] else 0.0

    def rate(self, kind: str, since_s: float, until_s: float) -> float:
        count = sum(1 for t in self.frames[kind] if since_s <= t < until_s)
        return count / (until_s - since_s)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


async def _subprocess_main() -> None:
    """Print the offer (one JSON line), read the answer (one JSON line), then print the
    number of decoded video frames every 0.5 s."""
    from avatar_server.webrtc import use_host_addresses

    use_host_addresses(["127.0.0.1"])
    viewer = Viewer()
    print(json.dumps({"offer": await viewer.offer()}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await viewer.answer(json.loads(line)["answer"])
    while True:
        await asyncio.sleep(0.5)
        print(json.dumps({"video": len(viewer.frames["video"])}), flush=True)


if __name__ == "__main__":
    asyncio.run(_subprocess_main())
