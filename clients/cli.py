"""``avatar-server client``: the Python client from the command line.

Its flags (:func:`add_client_parser`), their checks (:func:`check_client_args`) and the run
(:func:`run_client`, :func:`main`). ``avatar_server.cli`` registers the flags and dispatches
here by lazy imports; building the parser and checking the flags import nothing heavy (only
argparse), so ``avatar-server client --help`` answers at once (tests/test_cli_imports.py).
The client itself (:mod:`clients.client`: aiortc, PyAV) is imported once the flags are good.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from avatar_server import protocol

# ``--mode``: what the user sends -> the session's ``mode`` (None: no microphone, the
# server's default mode).
CLIENT_MODES: dict[str, str | None] = {"text": None, "microphone": "lipsync", "conversation": "conversation"}


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


def add_client_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``client`` subcommand and its flags to ``sub`` (argparse only); returns it."""
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
    p.add_argument(
        "--prompt-file", type=Path, help="read the appearance text from this file (first paragraph)"
    )
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
    p.add_argument(
        "--say", action="append", default=[], help="text to speak (repeatable: one utterance each)"
    )
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
    p.add_argument(
        "--token", help="session token from the server's POST /v1/tokens (servers with an api key)"
    )
    p.add_argument("--session-id", help="session id to ask for (with a token it must be the token's)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


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


def configure_logging(level: str) -> None:
    """Client logging on stderr at ``level``; websockets' client log (request headers carry the
    session token) and the ICE/RTP internals stay at WARNING unless ``level`` is DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("websockets.client").setLevel(max(logging.WARNING, root.level))
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)


def _first_paragraph(text: str) -> str:
    return text.strip().strip('"').split("\n\n")[0].strip()


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
    err: Callable[[str], None] | None = None,
    token: str | None = None,
    mode: str | None = None,
    barge_in: bool | None = None,
    session_id: str | None = None,
    server_record: bool = False,
    interrupt_after_s: float | None = None,
) -> dict[str, Any]:
    """What ``avatar-server client`` does; returns the summary it prints last.

    Every server message except ``stats`` is printed (``out``) as a JSON line as it arrives;
    ``error`` frames are also written to ``err`` as one readable line, and so is the
    ``notice`` of ``session.ready`` (what the engine's picture is, e.g. untrained weights). The session starts
    with ``mode``/``barge_in``/``session_id`` (when given); ``microphone`` (an audio file) is
    sent at real-time pace, then silence. Each of ``says`` is one utterance, interrupted
    ``interrupt_after_s`` after its ``speak.started`` when that is given. Once the utterances
    are done and the microphone file is sent, the client leaves after the avatar has been idle
    for ``duration_s`` (see :meth:`AvatarClient.wait_idle`). With ``server_record`` the server
    records the session from media start to the end (``record.start`` / ``record.stop``) and
    the summary carries its ``record.stopped`` as ``server_recording``.

    The summary says ``failure`` (a refused session, a timeout, the server closing the
    connection) and lists the ``errors`` codes received; the client stops at a failure.
    Raises ``ValueError`` (naming the file) when ``microphone`` cannot be decoded.
    """
    errors: list[str] = []

    from avatar_server import protocol
    from clients.client import AvatarClient, split_chunks
    from clients.media import AudioFileTrack

    def on_message(message: protocol.ServerMessage) -> None:
        if isinstance(message, protocol.Stats):
            return
        out(message.model_dump_json())
        if isinstance(message, protocol.ErrorMessage):
            errors.append(str(message.code))
            if err is not None:
                err(f"server error {message.code}: {message.message}")
        elif isinstance(message, protocol.SessionReady) and message.notice:
            if err is not None:  # what this engine's picture is (the preview's untrained weights)
                err(f"note: {message.notice}")
        elif isinstance(message, protocol.RecordStopped) and message.reason != "stopped":
            # The server ended the recording itself (a limit, the session ending, a failure).
            if err is not None:
                detail = f": {message.message}" if message.message else ""
                err(f"the server stopped recording {message.recording_id} ({message.reason}){detail}")

    track = None if microphone is None else await asyncio.to_thread(AudioFileTrack.from_file, microphone)
    client = AvatarClient(url, record_path=record, keep_audio=False, token=token, on_message=on_message)
    started = time.monotonic()
    failure: str | None = None
    server_recording: protocol.RecordStopped | None = None
    await client.connect()
    try:
        await client.start_session(
            image, prompt, mode=mode, barge_in=barge_in, session_id=session_id, timeout_s=timeout_s
        )
        await client.start_media(microphone=track, timeout_s=timeout_s)
        if server_record:
            await client.start_recording(timeout_s=timeout_s)
        for number, text in enumerate(says, start=1):
            utterance_id = f"u{number}"
            await client.speak(utterance_id, split_chunks(text, chunk_words), language=language)
            if interrupt_after_s is not None:
                first = await client.wait_first(
                    (protocol.SpeakStarted, protocol.SpeakEnded, protocol.Interrupted),
                    lambda m, u=utterance_id: m.utterance_id == u,
                    timeout_s=timeout_s,
                )
                if not isinstance(first, protocol.SpeakStarted):  # over before it started (e.g. no words)
                    continue
                await asyncio.sleep(interrupt_after_s)
                await client.interrupt()
            await client.wait_utterance_done(utterance_id, timeout_s=timeout_s)
        if track is not None:
            try:
                async with asyncio.timeout(track.duration_s + timeout_s):
                    await track.finished.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"the microphone file was not sent within {track.duration_s + timeout_s:g} s"
                ) from None
        await client.wait_idle(duration_s, timeout_s=timeout_s)
        if server_record:
            stopped = client.messages(protocol.RecordStopped)
            # The server may have stopped it already (a recording limit, a write error).
            server_recording = stopped[-1] if stopped else await client.stop_recording(timeout_s=timeout_s)
    except (RuntimeError, ConnectionError, TimeoutError) as exc:
        failure = str(exc)
        if err is not None:
            err(f"failed: {failure}")
    finally:
        await client.close()
    if server_record and server_recording is None and client.messages(protocol.RecordStopped):
        server_recording = client.messages(protocol.RecordStopped)[-1]
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
        "server_recording": None
        if server_recording is None
        else server_recording.model_dump(mode="json", exclude={"type"}),
        "microphone_s": None if track is None else round(track.duration_s, 3),
        "errors": errors,
        "failure": failure,
    }
    out(json.dumps(summary))
    return summary


def main(args: argparse.Namespace) -> int:
    """Run ``avatar-server client`` with parsed ``args``; returns the exit status (0: video came
    and no error; 1: a failure or server errors; 2: bad flags)."""
    problem = check_client_args(args)
    if problem is not None:
        print(f"avatar-server client: {problem}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    from websockets.exceptions import InvalidHandshake

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
