"""The one segment geometry: seconds and pixels -> audio latents, latent frames, decoded frames, tokens
(PIPELINE.md §2.1, §3, §8).

For a segment of ``A`` audio latents (``A = round(25 * seconds) + 1`` for generated audio, or the
Oobleck encoding's length in lip-sync mode) at ``W x H`` pixels:

* latent frames ``T = (A - 1) // 4 + 1``; decoded frames ``F = 4 T - 3`` (Wan2.2's 4x temporal
  compression with a causal first frame);
* video latent ``[1, 48, T, H / 16, W / 16]``; video tokens ``T * (H / 32) * (W / 32)`` (1 x 2 x 2
  patches); audio tokens ``A``.

Examples: 5 s -> A 126, T 32, F 125; 2 s -> A 51, T 13, F 49.

Pure Python (no torch). :func:`engine.api.segment_frame_count` is the streaming layer's shortcut for
``SegmentGeometry.for_seconds(seconds, ...).frames`` (tested equal).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.api import VIDEO_FPS, EngineInputError

VAE_SPATIAL_STRIDE = 16  # Wan2.2 VAE: 16 pixels per latent cell (PIPELINE.md §3)
VAE_TEMPORAL_STRIDE = 4  # 4 frames per latent frame after the first
PATCH = 2  # DiT spatial patch 1 x 2 x 2 (PIPELINE.md §2.1)
PIXEL_MULTIPLE = VAE_SPATIAL_STRIDE * PATCH  # width/height must be multiples of 32


def audio_latents_for(seconds: float, fps: int = VIDEO_FPS) -> int:
    """Audio latents ``A = round(fps * seconds) + 1`` of a generated segment of ``seconds`` s."""
    return round(fps * seconds) + 1


def latent_frames_for(audio_latents: int) -> int:
    """Latent frames ``T = (A - 1) // 4 + 1`` (PIPELINE.md §3)."""
    return (audio_latents - 1) // VAE_TEMPORAL_STRIDE + 1


def check_resolution(width: int, height: int, *, names: tuple[str, str] = ("width", "height")) -> None:
    """Raise :class:`engine.api.EngineInputError` unless both sides are positive multiples of 32
    pixels (PIPELINE.md §3); ``names`` are the field names used in the message."""
    for name, value in zip(names, (width, height), strict=True):
        if value <= 0 or value % PIXEL_MULTIPLE:
            raise EngineInputError(f"{name} {value} must be a positive multiple of {PIXEL_MULTIPLE}")


@dataclass(frozen=True)
class SegmentGeometry:
    """Pixel size and latent/token geometry of one segment (PIPELINE.md §3, §8).

    Attributes:
        width, height: output size in pixels (multiples of 32 for the DiT).
        audio_latents: ``A``, audio latents (= audio tokens) of the segment.
    """

    width: int
    height: int
    audio_latents: int

    @classmethod
    def for_seconds(cls, seconds: float, width: int, height: int, fps: int = VIDEO_FPS) -> SegmentGeometry:
        """The geometry of a generated segment of ``seconds`` s (``A = round(25 s) + 1``)."""
        return cls(width, height, audio_latents_for(seconds, fps))

    @classmethod
    def for_audio_latents(cls, audio_latents: int, width: int, height: int) -> SegmentGeometry:
        """The geometry around a given audio latent length (lip-sync: the encoded audio's)."""
        return cls(width, height, audio_latents)

    @property
    def seconds(self) -> float:
        """``(A - 1) / 25`` s: the requested length that gives this many audio latents."""
        return (self.audio_latents - 1) / VIDEO_FPS

    @property
    def latent_frames(self) -> int:
        """``T = (A - 1) // 4 + 1``."""
        return latent_frames_for(self.audio_latents)

    @property
    def frames(self) -> int:
        """Decoded frames ``F = 4 T - 3``."""
        return VAE_TEMPORAL_STRIDE * self.latent_frames - (VAE_TEMPORAL_STRIDE - 1)

    @property
    def latent_height(self) -> int:
        """``h = H / 16``."""
        return self.height // VAE_SPATIAL_STRIDE

    @property
    def latent_width(self) -> int:
        """``w = W / 16``."""
        return self.width // VAE_SPATIAL_STRIDE

    @property
    def video_tokens(self) -> int:
        """``T * (h / 2) * (w / 2)`` video tokens (1 x 2 x 2 patches, PIPELINE.md §8.1)."""
        return self.latent_frames * (self.latent_height // PATCH) * (self.latent_width // PATCH)

    @property
    def audio_tokens(self) -> int:
        """``A`` audio tokens (one per latent)."""
        return self.audio_latents

    def latent_shape(self, channels: int = 48) -> tuple[int, int, int, int, int]:
        """Video latent shape ``(1, C, T, h, w)``."""
        return (1, channels, self.latent_frames, self.latent_height, self.latent_width)

    def sequence_length(self, text_tokens: int) -> int:
        """DiT sequence length ``Nv + Na + Nt``."""
        return self.video_tokens + self.audio_tokens + text_tokens

    def to_dict(self) -> dict:
        """JSON-friendly summary (benchmark records)."""
        return {"width": self.width, "height": self.height, "seconds": self.seconds,
                "latent": list(self.latent_shape()[1:]), "frames": self.frames,
                "video_tokens": self.video_tokens, "audio_tokens": self.audio_tokens}
