"""Brute-force throttling of api-key checks: N failures from one address within the window give
HTTP 429 with Retry-After for the back-off, whatever the address sends; successes neither count
nor clear; the table of addresses is bounded and expires; one warning per block.

The throttle runs on a fake clock (nothing sleeps); the server tests use the test-pattern
engine on loopback.
"""

from __future__ import annotations

import json
import logging

from websockets.asyncio.client import connect

from avatar_server.auth import Authenticator, FailureThrottle
from avatar_server.settings import AuthSettings, Settings
from tests.security_support import API_KEY, http_request, server

WRONG = {"Authorization": "Bearer wrong-key-0123456789abcdef"}
RIGHT = {"Authorization": f"Bearer {API_KEY}"}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_failures_within_the_window_block_for_the_back_off() -> None:
    clock = Clock()
    throttle = FailureThrottle(3, window_s=60, backoff_s=30, clock=clock)
    assert [throttle.failure("192.0.2.1") for _ in range(2)] == [False, False]
    assert throttle.retry_after_s("192.0.2.1") == 0
    assert throttle.failure("192.0.2.1") is True  # the third blocks (and is to be logged)
    assert throttle.retry_after_s("192.0.2.1") == 30
    assert throttle.retry_after_s("192.0.2.2") == 0  # another address is not affected
    clock.now += 29.5
    assert throttle.retry_after_s("192.0.2.1") == 0.5
    clock.now += 0.5
    assert throttle.retry_after_s("192.0.2.1") == 0


def test_failures_spread_over_more_than_the_window_never_block() -> None:
    clock = Clock()
    throttle = FailureThrottle(3, window_s=60, backoff_s=30, clock=clock)
    for _ in range(10):
        throttle.failure("192.0.2.1")
        throttle.failure("192.0.2.1")
        clock.now += 61  # the window counted from the first failure has passed
    assert throttle.retry_after_s("192.0.2.1") == 0


def test_a_block_is_logged_once_per_window() -> None:
    clock = Clock()
    throttle = FailureThrottle(2, window_s=60, backoff_s=10, clock=clock)
    logged = []
    for _ in range(7):  # a block every 11 s: blocked at 0, 11, 22, ... 66
        logged.append(throttle.failure("192.0.2.1") or throttle.failure("192.0.2.1"))
        assert throttle.retry_after_s("192.0.2.1") == 10
        clock.now += 11
    assert logged == [True, False, False, False, False, False, True]


def test_ipv6_addresses_count_per_64_prefix() -> None:
    throttle = FailureThrottle(2, window_s=60, backoff_s=30, clock=Clock())
    throttle.failure("2001:db8:1:2::1")
    throttle.failure("2001:db8:1:2:ffff::9")  # same /64: blocked
    assert throttle.retry_after_s("2001:db8:1:2::77") == 30
    assert throttle.retry_after_s("2001:db8:1:3::1") == 0
    assert FailureThrottle.key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert FailureThrottle.key("192.0.2.1") == "192.0.2.1"


def test_the_table_of_addresses_is_bounded_and_expires() -> None:
    clock = Clock()
    throttle = FailureThrottle(5, window_s=60, backoff_s=30, max_addresses=16, clock=clock)
    for n in range(1000):
        throttle.failure(f"10.0.{n // 256}.{n % 256}")
        assert len(throttle) <= 16
    assert len(throttle) == 16
    # the newest address is remembered (4 more failures make 5) ...
    for _ in range(4):
        throttle.failure("10.0.3.231")
    assert throttle.retry_after_s("10.0.3.231") == 30
    # ... the oldest was forgotten (its first failure is not counted any more)
    for _ in range(4):
        throttle.failure("10.0.0.0")
    assert throttle.retry_after_s("10.0.0.0") == 0
    clock.now += 60
    throttle.failure("192.0.2.1")
    assert len(throttle) == 1  # ... and every entry whose window is over is forgotten


def test_keys_are_compared_as_digests() -> None:
    auth = Authenticator(Settings(api_key=API_KEY))
    assert auth.is_api_key(API_KEY)
    for other in ("", API_KEY[:-1], API_KEY + "x", API_KEY.upper(), "\udcff"):
        assert not auth.is_api_key(other)
    assert not Authenticator(Settings()).is_api_key("")  # no key configured: nothing matches


def test_throttle_settings_defaults_and_environment(monkeypatch) -> None:
    defaults = AuthSettings()
    assert (defaults.max_key_failures, defaults.key_failure_window_s, defaults.key_failure_backoff_s) == (10, 60, 60)
    assert defaults.max_tracked_addresses == 10_000
    monkeypatch.setenv("AVATAR_SERVER_AUTH__MAX_KEY_FAILURES", "4")
    monkeypatch.setenv("AVATAR_SERVER_AUTH__KEY_FAILURE_BACKOFF_S", "120")
    settings = Settings()
    assert settings.auth.max_key_failures == 4 and settings.auth.key_failure_backoff_s == 120


def metric(app, line_start: str) -> float:
    for line in app.metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


async def test_token_endpoint_throttles_an_address_that_guesses_keys(caplog) -> None:
    auth = {"max_key_failures": 3, "key_failure_window_s": 60, "key_failure_backoff_s": 30}
    async with server(api_key=API_KEY, auth=auth) as app:
        clock = Clock()
        app.auth.throttle.clock = clock
        port = app.port
        for _ in range(5):  # no credentials at all: not a guess, not counted
            assert (await http_request(port, "POST", "/v1/tokens"))[0] == 401
        assert (await http_request(port, "POST", "/v1/tokens", WRONG))[0] == 401
        assert (await http_request(port, "POST", "/v1/tokens", WRONG))[0] == 401
        assert (await http_request(port, "POST", "/v1/tokens", RIGHT))[0] == 200  # neither counts nor clears
        with caplog.at_level(logging.WARNING, logger="avatar_server.auth"):
            assert (await http_request(port, "POST", "/v1/tokens", WRONG))[0] == 401  # the third: blocked
            clock.now += 10
            for headers in (RIGHT, WRONG, RIGHT):  # the right key too: a 429 must not tell them apart
                status, response_headers, body = await http_request(port, "POST", "/v1/tokens", headers)
                assert status == 429 and response_headers["retry-after"] == "20"
                assert json.loads(body) == {
                    "type": "error",
                    "code": "rate_limited",
                    "message": "too many failed api-key checks from 127.0.0.1: the limit is "
                    "auth.max_key_failures = 3 per auth.key_failure_window_s = 60; retry in 20 s",
                }
            # admin routes check the key too: blocked with a key, loopback without one still allowed
            assert (await http_request(port, "GET", "/metrics", RIGHT))[0] == 429
            assert (await http_request(port, "GET", "/metrics"))[0] == 200
            # session tokens are not api-key checks: a client with a token still connects
            async with connect(f"ws://127.0.0.1:{port}/ws?token={app.auth.issuer.mint('room-1').token}"):
                pass
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "throttled" in r.getMessage()]
        assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()
        assert API_KEY not in caplog.text and "wrong-key" not in caplog.text
        clock.now += 20  # the back-off is over
        status, _, body = await http_request(port, "POST", "/v1/tokens", RIGHT)
        assert status == 200 and json.loads(body)["scope"] == "session"
        assert metric(app, 'avatar_server_auth_failures_total{route="tokens"}') == 3
        assert metric(app, "avatar_server_auth_throttled_total") == 4


async def test_admin_and_session_routes_count_wrong_keys_but_not_expired_tokens() -> None:
    auth = {"max_key_failures": 2, "admin_from_loopback": False}
    async with server(api_key=API_KEY, auth=auth) as app:
        app.auth.throttle.clock = Clock()
        port = app.port
        expired = app.auth.issuer.mint("alice", ttl_s=60, now=0).token
        route = "/v1/sessions/alice/recording"
        for _ in range(3):  # expired tokens were signed here: not guesses
            assert (await http_request(port, "GET", route, {"Authorization": f"Bearer {expired}"}))[0] == 401
        assert (await http_request(port, "GET", route, RIGHT))[0] == 404  # past the check
        assert (await http_request(port, "GET", "/metrics", WRONG))[0] == 403
        assert (await http_request(port, "GET", route, WRONG))[0] == 401  # the second failure: blocked
        assert (await http_request(port, "GET", "/metrics", RIGHT))[0] == 429
        assert (await http_request(port, "GET", route, RIGHT))[0] == 429
        assert metric(app, 'avatar_server_auth_failures_total{route="admin"}') == 1
        assert metric(app, 'avatar_server_auth_failures_total{route="sessions"}') == 1
