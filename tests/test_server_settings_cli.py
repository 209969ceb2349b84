"""Settings precedence (flags > env > defaults), the CLI parser and the engine factory."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from avatar_server import cli
from avatar_server.server import EngineUnavailableError, create_engine
from avatar_server.settings import Settings


def test_defaults_work_on_a_fresh_machine(monkeypatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("AVATAR_SERVER_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.engine, s.device, s.checkpoint_dir) == ("127.0.0.1", 8080, "preview", "cpu", None)
    assert s.limits.max_image_bytes >= 4 * 1024 * 1024
    assert s.ice_host_addresses() == ["127.0.0.1"]  # loopback host: loopback ICE
    assert Settings(host="0.0.0.0").ice_host_addresses() is None
    assert Settings(host="0.0.0.0", webrtc={"host_addresses": ["10.0.0.2"]}).ice_host_addresses() == ["10.0.0.2"]


def test_flags_override_env_which_overrides_defaults(monkeypatch) -> None:
    monkeypatch.setenv("AVATAR_SERVER_PORT", "9001")
    monkeypatch.setenv("AVATAR_SERVER_SEGMENT_SECONDS", "3.0")
    monkeypatch.setenv("AVATAR_SERVER_LIMITS__MAX_TEXT_CHARS", "77")
    monkeypatch.setenv("AVATAR_SERVER_WEBRTC__ICE_SERVERS", '["stun:stun.example.org:3478"]')
    args = cli.build_parser().parse_args(["serve", "--port", "9100", "--max-utterance-chars", "500"])
    s = cli.settings_from_args(args)
    assert s.port == 9100  # flag
    assert s.segment_seconds == 3.0  # env
    assert (s.limits.max_text_chars, s.limits.max_utterance_chars) == (77, 500)  # env and flag, one group
    assert s.webrtc.ice_servers == ["stun:stun.example.org:3478"]
    assert s.playout_target_ms == 2000.0  # default


def test_resume_stall_and_proxy_flags(monkeypatch) -> None:
    monkeypatch.setenv("AVATAR_SERVER_SESSION_RESUME_GRACE_S", "12")
    args = cli.build_parser().parse_args([
        "serve", "--engine-stall-s", "45", "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "192.0.2.7",
        "--max-engine-utilization", "1.5",
    ])
    s = cli.settings_from_args(args)
    assert (s.session_resume_grace_s, s.engine_stall_s, s.max_engine_utilization) == (12.0, 45.0, 1.5)
    assert s.trusted_proxies == ["10.0.0.0/8", "192.0.2.7"]
    assert cli.settings_from_args(cli.build_parser().parse_args(["serve", "--session-resume-grace-s", "0"])) \
        .session_resume_grace_s == 0.0
    assert cli.main(["serve", "--trusted-proxy", "not-an-address"]) == 2


def test_invalid_settings_exit_with_a_message(capsys) -> None:
    assert cli.main(["serve", "--max-image-bytes", "1000"]) == 2
    assert "max_image_bytes" in capsys.readouterr().err


def test_parser_has_serve_and_client() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["download", "/data/x", "--variant", "base"]).variant == ["base"]
    assert parser.parse_args(["generate", "--prompt", "A man speaks."]).command == "generate"
    args = parser.parse_args(["client", "--image", "x.png", "--say", "Hello", "--say", "Bonjour", "--mic", "a.flac"])
    assert args.command == "client" and args.say == ["Hello", "Bonjour"] and str(args.audio) == "a.flac"
    args = parser.parse_args(
        ["client", "--image", "x.png", "--mode", "conversation", "--audio", "a.wav", "--barge-in", "--server-record"]
    )
    assert (args.mode, str(args.audio), args.barge_in, args.server_record) == ("conversation", "a.wav", True, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "--image", "x.png", "--mode", "lipsync"])  # the CLI's modes, not the wire's
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--engine", "nope"])


def test_json_logging(capsys) -> None:
    cli.configure_logging("INFO", "json")
    logging.getLogger("avatar_server.test").info("hello %s", "world")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert '"message": "hello world"' in err and '"level": "INFO"' in err
    cli.configure_logging("WARNING", "text")


def test_engine_factory() -> None:
    engine = create_engine(Settings(engine="testpattern", testpattern_delay_s=0.25))
    assert engine.name == "testpattern" and engine.generate_delay_s == 0.25
    if importlib.util.find_spec("engine.pipeline") is None:
        with pytest.raises(EngineUnavailableError, match="--engine testpattern"):
            create_engine(Settings(engine="preview"))


def test_download_fails_fast_offline(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["download", str(tmp_path / "stack")]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_serve_flags_are_generated_from_every_setting(monkeypatch, capsys) -> None:
    """Each setting has a flag whose help shows the setting's own default (written once)."""
    from avatar_server.settings import Limits

    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal width: one line per flag
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    helps, flag = {}, None
    for line in capsys.readouterr().out.splitlines():  # "  --flag METAVAR  help", help maybe on the next line
        words = line.split()
        if words and words[0].startswith("-"):
            flag = words[0].rstrip(",")
            helps[flag] = line
        elif flag is not None and line.startswith("    "):
            helps[flag] += " " + line.strip()
    for name, field in Limits.model_fields.items():
        if name == "microphone_sample_rates_hz":
            continue
        flag = "--" + name.replace("_", "-")
        assert f"default {field.default}" in helps[flag], flag
    parser = cli.build_parser()
    args = parser.parse_args(
        ["serve", "--auth-max-key-failures", "3", "--vad-threshold", "0.7", "--no-sr", "--microphone-sample-rate-hz", "16000"]
    )
    s = cli.settings_from_args(args)
    assert (s.auth.max_key_failures, s.vad.threshold, s.sr, s.limits.microphone_sample_rates_hz) == (3, 0.7, False, [16000])


def test_serve_cp_goes_through_the_context_parallel_engine() -> None:
    """``serve --cp N`` (Settings.cp) builds the engine on N context-parallel ranks; presets and
    degrees that cannot be split are refused with the reason before any rank process starts."""
    from avatar_server.server import EngineUnavailableError, create_engine

    with pytest.raises(EngineUnavailableError, match="context parallelism needs preview or full"):
        create_engine(Settings(engine="testpattern", cp=2))
    with pytest.raises(EngineUnavailableError, match=r"cp 3 neither divides the 2 key/value heads.*\[1, 2, 6\]"):
        create_engine(Settings(engine="preview", cp=3))  # preview: 6 query / 2 key-value heads
    with pytest.raises(ValueError, match="cp"):
        Settings(cp=9)
