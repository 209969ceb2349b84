"""Trusted proxies: behind a reverse proxy the client address comes from the forwarding header
(right-most address that is not a trusted proxy), from trusted peers only; every per-address
rule (connections, sessions, the api-key throttle, admin from loopback) uses it.

The server tests connect from 127.0.0.1 and play the proxy by sending the header themselves.
"""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from avatar_server.auth import ClientAddressResolver
from avatar_server.settings import Settings
from tests.security_support import API_KEY, http_request, png_b64, recv_json, server

PROXIES = ["10.0.0.0/8", "192.168.7.7"]
START = json.dumps({"type": "session.start", "image": png_b64()})


def resolve(peer: str, *header_lines: str, proxies=PROXIES, header: str = "x-forwarded-for") -> str:
    name = "X-Forwarded-For" if header == "x-forwarded-for" else "Forwarded"
    return ClientAddressResolver(proxies, header).resolve(peer, Headers([(name, line) for line in header_lines]))


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert resolve("10.1.2.3", "203.0.113.7", proxies=[]) == "10.1.2.3"


def test_an_untrusted_peer_cannot_name_another_client() -> None:
    assert resolve("198.51.100.4", "203.0.113.7") == "198.51.100.4"
    assert resolve("198.51.100.4", "10.0.0.1") == "198.51.100.4"


def test_the_right_most_untrusted_address_is_the_client() -> None:
    assert resolve("10.0.0.5", "203.0.113.7") == "203.0.113.7"
    # the client sent its own header (spoofed 198.51.100.1); the proxies appended behind it
    assert resolve("10.0.0.5", "198.51.100.1, 203.0.113.7, 10.0.0.3") == "203.0.113.7"
    assert resolve("192.168.7.7", "198.51.100.1, 203.0.113.7, 192.168.7.7") == "203.0.113.7"
    # several header lines are one list, in order
    assert resolve("10.0.0.5", "198.51.100.1", "203.0.113.7, 10.0.0.3") == "203.0.113.7"


def test_edge_cases_of_the_header() -> None:
    assert resolve("10.0.0.5") == "10.0.0.5"  # a trusted peer without the header is the client
    assert resolve("10.0.0.5", "10.0.0.9, 10.0.0.3") == "10.0.0.9"  # all trusted: the left-most
    assert resolve("10.0.0.5", "203.0.113.7, unknown") == "10.0.0.5"  # a hop that is no address
    assert resolve("10.0.0.5", "203.0.113.7, 10.0.0.3, garbage") == "10.0.0.5"
    assert resolve("10.0.0.5", "203.0.113.7:5123") == "203.0.113.7"
    assert resolve("10.0.0.5", "[2001:db8::17]:4711") == "2001:db8::17"
    assert resolve("10.0.0.5", "2001:db8::17") == "2001:db8::17"
    assert resolve("10.0.0.5", "::ffff:203.0.113.7") == "203.0.113.7"
    assert resolve("::ffff:10.0.0.5", "203.0.113.7") == "203.0.113.7"  # an IPv4-mapped peer
    assert resolve("10.0.0.5", ", ,203.0.113.7,") == "203.0.113.7"


def test_the_forwarded_header() -> None:
    line = 'for=192.0.2.60;proto=http;by=10.0.0.5, For="[2001:db8:cafe::17]:4711"'
    assert resolve("10.0.0.5", line, header="forwarded") == "2001:db8:cafe::17"
    assert resolve("10.0.0.5", "for=203.0.113.7, for=10.0.0.4", header="forwarded") == "203.0.113.7"
    assert resolve("10.0.0.5", "for=_hidden, for=10.0.0.4", header="forwarded") == "10.0.0.4"
    assert resolve("10.0.0.5", "proto=https", header="forwarded") == "10.0.0.5"
    # in forwarded mode X-Forwarded-For is not read (and the other way round)
    resolver = ClientAddressResolver(PROXIES, "forwarded")
    assert resolver.resolve("10.0.0.5", Headers({"X-Forwarded-For": "203.0.113.7"})) == "10.0.0.5"
    assert resolve("10.0.0.5", "for=203.0.113.7") == "10.0.0.5"


def test_trusted_proxies_setting(monkeypatch) -> None:
    assert Settings().trusted_proxies == [] and Settings().forwarded_header == "x-forwarded-for"
    monkeypatch.setenv("AVATAR_SERVER_TRUSTED_PROXIES", '["127.0.0.1", "10.0.0.0/8", "fd00::/8"]')
    monkeypatch.setenv("AVATAR_SERVER_FORWARDED_HEADER", "Forwarded")
    settings = Settings()
    assert settings.trusted_proxies == ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]
    assert settings.forwarded_header == "forwarded"
    with pytest.raises(ValidationError, match="trusted_proxies: 'proxy.example' is not an IP address or CIDR"):
        Settings(trusted_proxies=["proxy.example"])


async def ws_status(port: int, forwarded_for: str | None) -> int:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_per_address_limits_key_on_the_forwarded_client() -> None:
    limits = {"max_connections_per_address": 2, "max_sessions_per_address": 1}
    async with server(trusted_proxies=["127.0.0.1"], limits=limits) as app:
        url = f"ws://127.0.0.1:{app.port}/ws"
        a = {"X-Forwarded-For": "198.51.100.1, 203.0.113.1"}  # spoofed left entry: ignored
        async with connect(url, additional_headers=a) as first, connect(url, additional_headers=a) as second:
            # a third from 203.0.113.1 is over its limit; another client behind the proxy is not
            status, _, body = await http_request(
                app.port,
                "GET",
                "/ws",
                {
                    "X-Forwarded-For": "203.0.113.1",
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg==",
                    "Sec-WebSocket-Version": "13",
                },
            )
            assert status == 429
            assert b"too many connections from 203.0.113.1: the limit is max_connections_per_address = 2" in body
            assert dict(app.admission.connections_by_address) == {"203.0.113.1": 2}
            assert sorted(conn.address for conn in app.connections) == ["203.0.113.1", "203.0.113.1"]
            assert await ws_status(app.port, "203.0.113.2") == 101
            # sessions per address: the second session of 203.0.113.1 is refused
            await first.send(START)
            assert (await recv_json(first))["type"] == "session.ready"
            await second.send(START)
            reply = await recv_json(second)
            assert reply["code"] == "too_many_sessions"
            assert reply["message"].startswith("203.0.113.1 already runs 1 sessions")
            async with connect(url, additional_headers={"X-Forwarded-For": "203.0.113.3"}) as third:
                await third.send(START)
                assert (await recv_json(third))["type"] == "session.ready"


async def test_an_untrusted_peer_keeps_its_own_address() -> None:
    limits = {"max_connections_per_address": 1}
    async with server(trusted_proxies=["10.0.0.0/8"], limits=limits) as app:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", additional_headers={"X-Forwarded-For": "203.0.113.1"}):
            assert dict(app.admission.connections_by_address) == {"127.0.0.1": 1}
            assert await ws_status(app.port, "203.0.113.2") == 429  # the header does not help


async def test_the_key_throttle_and_admin_from_loopback_use_the_forwarded_client() -> None:
    async with server(api_key=API_KEY, trusted_proxies=["127.0.0.1"], auth={"max_key_failures": 2}) as app:
        port = app.port
        wrong = {"Authorization": "Bearer wrong-key-0123456789abcdef"}
        right = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(2):
            headers = {**wrong, "X-Forwarded-For": "203.0.113.1"}
            assert (await http_request(port, "POST", "/v1/tokens", headers))[0] == 401
        status, _, body = await http_request(port, "POST", "/v1/tokens", {**right, "X-Forwarded-For": "203.0.113.1"})
        assert status == 429 and b"from 203.0.113.1" in body
        assert (await http_request(port, "POST", "/v1/tokens", {**right, "X-Forwarded-For": "203.0.113.2"}))[0] == 200
        assert (await http_request(port, "POST", "/v1/tokens", right))[0] == 200  # the proxy itself
        # a remote client behind a proxy on this host is not a loopback client
        assert (await http_request(port, "GET", "/metrics", {"X-Forwarded-For": "203.0.113.5"}))[0] == 401
        assert (await http_request(port, "GET", "/metrics"))[0] == 200
