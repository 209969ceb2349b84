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
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # libnginx-mod-stream: TLS in front (RTMPS)


def rtmp_server_available() -> bool:
    return Path(NGINX).exists() and RTMP_MODULE.exists()


def rtmps_server_available() -> bool:
    return rtmp_server_available() and STREAM_MODULE.exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NginxRtmp:
    """nginx-rtmp serving application ``live`` on ``127.0.0.1:port`` (``rtmp://127.0.0.1:port/live/KEY``).

    With ``tls_cert`` and ``tls_key`` (PEM files) nginx's stream module also terminates TLS on
    ``tls_port`` in front of it: ``rtmps://127.0.0.1:tls_port/live/KEY``, as platforms' RTMPS
    ingests do.
    """

    def __init__(
        self, folder: Path, port: int | None = None, *, tls_cert: Path | None = None, tls_key: Path | None = None
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls_port = free_port() if tls_cert is not None else None
        self.process: subprocess.Popen | None = None
        self.conf = self.folder / "nginx.conf"
        tls_module = tls = ""
        if tls_cert is not None and tls_key is not None:
            tls_module = f"\nload_module {STREAM_MODULE};"
            tls = f"""
stream {{
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {tls_cert};
        ssl_certificate_key {tls_key};
        proxy_pass 127.0.0.1:{self.port};
    }}
}}
"""
        self.conf.write_text(
            f"""
load_module {RTMP_MODULE};{tls_module}
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
{tls}"""
        )

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def tls_url(self, key: str) -> str:
        return f"rtmps://127.0.0.1:{self.tls_port}/live/{key}"

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
