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

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from avatar_server.ice import IceCandidatePolicy

MIB = 1024 * 1024
GIB = 1024 * MIB

EnginePreset = Literal["preview", "testpattern", "full"]


class Limits(BaseModel):
    """Limits on client input; each error message names the field and the limit."""

    max_image_bytes: int = Field(8 * MIB, ge=4 * MIB, description="largest decoded reference image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest reference image, width x height")
    max_prompt_chars: int = Field(4000, ge=1, description="longest appearance prompt")
    max_text_chars: int = Field(2000, ge=1, description="longest text of one speak chunk")
    max_utterance_chars: int = Field(10_000, ge=1, description="longest utterance, all chunks")
    max_message_bytes: int = Field(16 * MIB, ge=1024, description="largest WebSocket message")
    # Issue 6 (enforced by avatar_server/limits.py; the table is in docs/PROTOCOL.md, "Limits").
    max_messages_per_s: float = Field(20.0, gt=0, description="sustained client messages per second (token bucket)")
    message_burst: int = Field(40, ge=1, description="client messages allowed at once above the rate")
    max_send_queue_messages: int = Field(256, ge=8, description="server messages waiting for a slow client")
    send_timeout_s: float = Field(30.0, gt=0, description="longest wait for a client to take one message")
    max_pending_utterances: int = Field(16, ge=1, description="utterances of a session not yet spoken")
    max_sdp_bytes: int = Field(64 * 1024, ge=1024, description="largest webrtc.offer SDP")
    max_sdp_media_sections: int = Field(2, ge=1, description="m= sections of an offer (audio/video only)")
    offer_timeout_s: float = Field(30.0, gt=0, description="session.ready (or a lost peer connection) to offer")
    ice_timeout_s: float = Field(20.0, gt=0, description="webrtc.answer to a connected peer connection")
    ping_interval_s: float = Field(20.0, gt=0, description="WebSocket keepalive ping period")
    ping_timeout_s: float = Field(20.0, gt=0, description="pong wait before a silent connection is dropped")
    handshake_timeout_s: float = Field(10.0, gt=0, description="TCP accept to a complete HTTP/WebSocket handshake")
    close_timeout_s: float = Field(10.0, gt=0, description="wait for a client's closing handshake before dropping it")
    # Issue 18: what one connection can make the server hold (enforced by avatar_server/transport.py).
    max_control_frames_per_s: float = Field(
        10.0, gt=0, description="WebSocket pings (and pongs) a client may send per second; over it the connection is closed (1008)"
    )
    control_frame_burst: int = Field(20, ge=1, description="control frames allowed at once above max_control_frames_per_s")
    max_output_buffer_bytes: int = Field(
        4 * MIB,
        ge=64 * 1024,
        description="bytes waiting to be sent to one WebSocket client; over it the connection is dropped",
    )
    max_connections: int = Field(256, ge=1, description="open WebSocket connections in all (keep below the fd limit)")
    max_connections_per_address: int = Field(32, ge=1, description="open WebSocket connections per client IP")
    session_start_timeout_s: float = Field(60.0, gt=0, description="connection open to session.start")
    max_sessions_per_address: int = Field(4, ge=1, description="running sessions per client IP")
    max_sessions_per_token: int = Field(1, ge=1, description="running sessions per session token")
    max_microphone_buffer_s: float = Field(30.0, ge=5, description="microphone audio kept for lip-sync")
    max_microphone_lead_s: float = Field(2.0, gt=0, description="microphone audio ahead of wall-clock time")
    max_microphone_channels: int = Field(2, ge=1, description="channels of an incoming microphone frame")
    max_microphone_frame_ms: float = Field(120.0, gt=0, description="longest incoming microphone frame")
    microphone_sample_rates_hz: list[int] = Field(
        default_factory=lambda: [8000, 12000, 16000, 24000, 32000, 44100, 48000],
        description="sample rates accepted on the microphone track",
    )
    max_engine_failures: int = Field(3, ge=1, description="failed segments in a row before a session ends")
    # Recording (record.start; enforced by avatar_server/limits.py and streaming/recorder.py).
    max_recording_s: float = Field(
        1800.0, gt=0, description="longest single recording, seconds of media; then it stops (reason max_duration)"
    )
    max_recording_bytes: int = Field(
        2 * GIB,
        ge=MIB,
        description=(
            "largest recording file; it stops when its output on disk reaches this (reason max_size; the "
            "finished file may be larger by the writer's buffered output, up to about 256 KiB, and the MP4 index)"
        ),
    )
    min_recording_free_bytes: int = Field(
        1 * GIB,
        ge=0,
        description=(
            "free space kept on the recordings volume: record.start is refused below it and a running "
            "recording stops (reason disk_full)"
        ),
    )
    max_recordings_per_session: int = Field(256, ge=1, description="recordings one session may start in all")
    max_concurrent_recordings: int = Field(
        8, ge=1, description="recordings running at once, server-wide (each is one H.264 encoder thread)"
    )

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


class IceServer(BaseModel):
    """A STUN or TURN server with credentials, as a browser's ``RTCIceServer`` takes it."""

    urls: str | list[str] = Field(description="stun:/turn:/turns: URL(s)")
    username: str | None = None
    credential: str | None = None


class AuthSettings(BaseModel):
    """Session tokens and admin access (issue 6; see avatar_server/auth.py)."""

    token_secret: SecretStr | None = Field(
        None, description="HS256 secret of session tokens; default: derived from api_key"
    )
    token_ttl_s: float = Field(300.0, gt=0, description="lifetime of a minted token unless the request asks less")
    max_token_ttl_s: float = Field(3600.0, gt=0, description="longest lifetime a token request may ask for")
    admin_from_loopback: bool = Field(
        True, description="/metrics and admin routes answer loopback peers without the api key"
    )
    # Brute-force throttling of api-key checks (POST /v1/tokens, /metrics and admin routes).
    max_key_failures: int = Field(
        10, ge=1, description="failed api-key checks from one client address within key_failure_window_s before it is throttled"
    )
    key_failure_window_s: float = Field(60.0, gt=0, description="window in which failed api-key checks are counted")
    key_failure_backoff_s: float = Field(
        60.0, gt=0, description="how long a throttled address is answered HTTP 429 on routes that check the api key"
    )
    max_tracked_addresses: int = Field(
        10_000, ge=16, description="client addresses the failure throttle remembers (least recently seen forgotten first)"
    )


class WebRTCSettings(BaseModel):
    """Peer-connection settings."""

    host_addresses: list[str] | None = Field(
        None,
        description=(
            "local addresses offered as ICE host candidates; default: 127.0.0.1 when the server "
            "binds a loopback host, otherwise every interface (aioice's own discovery)"
        ),
    )
    ice_servers: list[str | IceServer] = Field(
        default_factory=list,
        description="STUN/TURN URLs, e.g. stun:stun.example.org:3478, or {urls, username, credential} (none by default)",
    )
    # Issue 18: which remote ICE candidates an offer may carry (avatar_server/ice.py).
    ice_policy: IceCandidatePolicy = Field(default_factory=IceCandidatePolicy)


class FleetSettings(BaseModel):
    """``avatar-server fleet``: many replicas of the server on Ray Serve (issue 13; avatar_server/fleet.py).

    One replica = one engine + its sessions (``max_sessions`` of the top level); a WebSocket is one
    ongoing Serve request for its whole life, so the replica's session capacity is its
    ``max_ongoing_requests`` (plus ``request_headroom`` for HTTP requests and handshakes).
    """

    min_replicas: int = Field(1, ge=0, description="replicas kept running with no sessions")
    max_replicas: int = Field(1, ge=1, description="most replicas (one GPU each unless the engine runs on CPU)")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy; default: min_replicas")
    target_sessions_per_replica: float | None = Field(
        None, gt=0, description="autoscaling target of ongoing sessions per replica; default: 0.75 x max_sessions"
    )
    request_headroom: int = Field(
        2, ge=1, description="ongoing requests a full replica still takes (HTTP, a refused WebSocket's capacity error)"
    )
    max_queued_requests: int = Field(
        4, ge=1, description="requests waiting for a replica when every replica is at its limit; beyond: HTTP 503"
    )
    upscale_delay_s: float = Field(3.0, ge=0, description="load above target this long adds replicas")
    downscale_delay_s: float = Field(30.0, ge=0, description="load below target this long removes replicas")
    drain_timeout_s: float = Field(
        3600.0, gt=0,
        description="a replica being removed (scale-down, redeploy) keeps its live sessions this long at most",
    )
    health_check_period_s: float = Field(5.0, gt=0, description="period of Serve's call to the replica's /healthz")
    health_check_timeout_s: float = Field(10.0, gt=0, description="a health check slower than this fails")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; default: 1 on cuda, 0 on cpu")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    report_period_s: float = Field(1.0, gt=0, description="how often a replica reports its sessions and metrics")
    http_host: str = Field("127.0.0.1", description="address of Serve's HTTP proxy")
    http_port: int = Field(8000, ge=0, le=65535, description="port of Serve's HTTP proxy")
    app_name: str = Field("avatar", description="Serve application name")


class LiveSettings(BaseModel):
    """Sessions on air (issue 15): headless sessions over HTTP, live outputs, WHEP viewers."""

    max_outputs_per_session: int = Field(4, ge=0, description="RTMP/WHIP outputs one session may run at once")
    max_viewers_per_session: int = Field(50, ge=0, description="WHEP viewers of one session at once")
    max_viewers: int = Field(200, ge=0, description="WHEP viewers of all sessions at once, server-wide")
    whep_bitrate_bps: int = Field(
        1_000_000, ge=100_000, le=50_000_000, description="video bitrate of the one H.264 encode shared by viewers"
    )
    viewer_token_ttl_s: float = Field(3600.0, gt=0, description="lifetime of a viewer token")
    output_reconnect_max_s: float = Field(10.0, gt=0, description="longest wait between reconnect attempts of an output")


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
    backend: str = Field(
        "eager",
        description="DiT execution backend of the model presets: eager, fast, compile, fp8 or a '+' combination "
        "(engine.backends)",
    )
    cp: int = Field(
        1, ge=1, le=8,
        description="context-parallel degree: each segment's DiT runs on this many ranks (GPUs; gloo processes on "
        "CPU); must divide the model's attention heads (engine.context_parallel)",
    )
    compile_cache_dir: Path | None = Field(
        None, description="keep torch.compile's caches here (a persistent volume) so a restart compiles nothing"
    )
    testpattern_delay_s: float = Field(0.0, ge=0, description="simulated generation time of the testpattern engine")

    segment_seconds: float = Field(2.0, gt=0, description="length of speech and lip-sync segments")
    idle_segment_seconds: float = Field(2.0, gt=0, description="length of idle segments")
    min_segment_seconds: float = Field(1.0, gt=0)
    playout_target_ms: float = Field(2000.0, gt=0, description="media kept queued ahead of playback")
    words_per_second: float = Field(2.5, gt=0)
    max_sessions: int = Field(2, ge=1, description="concurrent sessions; /readyz is 503 when all are taken")
    stats_interval_s: float = Field(1.0, gt=0, description="period of the `stats` message")
    max_engine_utilization: float = Field(
        0.9, gt=0,
        description=(
            "refuse a new session when the engine's measured busy fraction, scaled to one more session, "
            "would exceed this (sessions would underrun); above 1: only max_sessions limits"
        ),
    )
    engine_utilization_window_s: float = Field(
        30.0, gt=0, description="the window over which the engine's busy fraction is measured"
    )
    engine_stall_s: float = Field(
        120.0, gt=0,
        description="an engine job (segment, upgrade) running longer than this after warm-up fails /healthz",
    )
    # Issue 4 (live behaviour): super-resolution, recording, session lifetime, drain.
    sr: bool = Field(
        False,
        description="upgrade buffered segments through the engine's SR model in spare time; video goes out at the SR size",
    )
    recordings_dir: Path = Field(Path("recordings"), description="directory of record.start MP4 files")
    session_idle_timeout_s: float = Field(
        300.0, gt=0, description="a session with no control message and no microphone voice for this long ends"
    )
    session_max_duration_s: float = Field(3600.0, gt=0, description="longest a session may run")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="on SIGTERM: time sessions get to finish speaking before they are ended"
    )
    session_resume_grace_s: float = Field(
        30.0,
        ge=0,
        description=(
            "a session whose WebSocket drops abnormally keeps running this long, waiting for "
            "session.resume with its resume_token; 0: resume is off (the session ends with its WebSocket)"
        ),
    )

    limits: Limits = Field(default_factory=Limits)
    webrtc: WebRTCSettings = Field(default_factory=WebRTCSettings)
    vad: VadSettings = Field(default_factory=VadSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    api_key: SecretStr | None = Field(
        None, description="mints session tokens (POST /v1/tokens); required to bind a non-loopback host"
    )
    allowed_origins: list[str] | None = Field(
        None, description="browser Origins allowed on /ws; default: the server's own host; ['*']: any"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve https/wss")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    auth: AuthSettings = Field(default_factory=AuthSettings)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "reverse proxies (IPs or CIDRs) whose forwarding header names the client; empty: forwarding "
            "headers are ignored and the TCP peer is the client"
        ),
    )
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = Field(
        "x-forwarded-for",
        description="the header the trusted proxies append the client to: X-Forwarded-For or Forwarded (for=)",
    )

    @field_validator("forwarded_header", mode="before")
    @classmethod
    def _header_name(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {item[:64]!r} is not an IP address or CIDR network") from None
        return [item.strip() for item in value]

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
