"""``avatar-server --help`` and argument errors import nothing heavy.

Each case runs ``avatar_server.cli.main(argv)`` in a fresh interpreter and reports its exit
status and which heavy modules got imported. torch alone takes seconds to import; the engine,
aiortc/PyAV (WebRTC), the streaming package, the server and the Python client are imported by
the subcommand handlers only, after the arguments have been checked. What is asserted is the
set of modules (which cannot pass by luck on a fast machine), not a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "engine", "aiortc", "av", "streaming", "avatar_server.server", "clients.client")

PROBE = """
import json, sys
import avatar_server.cli as cli
argv = json.loads(sys.argv[1])
try:
    code = cli.main(argv)
except SystemExit as exc:
    code = exc.code
heavy = sorted(name for name in json.loads(sys.argv[2]) if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def probe(argv: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["client", "--help"], ["serve", "--help"], ["generate", "--help"], ["download", "--help"]],
)
def test_help_imports_no_heavy_module(argv) -> None:
    assert probe(argv) == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no subcommand
        ["client"],  # --image missing
        ["serve", "--engine", "nope"],
        ["client", "--image", "portrait.png", "--mode", "microphone"],  # checked before connecting
        ["client", "--image", "portrait.png", "--barge-in"],
    ],
)
def test_argument_errors_import_no_heavy_module(argv) -> None:
    assert probe(argv) == {"code": 2, "heavy": []}


def test_the_probe_sees_heavy_imports(media_dir) -> None:
    """The check can fail: a client run that gets past its arguments (and then finds no server)
    imports the Python client, aiortc and PyAV, and the probe reports them."""
    outcome = probe(["client", "--image", str(media_dir / "portrait.png"), "--url", "http://127.0.0.1:9/"])
    assert outcome["code"] == 1
    assert {"aiortc", "av", "clients.client"} <= set(outcome["heavy"]), outcome
