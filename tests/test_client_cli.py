"""``avatar-server client`` flags: their defaults and checks (:mod:`clients.cli`), reached
through the ``avatar-server`` parser that registers them."""

from __future__ import annotations

from avatar_server import cli
from clients.cli import check_client_args


def test_client_mode_defaults_and_checks(media_dir) -> None:
    parser = cli.build_parser()
    image = str(media_dir / "portrait.png")
    audio = str(media_dir / "jfk.flac")
    args = parser.parse_args(["client", "--image", image])
    assert check_client_args(args) is None and args.mode == "text"
    args = parser.parse_args(["client", "--image", image, "--audio", audio, "--barge-in"])
    assert check_client_args(args) is None and args.mode == "microphone"
    args = parser.parse_args(["client", "--image", image, "--interrupt-after", "-1"])
    assert check_client_args(args) == "--interrupt-after: must not be negative, got -1"
    args = parser.parse_args(["client", "--image", "nope.png"])
    assert check_client_args(args) == "--image: nope.png: no such file"
