"""TLS (https + wss on the one port, self-signed certificate made here) and the ICE servers that
reach clients in session.ready and the server's own peer connection. Loopback only: the
STUN/TURN URLs point at 127.0.0.1 and the server's peer connection here is given none."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl

import pytest
from aiortc import RTCConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from avatar_server import connection as connection_module
from avatar_server.webrtc import ice_server_dicts, make_peer_connection
from tests.security_support import API_KEY, png_b64, recv_json, server

TURN = {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": "user", "credential": "secret"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


async def https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_https_and_wss_with_a_token(certificate) -> None:
    cert, key = certificate
    trust = ssl.create_default_context(cafile=cert)
    async with server(api_key=API_KEY, tls_cert=cert, tls_key=key) as app:
        assert app.url.startswith("https://")
        assert await https_get(app.port, "/healthz", trust) == (200, b"ok\n")
        # plain HTTP on the TLS port gets nowhere
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            assert b"200" not in await reader.read(100)
        writer.close()
        # an untrusted certificate is refused by a verifying client
        with pytest.raises(ssl.SSLCertVerificationError):
            await https_get(app.port, "/healthz", ssl.create_default_context())

        reader, writer = await asyncio.open_connection("127.0.0.1", app.port, ssl=trust, server_hostname="localhost")
        writer.write(
            f"POST /v1/tokens HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Authorization: Bearer {API_KEY}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            token = json.loads((await reader.read()).partition(b"\r\n\r\n")[2])["token"]
        writer.close()
        async with connect(f"wss://localhost:{app.port}/ws?token={token}", ssl=trust, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
            assert (await recv_json(ws))["type"] == "session.ready"


async def test_ice_servers_reach_the_client_and_the_server_peer_connection(monkeypatch) -> None:
    servers = ["stun:127.0.0.1:3478", TURN]
    assert ice_server_dicts(servers) == [{"urls": ["stun:127.0.0.1:3478"]}, TURN]
    config: RTCConfiguration = make_peer_connection(servers)._RTCPeerConnection__configuration
    turn = config.iceServers[1]
    assert (turn.urls, turn.username, turn.credential) == (TURN["urls"], "user", "secret")

    used: list = []

    def spy(ice_servers):
        used.append(ice_server_dicts(ice_servers))
        return make_peer_connection([])  # host candidates only: no STUN/TURN traffic in a test

    monkeypatch.setattr(connection_module, "make_peer_connection", spy)
    async with server(webrtc={"ice_servers": servers}) as app:
        async with connect(f"ws://127.0.0.1:{app.port}/ws", max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "image": png_b64()}))
            ready = await recv_json(ws)
            assert ready["ice_servers"] == [{"urls": ["stun:127.0.0.1:3478"]}, TURN]
            client = make_peer_connection([])
            client.addTransceiver("video", direction="recvonly")
            await client.setLocalDescription(await client.createOffer())
            await ws.send(json.dumps({"type": "webrtc.offer", "sdp": client.localDescription.sdp}))
            await client.close()
            assert (await recv_json(ws))["type"] == "webrtc.answer"
    assert used == [[{"urls": ["stun:127.0.0.1:3478"]}, TURN]]
