"""The plain server never imports Ray (issue 13: Ray comes only with ``avatar-server fleet``)."""

from __future__ import annotations

import subprocess
import sys


def test_the_plain_server_does_not_import_ray() -> None:
    code = (
        "import sys, avatar_server.server, avatar_server.cli, avatar_server.settings\n"
        "s = avatar_server.settings.Settings()\n"
        "assert s.fleet.max_replicas == 1\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
