"""``avatar-server``: ``serve`` (the server), ``client`` (the Python client), and ``generate``
(one offline clip) and ``download`` (the model stack) from :mod:`avatar_server.offline_cli`.

Flags override environment variables (``AVATAR_SERVER_*``), which override the defaults;
see :mod:`avatar_server.settings`. Logging is configured here, once.

The ``serve`` flags are generated from :class:`~avatar_server.settings.Settings` (type,
choices, default and help of each field), so each default is written once. Building the
parser imports the settings (pydantic) and nothing heavy: torch, the engine, aiortc and the
streaming package are imported inside the subcommand handlers, so ``--help`` and argument
errors answer at once (``tests/test_cli_imports.py`` checks it).
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


# Settings groups whose flags get a prefix (``--auth-max-key-failures``); the limits' names are
# unique and keep none (``--max-image-bytes``).
_FLAG_PREFIXES = {"limits": "", "webrtc": "webrtc-", "vad": "vad-", "auth": "auth-"}
# Repeatable list flags are named for one item.
_FLAG_NAMES = {
    (None, "trusted_proxies"): "--trusted-proxy",
    (None, "allowed_origins"): "--allowed-origin",
    ("webrtc", "host_addresses"): "--webrtc-host-address",
    ("webrtc", "ice_servers"): "--ice-server",
    ("limits", "microphone_sample_rates_hz"): "--microphone-sample-rate-hz",
}
# Extra help for flags whose setting alone does not say it.
_FLAG_NOTES = {
    (None, "api_key"): "prefer AVATAR_SERVER_API_KEY: flags show in the process list",
    (None, "port"): "0 picks a free one",
}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, is_list)`` of a field annotation (``X | None`` and ``list[X]`` unwrapped)."""
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        non_none = [arg for arg in args if arg is not type(None)]
        if len(non_none) == 1:
            return _unwrap(non_none[0])
        return annotation, False
    if typing.get_origin(annotation) is list:
        inner, _ = _unwrap(args[0])
        return inner, True
    return annotation, False


def _argument(group: str | None, name: str, field: Any) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` flags and keyword arguments of one settings field: its type,
    choices and default come from the field, so they are written once (in settings.py)."""
    import typing

    from pydantic import SecretStr

    inner, is_list = _unwrap(field.annotation)
    flag = _FLAG_NAMES.get((group, name)) or "--" + (_FLAG_PREFIXES.get(group or "", "") + name).replace("_", "-")
    default = None if field.default_factory is not None else field.default
    if field.default_factory is not None:
        with contextlib.suppress(Exception):
            default = field.default_factory()
    shown = default.get_secret_value() if isinstance(default, SecretStr) else default
    parts = [field.description or name.replace("_", " ")]
    if (group, name) in _FLAG_NOTES:
        parts.append(_FLAG_NOTES[(group, name)])
    if shown not in (None, [], ""):
        parts.append(f"default {shown}")
    kwargs: dict[str, Any] = {"dest": f"{group}__{name}" if group else name, "default": None, "help": "; ".join(parts)}
    if typing.get_origin(inner) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(inner))
    elif inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif (group, name) == ("webrtc", "ice_servers"):
        kwargs["type"] = _ice_server
    elif inner in (int, float, Path):
        kwargs["type"] = inner
    if "choices" not in kwargs and inner is not bool:
        kwargs["metavar"] = name.upper()
    if is_list:
        kwargs["action"] = "append"
        kwargs["help"] += " (repeatable)"
    return [flag], kwargs


def _settings_fields() -> list[tuple[str | None, str, Any]]:
    """``(group or None, name, field)`` of every setting that has a flag."""
    from avatar_server.settings import Settings

    fields: list[tuple[str | None, str, Any]] = []
    for name, field in Settings.model_fields.items():
        if name in _FLAG_PREFIXES:
            model = field.annotation
            fields += [(name, sub_name, sub_field) for sub_name, sub_field in model.model_fields.items()]
        else:
            fields.append((None, name, field))
    return fields


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the given flags on top of environment and defaults."""
    from avatar_server.settings import Settings

    overrides: dict[str, Any] = {}
    for group, name, _ in _settings_fields():
        value = getattr(args, f"{group}__{name}" if group else name, None)
        if value is None:
            continue
        if group is None:
            overrides[name] = value
        else:
            overrides.setdefault(group, {})[name] = value
    return Settings(**overrides)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the avatar server on one port. Every flag is a setting (avatar_server/settings.py); "
        "flags override AVATAR_SERVER_* environment variables, which override the defaults.",
    )
    titles = {None: "server", "limits": "limits", "webrtc": "WebRTC", "vad": "voice activity", "auth": "auth"}
    groups = {key: p.add_argument_group(title) for key, title in titles.items()}
    for group, name, field in _settings_fields():
        flags, kwargs = _argument(group, name, field)
        groups[group].add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``avatar-server`` parser with all subcommands (imports nothing heavy)."""
    parser = argparse.ArgumentParser(prog="avatar-server", description="Real-time streaming avatar server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from clients.cli import add_client_parser  # the client's flags live with the client (argparse only)

    add_client_parser(sub)
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

    from clients.cli import main as client_main

    return client_main(args)


if __name__ == "__main__":
    sys.exit(main())
