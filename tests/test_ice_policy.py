"""Remote ICE candidate policy (issue 18): refused candidates never reach aioice, so no STUN
packet goes to them; at most ``max_remote_candidates`` are kept; ``.local`` names are not
resolved unless mDNS is on. Checked against real aiortc peer connections, with UDP sockets on
loopback standing in for the addresses a candidate points at."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
from websockets.asyncio.client import connect

from avatar_server.ice import CandidateRefusal, IceCandidatePolicy, address_class, filter_offer
from avatar_server.webrtc import make_peer_connection, use_host_addresses
from tests.security_support import png_b64, recv_json, server

STUN_MAGIC_COOKIE = 0x2112A442  # RFC 5389 section 6


class StunSink(asyncio.DatagramProtocol):
    """Counts the STUN messages that arrive on one loopback UDP port."""

    def __init__(self) -> None:
        self.stun_packets = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) >= 20 and struct.unpack_from("!I", data, 4)[0] == STUN_MAGIC_COOKIE:
            self.stun_packets += 1

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]


@contextlib.asynccontextmanager
async def stun_sinks(count: int) -> AsyncIterator[list[StunSink]]:
    loop = asyncio.get_running_loop()
    sinks: list[StunSink] = []
    try:
        for _ in range(count):
            _, sink = await loop.create_datagram_endpoint(StunSink, local_addr=("127.0.0.1", 0))
            sinks.append(sink)
        yield sinks
    finally:
        for sink in sinks:
            if sink.transport is not None:
                sink.transport.close()


@pytest.fixture
def loopback_ice() -> Iterator[None]:
    use_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        use_host_addresses(None)


def candidate(ip: str, port: int, priority: int, *, foundation: str = "1", protocol: str = "udp") -> str:
    return f"a=candidate:{foundation} 1 {protocol} {priority} {ip} {port} typ host"


async def offer_with(candidates: list[str], kinds: tuple[str, ...] = ("video",)) -> str:
    """A real aiortc offer (recvonly ``kinds``) whose own candidates are replaced by ``candidates``
    (in every media section)."""
    pc = make_peer_connection([])
    try:
        for kind in kinds:
            pc.addTransceiver(kind, direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        lines = [
            line for line in pc.localDescription.sdp.split("\r\n") if not line.startswith("a=candidate:")
        ]
    finally:
        await pc.close()
    out: list[str] = []
    for line in lines:
        out.append(line)
        if line.startswith("a=mid:"):
            out += candidates
    return "\r\n".join(out)


async def answer(offer_sdp: str):
    """A server-side peer connection that has applied ``offer_sdp`` and started ICE."""
    from aiortc import RTCSessionDescription

    pc = make_peer_connection([])
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc


def remote_hosts(pc) -> list[str]:
    """The remote candidates aioice holds (public API: RTCIceTransport.getRemoteCandidates)."""
    return sorted(
        c.ip for t in pc.getTransceivers() for c in t.receiver.transport.transport.getRemoteCandidates()
    )


def mdns_socket_open() -> bool:
    return any(
        c.laddr and c.laddr.port == 5353 for c in psutil.Process(os.getpid()).net_connections(kind="udp")
    )


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", "link_local"),
        ("::ffff:169.254.169.254", "link_local"),
        ("fe80::1%eth0", "link_local"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("100.64.0.1", "private"),
        ("fd00::5", "private"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("8.8.8.8", "public"),
        ("2001:4860::8888", "public"),
        ("240.0.0.1", "reserved"),
        ("host.example", None),
    ],
)
def test_address_classes(address: str, kind: str | None) -> None:
    assert address_class(address) == kind


def test_default_policy_depends_on_the_bound_host() -> None:
    policy = IceCandidatePolicy()
    assert policy.for_host("127.0.0.1").allowed_address_classes == ["loopback"]
    assert policy.for_host("localhost").allowed_address_classes == ["loopback"]
    assert policy.for_host("0.0.0.0").allowed_address_classes == ["loopback", "private", "public"]
    # what the server offers as ICE host candidates decides (settings.ice_host_addresses())
    assert policy.for_host_addresses(["127.0.0.1"]).allowed_address_classes == ["loopback"]
    assert policy.for_host_addresses(["127.0.0.1", "::1"]).allowed_address_classes == ["loopback"]
    assert policy.for_host_addresses(["203.0.113.10"]).allowed_address_classes == [
        "loopback",
        "private",
        "public",
    ]
    assert policy.for_host_addresses(None).allowed_address_classes == ["loopback", "private", "public"]
    explicit = IceCandidatePolicy(allowed_address_classes=["public"])
    assert explicit.for_host("127.0.0.1").allowed_address_classes == ["public"]


async def test_refused_candidates_never_reach_aioice_and_get_no_stun(loopback_ice) -> None:
    async with stun_sinks(2) as (allowed_sink, refused_sink):
        hostile = [
            candidate("169.254.169.254", 80, 100, foundation="2"),
            candidate("::ffff:169.254.169.254", 80, 100, foundation="3"),
            candidate("10.0.0.1", 9, 100, foundation="4"),
            candidate("224.0.0.1", 9, 100, foundation="5"),
            candidate("255.255.255.255", 9, 100, foundation="6"),
            candidate("0.0.0.0", 9, 100, foundation="7"),
            candidate("8.8.8.8", 53, 100, foundation="8"),
            candidate("0a1b2c3d-1111-2222-3333-444455556666.local", 9, 100, foundation="9"),
            candidate("127.0.0.1", refused_sink.port, 100, foundation="10", protocol="tcp"),
        ]
        offer = await offer_with([candidate("127.0.0.1", allowed_sink.port, 200), *hostile])

        # control: without the policy aioice takes them (this is what the issue measured)
        raw = await answer("\r\n".join(line for line in offer.split("\r\n") if ".local" not in line))
        try:
            assert "169.254.169.254" in remote_hosts(raw) and "224.0.0.1" in remote_hosts(raw)
        finally:
            await raw.close()

        policy = IceCandidatePolicy().for_host("127.0.0.1")
        filtered, refusals = filter_offer(offer, policy)
        assert sorted(r.reason for r in refusals) == sorted(
            [
                "link_local",
                "link_local",
                "private",
                "multicast",
                "broadcast",
                "unspecified",
                "public",
                "mdns",
                "protocol",
            ]
        )
        assert "169.254.169.254" not in filtered and ".local" not in filtered
        assert sum(line.startswith("a=candidate:") for line in filtered.split("\r\n")) == 1
        # everything but the candidate lines is unchanged
        assert [ln for ln in filtered.split("\r\n")] == [
            ln
            for ln in offer.split("\r\n")
            if not ln.startswith("a=candidate:") or f" {allowed_sink.port} " in ln
        ]

        pc = await answer(filtered)
        try:
            assert remote_hosts(pc) == ["127.0.0.1"]
            for _ in range(100):
                if allowed_sink.stun_packets:
                    break
                await asyncio.sleep(0.05)
            assert allowed_sink.stun_packets > 0  # the measurement works: the kept candidate is checked
            await asyncio.sleep(0.5)
            assert refused_sink.stun_packets == 0  # the TCP candidate at the same host got nothing
            assert not mdns_socket_open()  # the .local name was never resolved
        finally:
            await pc.close()


async def test_an_offer_with_300_candidates_keeps_the_highest_priority_n(loopback_ice) -> None:
    async with stun_sinks(300) as sinks:
        offer = await offer_with(
            [candidate("127.0.0.1", sink.port, 1000 + i, foundation=str(i)) for i, sink in enumerate(sinks)]
        )
        assert len(offer.encode()) > 15_000
        filtered, refusals = filter_offer(
            offer, IceCandidatePolicy(max_remote_candidates=8).for_host("127.0.0.1")
        )
        assert len(refusals) == 292 and {r.reason for r in refusals} == {"too_many"}
        kept, dropped = sinks[-8:], sinks[:-8]
        pc = await answer(filtered)
        try:
            assert sorted(
                c.port
                for t in pc.getTransceivers()
                for c in t.receiver.transport.transport.getRemoteCandidates()
            ) == sorted(s.port for s in kept)
            for _ in range(100):
                if all(sink.stun_packets for sink in kept):
                    break
                await asyncio.sleep(0.05)
            assert all(sink.stun_packets for sink in kept)
            await asyncio.sleep(0.5)
            assert sum(sink.stun_packets for sink in dropped) == 0
            assert sum(sink.stun_packets for sink in kept) < 8 * 10  # a handful of retransmissions each
        finally:
            await pc.close()


async def test_repeats_in_bundled_sections_count_once_and_mdns_can_be_enabled() -> None:
    bundled = await offer_with(
        [candidate("127.0.0.1", 4000, 5), candidate("abc-123.local", 4001, 4)], kinds=("audio", "video")
    )
    _, refusals = filter_offer(
        bundled, IceCandidatePolicy(max_remote_candidates=1, mdns=True).for_host("::1")
    )
    assert refusals == [
        CandidateRefusal("abc-123.local", "too_many", 0),
        CandidateRefusal("abc-123.local", "too_many", 1),
    ]
    _, refusals = filter_offer(
        bundled, IceCandidatePolicy(max_remote_candidates=2, mdns=True).for_host("::1")
    )
    assert refusals == []
    for bad in (
        "v=0\r\nm=video x\r\n",
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=candidate:1 1 udp x 1.2.3.4 5 typ host",
    ):
        with pytest.raises(ValueError, match="sdp: aiortc cannot parse"):
            filter_offer(bad, IceCandidatePolicy())


async def test_the_server_filters_offers_and_counts_refusals() -> None:
    policy = {"allowed_address_classes": ["private"], "max_remote_candidates": 4}
    async with server(webrtc={"ice_policy": policy}) as app, stun_sinks(1) as (sink,):
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
            assert (await recv_json(ws))["type"] == "session.ready"
            offer = await offer_with(
                [
                    candidate("127.0.0.1", sink.port, 300),
                    candidate("169.254.169.254", 80, 200, foundation="2"),
                    candidate("5f2b9a30-aaaa-bbbb-cccc-0123456789ab.local", 9, 100, foundation="3"),
                    *(candidate(f"10.0.0.{i}", 9, 10 + i, foundation=str(10 + i)) for i in range(1, 7)),
                ]
            )
            await ws.send(json.dumps({"type": "webrtc.offer", "sdp": offer}))
            assert (await recv_json(ws))["type"] == "webrtc.answer"
            await asyncio.sleep(1.5)
            assert sink.stun_packets == 0
            assert not mdns_socket_open()
            value = app.metrics.registry.get_sample_value
            counts = {
                reason: value("avatar_server_ice_candidates_refused_total", {"reason": reason})
                for reason in ("loopback", "link_local", "mdns", "too_many")
            }
            assert counts == {"loopback": 1.0, "link_local": 1.0, "mdns": 1.0, "too_many": 2.0}
