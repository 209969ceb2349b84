"""The avatar's audio reaches a WebRTC listener at its own level.

aiortc's Opus encoder always encodes stereo; a mono track is upmixed at 1/sqrt(2) per channel
(-3 dB, half the energy). :class:`streaming.webrtc.StereoTrack` hands the encoder the channel
duplicated instead. Measured through two real aiortc peer connections on loopback: a 440 Hz tone
at amplitude 0.5, 48 kHz mono s16, received and averaged over channels.
"""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from clients.media import audio_frame_to_mono
from streaming.webrtc import StereoTrack

RATE_HZ = 48_000
CHUNK = 960  # 20 ms


class ToneTrack(MediaStreamTrack):
    """A 440 Hz sine at amplitude 0.5, mono s16 20 ms frames, paced in real time."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.index = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time()
        await asyncio.sleep(max(0.0, self.start + self.index * CHUNK / RATE_HZ - loop.time()))
        t = (np.arange(CHUNK) + self.index * CHUNK) / RATE_HZ
        pcm = (0.5 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE_HZ, self.index * CHUNK, fractions.Fraction(1, RATE_HZ)
        self.index += 1
        return frame


async def received_rms(track: MediaStreamTrack, seconds: float = 1.5) -> float:
    """RMS of what a listener hears (channels averaged) after the first 0.5 s (codec start-up)."""
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    sender.addTrack(track)
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    receiver.on("track", lambda remote: got.set_result(remote))
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    try:
        remote = await asyncio.wait_for(got, 10)
        samples, heard_s = [], 0.0
        while heard_s < 0.5 + seconds:
            frame = await asyncio.wait_for(remote.recv(), 10)
            heard_s += frame.samples / frame.sample_rate
            if heard_s > 0.5:
                samples.append(audio_frame_to_mono(frame))
        return float(np.sqrt(np.mean(np.concatenate(samples) ** 2)))
    finally:
        await sender.close()
        await receiver.close()


async def test_a_stereo_track_keeps_the_level_that_a_mono_track_loses() -> None:
    expected = 0.5 / np.sqrt(2)  # RMS of the tone as sent
    mono = await received_rms(ToneTrack())
    stereo = await received_rms(StereoTrack(ToneTrack()))
    assert abs(mono / expected - 1 / np.sqrt(2)) < 0.08, mono / expected  # the encoder's -3 dB upmix
    assert abs(stereo / expected - 1.0) < 0.08, stereo / expected  # the track's own level
