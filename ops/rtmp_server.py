"""A real RTMP server for tests and measurements: nginx with Debian's ``libnginx-mod-rtmp`` on a
loopback port.

Installed by ``.ci/run`` (``apt-get install nginx libnginx-mod-rtmp``); tests that need it are
skipped with a clear reason when it is missing. The config is written to a temporary folder,
nginx runs in the foreground (``daemon off``, one process) and is stopped by the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


def rtmp_server_available() -> bool:
    return Path(NGINX).exists() and RTMP_MODULE.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NginxRtmp:
    """nginx-rtmp serving application ``live`` on ``127.0.0.1:port`` (``rtmp://127.0.0.1:port/live/KEY``)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(
            f"""
load_module {RTMP_MODULE};
daemon off;
master_process off;
pid {self.folder}/nginx.pid;
error_log {self.folder}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
        }}
    }}
}}
"""
        )

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.folder), "-c", str(self.conf), "-e", str(self.folder / "stderr.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.folder / 'error.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen in time")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)  # an abrupt end, like a crash
            self.process.wait(10)
        self.process = None

    def __enter__(self) -> NginxRtmp:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
