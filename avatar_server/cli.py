"""``avatar-server``: ``serve`` (the server), ``client`` (the Python client), and ``generate``
(one offline clip) and ``download`` (the model stack) from :mod:`avatar_server.offline_cli`.

Flags override environment variables (``AVATAR_SERVER_*``), which override the defaults;
see :mod:`avatar_server.settings`. Logging is configured here, once.

Building the parser imports nothing heavy: torch, the engine, aiortc, the streaming package,
pydantic and the settings are imported inside the subcommand handlers, so ``--help`` and
argument errors answer at once (``tests/test_cli_imports.py`` checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatar_server import offline_cli

if TYPE_CHECKING:
    from avatar_server.settings import Settings

logger = logging.getLogger(__name__)

# flag dest -> (settings group or None, field name)
_SERVE_FLAGS: dict[str, tuple[str | None, str]] = {
    "host": (None, "host"),
    "port": (None, "port"),
    "engine": (None, "engine"),
    "checkpoint_dir": (None, "checkpoint_dir"),
    "device": (None, "device"),
    "seed": (None, "seed"),
    "testpattern_delay_s": (None, "testpattern_delay_s"),
    "segment_seconds": (None, "segment_seconds"),
    "idle_segment_seconds": (None, "idle_segment_seconds"),
    "playout_target_ms": (None, "playout_target_ms"),
    "max_sessions": (None, "max_sessions"),
    "sr": (None, "sr"),
    "recordings_dir": (None, "recordings_dir"),
    "session_idle_timeout_s": (None, "session_idle_timeout_s"),
    "session_max_duration_s": (None, "session_max_duration_s"),
    "drain_timeout_s": (None, "drain_timeout_s"),
    "session_resume_grace_s": (None, "session_resume_grace_s"),
    "engine_stall_s": (None, "engine_stall_s"),
    "max_engine_utilization": (None, "max_engine_utilization"),
    "trusted_proxies": (None, "trusted_proxies"),
    "log_level": (None, "log_level"),
    "log_format": (None, "log_format"),
    "max_image_bytes": ("limits", "max_image_bytes"),
    "max_image_pixels": ("limits", "max_image_pixels"),
    "max_prompt_chars": ("limits", "max_prompt_chars"),
    "max_text_chars": ("limits", "max_text_chars"),
    "max_utterance_chars": ("limits", "max_utterance_chars"),
    "max_message_bytes": ("limits", "max_message_bytes"),
    "webrtc_host_addresses": ("webrtc", "host_addresses"),
    "ice_servers": ("webrtc", "ice_servers"),
    "api_key": (None, "api_key"),
    "allowed_origins": (None, "allowed_origins"),
    "tls_cert": (None, "tls_cert"),
    "tls_key": (None, "tls_key"),
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    """Configure the root logger once: ``level``, ``fmt`` ``text`` or ``json`` (one object a line)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Plain HTTP requests (page, health, metrics) are logged by websockets as rejected
    # handshakes; keep those out of the INFO log.
    logging.getLogger("websockets.server").setLevel(max(logging.WARNING, root.level))
    # websockets' DEBUG log prints request lines and headers, which carry session tokens.
    logging.getLogger("websockets.client").setLevel(max(logging.WARNING, root.level))
    # ICE and RTP internals log every check at INFO; keep them for --log-level DEBUG.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)


def _ice_server(value: str) -> str | dict[str, Any]:
    """``--ice-server``: a URL, or a JSON object with ``urls``, ``username``, ``credential``."""
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the given flags on top of environment and defaults."""
    from avatar_server.settings import Settings

    overrides: dict[str, Any] = {}
    for dest, (group, name) in _SERVE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if group is None:
            overrides[name] = value
        else:
            overrides.setdefault(group, {})[name] = value
    return Settings(**overrides)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the server", description="Run the avatar server on one port.")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--engine", choices=["preview", "testpattern", "full"], help="engine preset (default preview)")
    p.add_argument("--checkpoint-dir", type=Path, help="local checkpoint directory")
    p.add_argument("--device", choices=["cpu", "cuda"], help="engine device (default cpu)")
    p.add_argument("--seed", type=int)
    p.add_argument("--testpattern-delay-s", type=float, help="simulated generation time (testpattern engine)")
    p.add_argument("--segment-seconds", type=float, help="speech/lip-sync segment length (default 2.0)")
    p.add_argument("--idle-segment-seconds", type=float, help="idle segment length (default 2.0)")
    p.add_argument("--playout-target-ms", type=float, help="media queued ahead of playback (default 2000)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions (default 2)")
    p.add_argument(
        "--sr",
        action="store_const",
        const=True,
        help="idle super-resolution: upgrade buffered segments with the engine's SR model, send video at the SR size",
    )
    p.add_argument("--recordings-dir", type=Path, help="directory of record.start MP4 files (default ./recordings)")
    p.add_argument("--session-idle-timeout-s", type=float, help="end a session idle this long (default 300)")
    p.add_argument("--session-max-duration-s", type=float, help="longest session (default 3600)")
    p.add_argument(
        "--drain-timeout-s", type=float, help="on SIGTERM: time to finish speaking before sessions end (default 10)"
    )
    p.add_argument(
        "--session-resume-grace-s",
        type=float,
        help="keep a session whose WebSocket dropped this long for session.resume (default 30; 0: off)",
    )
    p.add_argument(
        "--max-engine-utilization",
        type=float,
        help="refuse a session the engine could not keep in real time: measured busy fraction x (n+1)/n "
        "above this (default 0.9; above 1: only --max-sessions)",
    )
    p.add_argument(
        "--engine-stall-s", type=float, help="an engine job running longer fails /healthz (default 120)"
    )
    p.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        help="reverse proxy IP or CIDR whose X-Forwarded-For names the client (repeatable; default none)",
    )
    p.add_argument("--max-image-bytes", type=int, help="largest reference image in bytes (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest reference image, width x height")
    p.add_argument("--max-prompt-chars", type=int, help="longest appearance prompt")
    p.add_argument("--max-text-chars", type=int, help="longest speak chunk")
    p.add_argument("--max-utterance-chars", type=int, help="longest utterance")
    p.add_argument("--max-message-bytes", type=int, help="largest WebSocket message")
    p.add_argument(
        "--webrtc-host-address",
        dest="webrtc_host_addresses",
        action="append",
        help="ICE host candidate address (repeatable; default 127.0.0.1 for a loopback host)",
    )
    p.add_argument(
        "--ice-server",
        dest="ice_servers",
        action="append",
        type=_ice_server,
        help='STUN/TURN URL, or JSON {"urls": ..., "username": ..., "credential": ...} for TURN (repeatable)',
    )
    p.add_argument(
        "--api-key",
        help="key that mints session tokens (POST /v1/tokens); required on a non-loopback host "
        "(prefer AVATAR_SERVER_API_KEY: flags show in the process list)",
    )
    p.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        help="browser Origin allowed on /ws (repeatable; default: the server's own host; '*': any)",
    )
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve https:// and wss://")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=["text", "json"])


_CLIENT_EPILOG = """\
modes (--mode):
  text          the avatar speaks the --say text; no microphone is sent
                (the default without --audio)
  microphone    --audio FILE is the live microphone and the avatar lip-syncs to it
                (session mode lipsync; the default with --audio); --say text is spoken too
  conversation  --audio FILE is the live microphone and the avatar listens while it
                carries voice; it speaks the --say text (session mode conversation)

The client leaves once the utterances are done, the --audio file has been sent and the
avatar has been idle for --duration seconds (in microphone mode the last words are lip-synced
about one segment plus generation time after they were sent: keep --duration above that).
--barge-in: the user's voice interrupts the avatar's speech.
--server-record: the server writes an MP4 of what it sends, from media start to the end
(record.start / record.stop); its record.stopped (path, duration_ms, dropped_frames, error)
is printed and put in the summary as server_recording.

Every server message except stats is printed as a JSON line, then a summary line; server
errors are also written to stderr. Exit status: 0 when video arrived and the server sent no
error, 1 otherwise, 2 for bad arguments.
"""


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="connect as a client, record to MP4",
        description="Start a session with an image, speak text or play an audio file as the microphone, "
        "and record what comes back.",
        epilog=_CLIENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8080/", help="server URL")
    p.add_argument("--image", type=Path, required=True, help="reference image (PNG/JPEG/WebP)")
    p.add_argument("--prompt", default="", help="appearance text")
    p.add_argument("--prompt-file", type=Path, help="read the appearance text from this file (first paragraph)")
    p.add_argument(
        "--mode",
        choices=["text", "microphone", "conversation"],
        help="what you send: text, or --audio as a live microphone that the avatar lip-syncs (microphone) "
        "or listens to (conversation); default: microphone with --audio, text otherwise",
    )
    p.add_argument(
        "--audio",
        "--mic",
        dest="audio",
        type=Path,
        help="audio file (WAV, FLAC, MP3, ... anything PyAV reads) sent as the live microphone at real-time pace",
    )
    p.add_argument(
        "--barge-in",
        action="store_true",
        help="the user's voice interrupts the avatar (needs a microphone mode)",
    )
    p.add_argument("--say", action="append", default=[], help="text to speak (repeatable: one utterance each)")
    p.add_argument("--language", help="language of --say text, e.g. English (goes into the prompt)")
    p.add_argument("--chunk-words", type=int, default=3, help="send --say text in chunks of this many words")
    p.add_argument(
        "--interrupt-after",
        type=float,
        metavar="SECONDS",
        help="send interrupt this long after each utterance starts playing (speak.started)",
    )
    p.add_argument("--record", type=Path, help="write the received audio+video to this MP4 (client side)")
    p.add_argument(
        "--server-record",
        action="store_true",
        help="ask the server to record the session to an MP4 on its disk; prints record.stopped",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=3.0,
        help="leave once the avatar has been idle this many seconds after the last utterance and the --audio file",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each server reply")
    p.add_argument("--token", help="session token from the server's POST /v1/tokens (servers with an api key)")
    p.add_argument("--session-id", help="session id to ask for (with a token it must be the token's)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def check_client_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the ``client`` flags (one message naming the flag), or ``None``.

    Fills in ``args.mode`` when it was left out (``microphone`` with ``--audio``, else ``text``).
    """
    if args.mode is None:
        args.mode = "microphone" if args.audio is not None else "text"
    if args.mode == "text" and args.audio is not None:
        return "--audio: a microphone is sent only with --mode microphone or --mode conversation"
    if args.mode != "text" and args.audio is None:
        return f"--mode {args.mode}: needs --audio FILE (the audio to send as the microphone)"
    if args.barge_in and args.mode == "text":
        return "--barge-in: needs a microphone (--mode microphone or conversation with --audio FILE)"
    if not args.image.is_file():
        return f"--image: {args.image}: no such file"
    if args.audio is not None and not args.audio.is_file():
        return f"--audio: {args.audio}: no such file"
    if args.prompt_file is not None and not args.prompt_file.is_file():
        return f"--prompt-file: {args.prompt_file}: no such file"
    if args.chunk_words < 1:
        return f"--chunk-words: must be at least 1, got {args.chunk_words}"
    for flag, value in (("--duration", args.duration), ("--interrupt-after", args.interrupt_after)):
        if value is not None and value < 0:
            return f"{flag}: must not be negative, got {value:g}"
    if args.timeout <= 0:
        return f"--timeout: must be positive, got {args.timeout:g}"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``avatar-server`` parser with all subcommands (imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="avatar-server", description="Real-time streaming avatar server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_client(sub)
    offline_cli.add_generate_parser(sub)
    offline_cli.add_download_parser(sub)
    # Issue 13: `avatar-server fleet [flags]` parses its own flags in avatar_server/fleet.py (Ray is imported there only).
    sub.add_parser("fleet", help="run a fleet of servers on Ray Serve (the fleet extra)", add_help=False)
    return parser


async def _serve(settings: Settings) -> None:
    from avatar_server.server import build_app, create_engine

    engine = await asyncio.to_thread(create_engine, settings)
    app = build_app(settings, engine)
    await app.start()
    print(f"avatar-server: open {app.url} in a browser (engine {engine.name})", flush=True)
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:  # the first signal drains, a second one skips the drain
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:
            app.cancel_drain()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    try:
        await stop.wait()
        logger.info("draining: no new sessions; %d running", app.sessions_active)
        await app.drain(settings.drain_timeout_s)
    finally:
        logger.info("shutting down")
        await app.close()


def _first_paragraph(text: str) -> str:
    return text.strip().strip('"').split("\n\n")[0].strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``avatar-server`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fleet"]:  # issue 13
        from avatar_server.fleet import main as fleet_main

        return fleet_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from pydantic import ValidationError

        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            print(f"avatar-server: invalid settings:\n{exc}", file=sys.stderr)
            return 2
        from avatar_server.auth import startup_problem

        problem = startup_problem(settings)
        if problem is not None:
            print(f"avatar-server: {problem}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level, settings.log_format)
        from avatar_server.server import EngineUnavailableError

        try:
            asyncio.run(_serve(settings))
        except EngineUnavailableError as exc:
            print(f"avatar-server: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.command in ("generate", "download"):
        configure_logging(args.log_level, "text")
        run = offline_cli.run_generate if args.command == "generate" else offline_cli.run_download
        return run(args)

    return _client(args)


def _client(args: argparse.Namespace) -> int:
    problem = check_client_args(args)
    if problem is not None:
        print(f"avatar-server client: {problem}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, "text")
    from websockets.exceptions import InvalidHandshake

    from clients.python_client import CLIENT_MODES, run_client

    prompt = args.prompt
    if args.prompt_file is not None:
        prompt = _first_paragraph(args.prompt_file.read_text(encoding="utf-8"))
    try:
        summary = asyncio.run(
            run_client(
                url=args.url,
                image=args.image.read_bytes(),
                prompt=prompt,
                says=args.say,
                language=args.language,
                microphone=args.audio,
                record=args.record,
                chunk_words=args.chunk_words,
                duration_s=args.duration,
                timeout_s=args.timeout,
                err=lambda line: print(f"avatar-server client: {line}", file=sys.stderr, flush=True),
                token=args.token,
                mode=CLIENT_MODES[args.mode],
                barge_in=True if args.barge_in else None,
                session_id=args.session_id,
                server_record=args.server_record,
                interrupt_after_s=args.interrupt_after,
            )
        )
    except ValueError as exc:  # the --audio file cannot be decoded
        print(f"avatar-server client: {exc}", file=sys.stderr)
        return 2
    except (OSError, InvalidHandshake) as exc:  # the server cannot be reached or refused the WebSocket
        print(f"avatar-server client: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 1
    ok = summary["video_frames"] and not summary["errors"] and summary["failure"] is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
