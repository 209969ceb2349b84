"""WebRTC helpers shared by the server and the Python client (both may import this module)."""

from __future__ import annotations

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack


class StereoTrack(MediaStreamTrack):
    """An audio track whose mono ``s16`` frames are handed to an aiortc sender as packed stereo,
    the one channel on both sides; other frames pass unchanged (same ``pts``, rate, time base).

    aiortc's Opus encoder always encodes stereo and upmixes mono through libswresample at
    ``1/sqrt(2)`` per channel, so a mono track reaches the listener 3 dB down; duplicated, the
    level is the track's own. Stopping this track stops the source.

    Args:
        source: an audio :class:`MediaStreamTrack` (e.g. :class:`AvatarAudioTrack`).
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack) -> None:
        super().__init__()
        self.source = source

    async def recv(self) -> av.AudioFrame:
        frame = await self.source.recv()
        if frame.layout.name != "mono" or frame.format.name != "s16":
            return frame
        pcm = frame.to_ndarray()  # [1, n] int16
        out = av.AudioFrame.from_ndarray(np.repeat(pcm, 2, axis=1), format="s16", layout="stereo")  # L R L R
        out.sample_rate, out.pts, out.time_base = frame.sample_rate, frame.pts, frame.time_base
        return out

    def stop(self) -> None:
        self.source.stop()
        super().stop()
