"""Server configuration: every setting and environment variable of the project is declared here.

Sources, highest first: command-line flags (passed as init arguments), environment variables
(prefix ``AVATAR_SERVER_``, nested groups joined with ``__``, e.g.
``AVATAR_SERVER_LIMITS__MAX_IMAGE_BYTES=8388608``), then the defaults below, which work on a
fresh machine. No other module of the server reads ``AVATAR_SERVER_*`` variables.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024

EnginePreset = Literal["preview", "testpattern", "full"]


class Limits(BaseModel):
    """Limits on client input; each error message names the field and the limit."""

    max_image_bytes: int = Field(8 * MIB, ge=4 * MIB, description="largest decoded reference image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest reference image, width x height")
    max_prompt_chars: int = Field(4000, ge=1, description="longest appearance prompt")
    max_text_chars: int = Field(2000, ge=1, description="longest text of one speak chunk")
    max_utterance_chars: int = Field(10_000, ge=1, description="longest utterance, all chunks")
    max_message_bytes: int = Field(16 * MIB, ge=1024, description="largest WebSocket message")

    @model_validator(mode="after")
    def _message_fits_image(self) -> Limits:
        # A session.start carries the image as base64 (4/3 of its size) plus the prompt.
        needed = -(-self.max_image_bytes // 3) * 4 + 4 * self.max_prompt_chars + 1024
        if self.max_message_bytes < needed:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least {needed} "
                f"to carry an image of max_image_bytes ({self.max_image_bytes}) as base64"
            )
        return self


class WebRTCSettings(BaseModel):
    """Peer-connection settings."""

    host_addresses: list[str] | None = Field(
        None,
        description=(
            "local addresses offered as ICE host candidates; default: 127.0.0.1 when the server "
            "binds a loopback host, otherwise every interface (aioice's own discovery)"
        ),
    )
    ice_servers: list[str] = Field(
        default_factory=list, description="STUN/TURN URLs, e.g. stun:stun.example.org:3478 (none by default)"
    )


class VadSettings(BaseModel):
    """Voice activity detection on the client's microphone."""

    threshold: float = Field(0.5, gt=0, lt=1)
    hangover_ms: float = Field(400.0, ge=0)
    preroll_ms: float = Field(200.0, ge=0)


class Settings(BaseSettings):
    """All settings of ``avatar-server``."""

    model_config = SettingsConfigDict(
        env_prefix="AVATAR_SERVER_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    engine: EnginePreset = Field("preview", description="engine preset")
    checkpoint_dir: Path | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    testpattern_delay_s: float = Field(0.0, ge=0, description="simulated generation time of the testpattern engine")

    segment_seconds: float = Field(2.0, gt=0, description="length of speech and lip-sync segments")
    idle_segment_seconds: float = Field(2.0, gt=0, description="length of idle segments")
    min_segment_seconds: float = Field(1.0, gt=0)
    playout_target_ms: float = Field(2000.0, gt=0, description="media kept queued ahead of playback")
    words_per_second: float = Field(2.5, gt=0)
    max_sessions: int = Field(2, ge=1, description="concurrent sessions; /readyz is 503 when all are taken")
    stats_interval_s: float = Field(1.0, gt=0, description="period of the `stats` message")

    limits: Limits = Field(default_factory=Limits)
    webrtc: WebRTCSettings = Field(default_factory=WebRTCSettings)
    vad: VadSettings = Field(default_factory=VadSettings)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    def ice_host_addresses(self) -> list[str] | None:
        """Addresses for ICE host candidates, or ``None`` for aioice's own discovery."""
        if self.webrtc.host_addresses is not None:
            return list(self.webrtc.host_addresses)
        return ["127.0.0.1"] if is_loopback_host(self.host) else None


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
