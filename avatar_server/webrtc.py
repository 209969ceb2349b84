"""WebRTC plumbing shared by the server and the Python client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection

logger = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses


def use_host_addresses(addresses: Sequence[str] | None) -> None:
    """Offer exactly ``addresses`` as ICE host candidates (``None``: aioice's own discovery).

    aioice's ``get_host_addresses`` lists every interface address except 127.0.0.1, so two
    peers on one machine cannot pair over loopback, and on machines whose only other
    interface must not carry test traffic nothing usable is gathered. aioice has no option
    for this, so the module function it calls while gathering is replaced (process-wide).
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    fixed = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [addr for addr in fixed if (":" in addr and use_ipv6) or (":" not in addr and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
    logger.debug("ICE host candidates limited to %s", fixed)


def ice_server_dicts(ice_servers: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """STUN/TURN servers (URL strings, or objects/dicts with ``urls``, ``username``,
    ``credential``) in the shape of the browser's ``RTCIceServer``: ``{"urls": [...], ...}``."""
    out: list[dict[str, Any]] = []
    for server in ice_servers:
        if isinstance(server, str):
            out.append({"urls": [server]})
            continue
        data = server if isinstance(server, dict) else server.model_dump()
        urls = data["urls"]
        entry: dict[str, Any] = {"urls": [urls] if isinstance(urls, str) else list(urls)}
        for key in ("username", "credential"):
            if data.get(key) is not None:
                entry[key] = data[key]
        out.append(entry)
    return out


def make_peer_connection(ice_servers: Sequence[Any] = ()) -> RTCPeerConnection:
    """A peer connection with the given STUN/TURN servers (none: host candidates only); see
    :func:`ice_server_dicts` for the accepted forms (TURN with username and credential).

    aiortc falls back to a public STUN server when ``iceServers`` is ``None``; an explicit
    empty list keeps gathering local, which is what a loopback or LAN deployment wants.
    """
    servers = [
        RTCIceServer(urls=entry["urls"], username=entry.get("username"), credential=entry.get("credential"))
        for entry in ice_server_dicts(ice_servers)
    ]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


PC_CLOSE_TIMEOUT_S = 5.0


async def close_peer_connection(pc: RTCPeerConnection, timeout_s: float = PC_CLOSE_TIMEOUT_S) -> None:
    """``pc.close()`` that neither raises nor hangs.

    aiortc's ``close`` raises when a transceiver has no transport (an offer that was applied
    only in part, e.g. a BUNDLE group naming a missing mid), and from then on every ``close``
    waits forever on its unresolved close future -- a connection that tried to close such a
    peer connection would never release its session. Here the transports that exist are
    stopped one by one (their UDP sockets closed) and the close future is resolved.
    """
    try:
        await asyncio.wait_for(pc.close(), timeout_s)
        return
    except Exception as exc:  # noqa: BLE001 - any failure falls back to the manual path
        logger.warning("peer connection close failed (%s); stopping its transports one by one", type(exc).__name__)
    for transceiver in pc.getTransceivers():
        for dtls in (transceiver.receiver.transport, transceiver.sender.transport):
            if dtls is None:
                continue
            for transport in (dtls, dtls.transport):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.stop(), timeout_s)
    closed = getattr(pc, "_RTCPeerConnection__isClosed", None)
    if isinstance(closed, asyncio.Future) and not closed.done():
        closed.set_result(True)
    pc.remove_all_listeners()


async def wait_connected(pc: RTCPeerConnection, timeout_s: float) -> None:
    """Wait until the peer connection is ``connected``; raise ``ConnectionError`` on failure."""
    done = asyncio.get_running_loop().create_future()

    def check() -> None:
        if done.done():
            return
        if pc.connectionState == "connected":
            done.set_result(None)
        elif pc.connectionState in ("failed", "closed"):
            done.set_exception(ConnectionError(f"peer connection {pc.connectionState}"))

    pc.on("connectionstatechange", check)
    check()
    try:
        await asyncio.wait_for(done, timeout_s)
    finally:
        pc.remove_listener("connectionstatechange", check)
