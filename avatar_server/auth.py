"""Who may connect, and to what: API key, session tokens, origins, admin routes.

Everything here decides on the request line and headers (:class:`RequestView`), before a
route runs, a WebSocket is accepted or any session work is done: :meth:`Authenticator.check`
returns a :class:`Refusal`, the :class:`Grant` of a ``/ws`` handshake, or ``None``
(:class:`~avatar_server.routes.AccessMiddleware` applies it). Three kinds of callers:

* **The operator's backend** holds the API key (``--api-key`` / ``AVATAR_SERVER_API_KEY``;
  never given to browsers). ``POST /v1/tokens`` with ``Authorization: Bearer <api key>``
  mints a short-lived **session token**: a JWT (HS256, PyJWT) with ``sub`` = the session id it
  may start and control, ``scope`` = ``session``, ``iat``, ``exp``, ``jti``, ``iss``/``aud``.
  The token secret is ``auth.token_secret`` or, by default, HMAC-SHA256 of the API key.
* **Clients** open ``/ws`` with that token: ``?token=<jwt>`` (browsers cannot set headers on a
  WebSocket), ``Authorization: Bearer <jwt>``, or the subprotocol ``bearer.<jwt>`` offered
  together with ``avatar.v1`` (which the server then selects). The session the connection
  starts gets the token's session id; ``?session_id=`` or ``session.start.session_id``
  naming another one is refused.
* **Operators** read ``/metrics`` and any other non-public route (deny by default: every path
  that is not the page, a static file, ``/healthz``, ``/readyz``, ``/ws`` or ``/v1/tokens``;
  ``GET /v1/sessions`` and ``DELETE /v1/sessions/<id>`` included) with the API key, or from
  a loopback address (``auth.admin_from_loopback``, default on). ``/v1/sessions/<id>/<more>``
  also answers the token of session ``<id>``. The key is compared exactly (``Bearer <key>``)
  and never taken from a query string.

Browsers' ``Origin`` on ``/ws`` must be in ``allowed_origins`` (default: the server's own
host). Without an API key the server is a zero-config developer server: no token is needed,
it must bind a loopback address (:func:`startup_problem`), and it answers only requests whose
``Host`` is a loopback name, so that a web page cannot reach it through DNS rebinding.
Tokens and keys are never logged.

**Client addresses.** Every per-address rule (the failure throttle here, connections and
sessions per address in :mod:`avatar_server.limits`, admin access from loopback) uses
:meth:`Authenticator.client_address`: the TCP peer, or, when the peer is one of
``trusted_proxies``, the right-most address of the forwarding header (``X-Forwarded-For``, or
``Forwarded: for=``) that is not itself a trusted proxy (:class:`ClientAddressResolver`). A
forwarding header from any other peer is ignored.

**Brute force.** API-key checks that fail (``POST /v1/tokens``, ``/metrics`` and the other
admin routes, ``/v1/sessions/...``) are counted per client address (IPv6 per /64):
``auth.max_key_failures`` within ``auth.key_failure_window_s`` and the address gets HTTP 429
with ``Retry-After`` on those routes for ``auth.key_failure_backoff_s``, whatever it sends
(:class:`FailureThrottle`). Successes neither count nor clear the count. Keys are compared in
constant time (as SHA-256 digests, so not even the length leaks).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import http
import ipaddress
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import jwt

from avatar_server.settings import Settings, is_loopback_host

if TYPE_CHECKING:
    from avatar_server.metrics import Metrics

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger(__name__)

TOKENS_PATH = "/v1/tokens"
SESSIONS_PREFIX = "/v1/sessions/"
WEBSOCKET_PATH = "/ws"
SUBPROTOCOL = "avatar.v1"
BEARER_SUBPROTOCOL_PREFIX = "bearer."
SCOPE_SESSION = "session"
TOKEN_ISSUER = "avatar-server"
TOKEN_AUDIENCE = "avatar-server"
TOKEN_ALGORITHM = "HS256"
TOKEN_LEEWAY_S = 0.0  # a token is refused from its exp on (no undocumented grace)
MAX_TOKEN_CHARS = 4096
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SECRET_CONTEXT = b"avatar-server/session-tokens/v1"
_PUBLIC_PATHS = ("/", "/healthz", "/readyz")
SINGLE_HEADERS = ("Host", "Origin", "Authorization")  # a request that repeats one is refused (400)


class TokenError(Exception):
    """A token that cannot be used; ``status`` is the HTTP status to answer (401 or 403);
    ``expired``: it was signed by this server but has expired (not a guess)."""

    def __init__(
        self, message: str, status: http.HTTPStatus = http.HTTPStatus.UNAUTHORIZED, *, expired: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.expired = expired


@dataclass(frozen=True)
class MintedToken:
    token: str
    expires_at: int  # Unix seconds
    session_id: str
    scope: str = SCOPE_SESSION


@dataclass(frozen=True)
class Grant:
    """What one WebSocket connection may do, decided at its handshake.

    Attributes:
        address: the client's IP address.
        session_id: the only session id it may start and control (``None``: any; zero-config).
        token_id: the token's ``jti`` (``None`` without a token), for sessions-per-token limits.
    """

    address: str
    session_id: str | None = None
    token_id: str | None = None


def derive_token_secret(api_key: str) -> bytes:
    """The default token secret: HMAC-SHA256(api key, fixed context) -- 32 bytes."""
    return hmac.new(api_key.encode(), _SECRET_CONTEXT, hashlib.sha256).digest()


def new_session_id() -> str:
    return secrets.token_hex(8)


class TokenIssuer:
    """Mints and verifies session tokens (PyJWT, HS256).

    Args:
        secret: the HMAC secret (at least 32 bytes).
        default_ttl_s: lifetime of a token whose request names none.
        max_ttl_s: longest lifetime a request may ask for.
    """

    def __init__(self, secret: bytes, *, default_ttl_s: float = 300.0, max_ttl_s: float = 3600.0) -> None:
        self._secret = secret
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s

    def mint(self, session_id: str | None = None, *, ttl_s: float | None = None, now: float | None = None) -> MintedToken:
        """A token for ``session_id`` (a fresh id when ``None``) valid for ``ttl_s`` seconds."""
        session_id = session_id or new_session_id()
        if not SESSION_ID_RE.fullmatch(session_id):
            raise ValueError(f"session_id: must match {SESSION_ID_RE.pattern}")
        ttl_s = self.default_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl_s <= self.max_ttl_s:
            raise ValueError(f"ttl_s: {ttl_s} is outside (0, max_token_ttl_s = {self.max_ttl_s:g}]")
        issued = int(time.time() if now is None else now)
        expires_at = issued + max(1, round(ttl_s))
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": session_id,
            "scope": SCOPE_SESSION,
            "iat": issued,
            "exp": expires_at,
            "jti": secrets.token_hex(12),
        }
        token = jwt.encode(claims, self._secret, algorithm=TOKEN_ALGORITHM)
        return MintedToken(token=token, expires_at=expires_at, session_id=session_id)

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid session token.

        Raises:
            TokenError: expired, not signed with this server's secret, malformed, or without
                the ``session`` scope.
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError(f"token: longer than {MAX_TOKEN_CHARS} characters")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                leeway=TOKEN_LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "scope", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token: expired; ask your backend for a new one", expired=True) from None
        except jwt.InvalidSignatureError:
            raise TokenError("token: not signed by this server") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"token: invalid ({type(exc).__name__})") from None
        scopes = str(claims.get("scope", "")).split()
        if SCOPE_SESSION not in scopes:
            raise TokenError("token: lacks the 'session' scope", http.HTTPStatus.FORBIDDEN)
        if not isinstance(claims.get("sub"), str) or not SESSION_ID_RE.fullmatch(claims["sub"]):
            raise TokenError("token: 'sub' is not a session id")
        return claims


def startup_problem(settings: Settings) -> str | None:
    """Why the server must not start with ``settings`` (``None``: it may)."""
    if not is_loopback_host(settings.host) and settings.api_key is None:
        return (
            f"refusing to serve on {settings.host!r} without an api key: anyone who can reach it could "
            "start sessions on your GPU. Set --api-key (or AVATAR_SERVER_API_KEY) and give clients "
            "session tokens from POST /v1/tokens, or bind a loopback address (--host 127.0.0.1) "
            "for local development."
        )
    if settings.api_key is not None and len(settings.api_key.get_secret_value()) < 16:
        return "api_key: use at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    secret = settings.auth.token_secret
    if secret is not None and len(secret.get_secret_value().encode()) < 32:
        return "auth.token_secret: use at least 32 bytes"
    if (settings.tls_cert is None) != (settings.tls_key is None):
        return "--tls-cert and --tls-key go together: give both or neither"
    return None


def peer_host(client: Any) -> str:
    """The TCP peer's IP address from an ASGI ``scope["client"]`` (``(host, port)``), as text:
    IPv4-mapped IPv6 addresses as IPv4; ``""`` when unknown.

    This is the client only without a reverse proxy: use :meth:`Authenticator.client_address`
    wherever the client is meant."""
    try:
        host = str(client[0])
    except (TypeError, IndexError, KeyError):
        return ""
    addr = _ip(host)
    return host if addr is None else str(addr)


def _ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (zone id dropped, IPv4-mapped IPv6 as IPv4), or ``None``."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _forwarded_node(text: str) -> IPAddress | None:
    """One hop of a forwarding header as an address: ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``,
    ``[2001:db8::1]:80``, quoted or not; ``None`` for ``unknown``, obfuscated ids and junk."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    return _ip(text)


class ClientAddressResolver:
    """The client's address behind trusted reverse proxies.

    Args:
        trusted_proxies: IP addresses or CIDR networks of the proxies (empty: the TCP peer is
            always the client and forwarding headers are ignored).
        header: ``x-forwarded-for`` or ``forwarded`` (RFC 7239, its ``for=`` parameters): the
            header the proxies append the address they received a request from to.

    Raises:
        ValueError: an entry of ``trusted_proxies`` is not an address or network.
    """

    MAX_HOPS = 64  # forwarding-header entries looked at, from the right

    def __init__(self, trusted_proxies: Iterable[str] = (), header: str = "x-forwarded-for") -> None:
        self.networks = tuple(ipaddress.ip_network(item.strip(), strict=False) for item in trusted_proxies)
        self.header = header.lower()
        if self.header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(f"forwarded_header: {header!r} is not x-forwarded-for or forwarded")

    def trusted(self, address: IPAddress | str | None) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        addr = _ip(address) if isinstance(address, str) else address
        return addr is not None and any(addr in network for network in self.networks)

    def hops(self, headers: Any) -> list[IPAddress | None]:
        """The forwarding header's addresses, left (the original client) to right (the last
        proxy's peer), at most :attr:`MAX_HOPS` from the right; ``None`` for an entry that is
        not an address."""
        get_all = getattr(headers, "getlist", None) or headers.get_all  # Starlette's or websockets' Headers
        joined = ",".join(get_all(self.header))
        items = [item for item in joined.split(",") if item.strip()][-self.MAX_HOPS :]
        if self.header == "x-forwarded-for":
            return [_forwarded_node(item) for item in items]
        hops: list[IPAddress | None] = []
        for element in items:
            node = None  # an element without for= names no address
            for pair in element.split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "for":
                    node = _forwarded_node(value)
            hops.append(node)
        return hops

    def resolve(self, peer: str, headers: Any) -> str:
        """The client of a request that arrived from ``peer`` with ``headers``: ``peer`` unless
        it is a trusted proxy; then the right-most forwarding-header address that is not a
        trusted proxy (the left-most when all are; the last trusted hop when an entry on the way
        is not an address, e.g. ``unknown``)."""
        if not self.networks or headers is None or not self.trusted(peer):
            return peer
        address = peer
        for hop in reversed(self.hops(headers)):
            if hop is None:
                return address
            address = str(hop)
            if not self.trusted(hop):
                return address
        return address


@dataclass
class _Failures:
    window_start_s: float
    count: int = 0
    blocked_until_s: float = 0.0
    logged_s: float = -math.inf


class FailureThrottle:
    """Failed credential checks per client address, with a back-off (see the module docstring).

    ``max_failures`` failures within ``window_s`` seconds (counted from the first of them)
    block the address for ``backoff_s`` seconds; the count then starts again. At most
    ``max_addresses`` addresses are remembered: entries expire when their window and block are
    over, and the least recently failing one is forgotten first when the table is full. IPv6
    addresses are grouped by /64 (one subscriber's prefix).

    Args:
        max_failures, window_s, backoff_s: see above (seconds).
        max_addresses: addresses remembered at most.
        clock: monotonic seconds (tests pass, or set ``clock`` to, a fake clock).
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        backoff_s: float,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_addresses = max_addresses
        self.clock = clock
        self._entries: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    @staticmethod
    def key(address: str) -> str:
        """What an address is counted under: itself, or its /64 for IPv6."""
        addr = _ip(address)
        if isinstance(addr, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return address

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after_s(self, address: str) -> float:
        """Seconds ``address`` stays blocked (0: it is not)."""
        entry = self._entries.get(self.key(address))
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until_s - self.clock())

    def failure(self, address: str) -> bool:
        """Count a failed check from ``address``; ``True`` when this blocks it and the block
        should be logged (at most once per ``window_s`` per address)."""
        now = self.clock()
        key = self.key(address)
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            while len(self._entries) >= self.max_addresses:
                self._entries.popitem(last=False)
            entry = self._entries[key] = _Failures(window_start_s=now)
        else:
            self._entries.move_to_end(key)
        if now - entry.window_start_s >= self.window_s:
            entry.window_start_s, entry.count = now, 0
        entry.count += 1
        if entry.count < self.max_failures or entry.blocked_until_s > now:
            return False
        entry.blocked_until_s = now + self.backoff_s
        entry.window_start_s, entry.count = now, 0
        if now - entry.logged_s < self.window_s:
            return False
        entry.logged_s = now
        return True

    def _expire(self, now: float) -> None:
        while self._entries:
            entry = next(iter(self._entries.values()))
            if now < max(entry.window_start_s + self.window_s, entry.blocked_until_s):
                return
            self._entries.popitem(last=False)


MAX_PORT = 65535


def _hostname_port(netloc: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> lower-case host, port or ``None``.

    Raises:
        ValueError: an unclosed ``[``, or a port that is not 1-5 ASCII digits up to 65535
            (``str.isdigit`` also takes other scripts' digits, and ``int`` of thousands of
            digits is slow or refused).
    """
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        host, closed, rest = netloc[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("host: not [ipv6] or [ipv6]:port")
        port = rest[1:] if rest else ""
    else:
        host, _, port = netloc.partition(":")
    if not port:
        return host, None
    if not (len(port) <= 5 and port.isascii() and port.isdigit()) or int(port) > MAX_PORT:
        raise ValueError(f"port: {port[:12]!r} is not a port number (1-5 ASCII digits up to {MAX_PORT})")
    return host, int(port)


def _is_loopback_name(hostname: str) -> bool:
    return hostname == "localhost" or hostname.endswith(".localhost") or is_loopback_host(hostname)


def _normalize_origin(origin: str) -> str:
    try:
        parts = urlsplit(origin.strip().lower())
        if not parts.scheme or not parts.netloc:
            return origin.strip().lower()
        host, port = _hostname_port(parts.netloc)
    except ValueError:
        return "\x00invalid"  # matches no configured origin
    default = {"http": 80, "https": 443}.get(parts.scheme)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + ("" if port in (None, default) else f":{port}")


def origin_allowed(origin: str | None, host_header: str | None, allowed: Sequence[str] | None) -> bool:
    """Whether a browser ``Origin`` may open the WebSocket (no ``Origin``: not a browser, allowed)."""
    if origin is None:
        return True
    if allowed is not None:
        if "*" in allowed:
            return True
        return _normalize_origin(origin) in {_normalize_origin(item) for item in allowed}
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc or not host_header:
            return False  # "null" (sandboxed frames, file://) and anything odd
        origin_host, origin_port = _hostname_port(parts.netloc)
        host, port = _hostname_port(host_header)
    except ValueError:
        return False  # a malformed Origin or Host
    origin_port = origin_port or (443 if parts.scheme.lower() == "https" else 80)
    return host == origin_host and (port is None or port == origin_port)


def _bearer(headers: Any) -> str | None:
    """The credentials of ``Authorization: Bearer <credentials>`` (RFC 6750 section 2.1: one
    space, no whitespace in the credentials; anything else is no bearer credential)."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, credentials = value.partition(" ")
    if scheme.lower() != "bearer" or not credentials or any(ch.isspace() for ch in credentials):
        return None
    return credentials


def _query(query: str) -> dict[str, str]:
    try:
        parsed = parse_qs(query, keep_blank_values=True, max_num_fields=16)
    except ValueError:
        return {"": ""}  # too many fields: treated as a request without credentials
    return {key: values[0] for key, values in parsed.items()}


def _subprotocols(headers: Any) -> list[str]:
    return [item.strip() for value in headers.getlist("Sec-WebSocket-Protocol") for item in value.split(",")]


@dataclass(frozen=True)
class Refusal:
    """A decision to answer a request with an HTTP error instead of serving it.

    Attributes:
        status: the HTTP status (401, 403, 404, 405, 429, 503...).
        code: the error code, one of the WebSocket protocol's (``docs/PROTOCOL.md``).
        message: what is wrong, naming the field or the limit.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``, ``Allow``).
    """

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RequestView:
    """What the access rules look at in an HTTP request or a WebSocket handshake.

    Attributes:
        method: ``GET``, ``POST``... (``GET`` for a WebSocket handshake).
        path: the decoded path, without the query.
        query: the query parameters (first value of each; at most 16 fields).
        headers: the request headers; ``get(name)`` gives the first, ``getlist(name)`` all.
        peer: the TCP peer's IP address (``""`` when unknown).
    """

    method: str
    path: str
    query: dict[str, str]
    headers: Any
    peer: str


def _unauthorized(message: str, error: str = "invalid_token") -> Refusal:
    challenge = f'Bearer realm="avatar-server", error="{error}"'
    return Refusal(http.HTTPStatus.UNAUTHORIZED, "unauthorized", message, (("WWW-Authenticate", challenge),))


def _forbidden(message: str) -> Refusal:
    return Refusal(http.HTTPStatus.FORBIDDEN, "forbidden", message)


class Authenticator:
    """The access rules of one server (see the module docstring).

    Args:
        settings: the server settings (``api_key``, ``allowed_origins``, ``auth.*``, ``host``,
            ``trusted_proxies``, ``forwarded_header``).
        static_files: file names served at ``/<name>`` without credentials.
        metrics: counts failed key checks and throttled requests (optional).
        clock: monotonic seconds for the failure throttle (tests pass a fake clock).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        static_files: Iterable[str] = (),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.enabled = settings.api_key is not None
        self.metrics = metrics
        # Compared as digests: constant time, and the key's length does not leak either.
        self._api_key_digest = (
            None if settings.api_key is None else _digest(settings.api_key.get_secret_value())
        )
        self.addresses = ClientAddressResolver(settings.trusted_proxies, settings.forwarded_header)
        auth = settings.auth
        self.throttle = FailureThrottle(
            auth.max_key_failures,
            auth.key_failure_window_s,
            auth.key_failure_backoff_s,
            max_addresses=auth.max_tracked_addresses,
            clock=clock,
        )
        secret = settings.auth.token_secret
        if secret is not None:
            key = secret.get_secret_value().encode()
        elif settings.api_key is not None:
            key = derive_token_secret(settings.api_key.get_secret_value())
        else:
            key = secrets.token_bytes(32)  # no key: tokens are neither minted nor needed
        self.issuer = TokenIssuer(
            key, default_ttl_s=settings.auth.token_ttl_s, max_ttl_s=settings.auth.max_token_ttl_s
        )
        self.public_paths = frozenset(_PUBLIC_PATHS) | {f"/{name}" for name in static_files}
        self._loopback_only = not self.enabled and is_loopback_host(settings.host)
        if self.enabled and not is_loopback_host(settings.host) and settings.tls_cert is None:
            logger.warning(
                "serving %s without TLS: the api key and session tokens cross the network in clear text; "
                "use --tls-cert/--tls-key or a TLS-terminating proxy",
                settings.host,
            )

    # ----------------------------------------------------------------------------- queries
    def client_address(self, request: RequestView) -> str:
        """The client's IP address: the TCP peer, or behind a trusted proxy the address its
        forwarding header names (see :class:`ClientAddressResolver`). The one place the
        client address is decided."""
        return self.addresses.resolve(request.peer, request.headers)

    def is_api_key(self, credentials: str | None) -> bool:
        """Whether ``credentials`` is the api key (constant time)."""
        if self._api_key_digest is None or credentials is None:
            return False
        return hmac.compare_digest(_digest(credentials), self._api_key_digest)

    def _throttled(self, address: str) -> Refusal | None:
        """HTTP 429 while ``address`` is blocked by the failure throttle."""
        wait_s = self.throttle.retry_after_s(address)
        if wait_s <= 0:
            return None
        if self.metrics is not None:
            self.metrics.auth_throttled.inc()
        auth = self.settings.auth
        retry_s = max(1, math.ceil(wait_s))
        return Refusal(
            http.HTTPStatus.TOO_MANY_REQUESTS,
            "rate_limited",
            f"too many failed api-key checks from {address}: the limit is auth.max_key_failures = "
            f"{auth.max_key_failures} per auth.key_failure_window_s = {auth.key_failure_window_s:g}; "
            f"retry in {retry_s} s",
            (("Retry-After", str(retry_s)),),
        )

    def _key_failed(self, address: str, route: str) -> None:
        """Count a failed api-key check (a warning once per address and window when it blocks)."""
        if self.metrics is not None:
            self.metrics.auth_failures.labels(route).inc()
        if self.throttle.failure(address):
            auth = self.settings.auth
            logger.warning(
                "api-key checks from %s throttled: %d failures within auth.key_failure_window_s = %g; "
                "HTTP 429 for auth.key_failure_backoff_s = %g",
                address,
                auth.max_key_failures,
                auth.key_failure_window_s,
                auth.key_failure_backoff_s,
            )

    @staticmethod
    def select_subprotocol(request: RequestView) -> str | None:
        """The subprotocol to accept: ``avatar.v1`` when offered (the token may ride along as
        ``bearer.<jwt>``); a handshake is never refused for its subprotocols."""
        return SUBPROTOCOL if SUBPROTOCOL in _subprotocols(request.headers) else None

    # ----------------------------------------------------------------------------- the rules
    def check(self, request: RequestView) -> Refusal | Grant | None:
        """The access decision for ``request``: a :class:`Refusal`, the :class:`Grant` of an
        allowed ``/ws`` handshake, or ``None`` (serve it)."""
        path = request.path
        for name in SINGLE_HEADERS:
            if len(request.headers.getlist(name)) > 1:
                return Refusal(
                    http.HTTPStatus.BAD_REQUEST, "bad_request", f"{name.lower()}: the header is repeated; send it once"
                )
        try:
            host, _ = _hostname_port(request.headers.get("Host", ""))
        except ValueError as exc:
            return Refusal(http.HTTPStatus.BAD_REQUEST, "bad_request", f"host: {exc}")
        if self._loopback_only:
            if not _is_loopback_name(host):
                return _forbidden(
                    f"host: {host[:64]!r} is not a loopback name; a server on a loopback address without "
                    "an api key answers only localhost, 127.0.0.1 and [::1] (DNS-rebinding protection)"
                )
        if path == WEBSOCKET_PATH:
            return self._websocket(request)
        if path == TOKENS_PATH:
            return self._tokens(request)
        if path in self.public_paths:
            return None
        if path.startswith(SESSIONS_PREFIX) and "/" in path[len(SESSIONS_PREFIX) :].strip("/"):
            return self._session_route(request)
        return self._admin(request)

    def _websocket(self, request: RequestView) -> Refusal | Grant:
        headers, query = request.headers, request.query
        if not origin_allowed(headers.get("Origin"), headers.get("Host"), self.settings.allowed_origins):
            return _forbidden(
                f"origin: {str(headers.get('Origin'))[:100]!r} is not allowed; see allowed_origins "
                "(default: the server's own host)"
            )
        address = self.client_address(request)
        wanted = query.get("session_id")
        if not self.enabled:
            return Grant(address=address)
        token = query.get("token") or _bearer(headers)
        if not token:
            for item in _subprotocols(headers):
                if item.startswith(BEARER_SUBPROTOCOL_PREFIX):
                    token = item[len(BEARER_SUBPROTOCOL_PREFIX) :]
                    break
        if not token:
            return _unauthorized(
                "token: missing; connect to /ws?token=<session token> (POST /v1/tokens mints one)",
                error="invalid_request",
            )
        try:
            claims = self.issuer.verify(token)
        except TokenError as exc:
            if exc.status == http.HTTPStatus.FORBIDDEN:
                return _forbidden(str(exc))
            return _unauthorized(str(exc))
        if wanted is not None and wanted != claims["sub"]:
            return _forbidden("session_id: this token is for another session")
        return Grant(address=address, session_id=claims["sub"], token_id=str(claims["jti"]))

    def _tokens(self, request: RequestView) -> Refusal | None:
        """``POST /v1/tokens``: the api key; the route itself reads the JSON body and mints."""
        if request.method != "POST":
            return Refusal(
                http.HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"{TOKENS_PATH}: use POST", (("Allow", "POST"),)
            )
        if not self.enabled:
            return Refusal(
                http.HTTPStatus.NOT_FOUND,
                "not_found",
                f"{TOKENS_PATH}: tokens are off (no api key configured; none needed)",
            )
        address = self.client_address(request)
        refused = self._throttled(address)
        if refused is not None:
            return refused
        credentials = _bearer(request.headers)
        if not self.is_api_key(credentials):
            if credentials is not None:
                self._key_failed(address, "tokens")
            return _unauthorized(f"{TOKENS_PATH}: send Authorization: Bearer <api key>")
        return None

    def _session_route(self, request: RequestView) -> Refusal | None:
        """``/v1/sessions/<id>/...``: the api key, or a token of session ``<id>``."""
        if not self.enabled:
            return None
        from_query = request.query.get("token")
        credentials = from_query or _bearer(request.headers)
        if not credentials:
            return _unauthorized("token: missing (query token= or Authorization: Bearer)", error="invalid_request")
        address = self.client_address(request)
        refused = self._throttled(address)
        if refused is not None:
            return refused
        if self.is_api_key(credentials):
            if from_query:  # proxies and access logs keep query strings
                return _forbidden("token: the api key is never accepted in the query; send Authorization: Bearer")
            return None
        try:
            claims = self.issuer.verify(credentials)
        except TokenError as exc:
            if not exc.expired and exc.status != http.HTTPStatus.FORBIDDEN:  # neither key nor token of ours
                self._key_failed(address, "sessions")
            return _forbidden(str(exc)) if exc.status == http.HTTPStatus.FORBIDDEN else _unauthorized(str(exc))
        session_id = request.path[len(SESSIONS_PREFIX) :].split("/", 1)[0]
        if claims["sub"] != session_id:
            return _forbidden("session_id: this token is for another session")
        return None

    def _admin(self, request: RequestView) -> Refusal | None:
        address = self.client_address(request)
        credentials = _bearer(request.headers)
        if credentials is not None and self.enabled:
            refused = self._throttled(address)
            if refused is not None:
                return refused
            if self.is_api_key(credentials):
                return None
        if self.settings.auth.admin_from_loopback and _is_loopback_name(address):
            return None
        if credentials is not None:
            if self.enabled:
                self._key_failed(address, "admin")
            return _forbidden("authorization: not the api key")
        return _unauthorized(
            "this route needs Authorization: Bearer <api key> (or a loopback client)", error="invalid_request"
        )


def _digest(credentials: str) -> bytes:
    return hashlib.sha256(credentials.encode("utf-8", "surrogatepass")).digest()
