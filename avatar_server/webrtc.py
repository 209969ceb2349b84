"""WebRTC plumbing shared by the server and the Python client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

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


def make_peer_connection(ice_servers: Sequence[str] = ()) -> RTCPeerConnection:
    """A peer connection with the given STUN/TURN URLs (none: host candidates only).

    aiortc falls back to a public STUN server when ``iceServers`` is ``None``; an explicit
    empty list keeps gathering local, which is what a loopback or LAN deployment wants.
    """
    servers = [RTCIceServer(urls=url) for url in ice_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


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
