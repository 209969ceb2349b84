"""Transport options of the listening socket: TLS, keepalive and handshake timeouts.

With ``tls_cert`` and ``tls_key`` (``--tls-cert``, ``--tls-key``; PEM files) the one port
serves ``https://`` and ``wss://``; browsers need a secure origin for the microphone anywhere
but ``localhost``. WebRTC media is encrypted (DTLS-SRTP) either way.
"""

from __future__ import annotations

import ssl
from typing import Any

from avatar_server.auth import Authenticator
from avatar_server.settings import Settings


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) from a PEM certificate chain and private key.

    Raises:
        OSError / ssl.SSLError: the files cannot be read or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=cert, keyfile=key)
    return context


def serve_options(settings: Settings, auth: Authenticator) -> dict[str, Any]:
    """Keyword arguments for ``websockets.asyncio.server.serve`` beyond handler, host and port."""
    limits = settings.limits
    options: dict[str, Any] = {
        "ping_interval": limits.ping_interval_s,
        "ping_timeout": limits.ping_timeout_s,
        "open_timeout": limits.handshake_timeout_s,
        "close_timeout": limits.close_timeout_s,
        "select_subprotocol": auth.select_subprotocol,
    }
    if settings.tls_cert is not None and settings.tls_key is not None:
        options["ssl"] = server_ssl_context(str(settings.tls_cert), str(settings.tls_key))
    return options
