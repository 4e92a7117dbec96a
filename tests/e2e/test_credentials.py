"""API keys and browser cookie sessions end to end, and the in-band (close) rejection style.

Real ``wardgate serve`` processes, the real CLI, real WebSocket clients. Cookies are handled by
hand (aiohttp's jar ignores cookies for IP hosts), exactly as a browser would send them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import Daemon, DaemonFactory, remember
from tests.e2e.helpers import Rpc, handshake, refusal
from wardgate.gate.credentials import csrf_token
from wardgate.store.base import token_hash


def create_key(daemon: Daemon, role: str = "operator", *extra: str) -> dict[str, Any]:
    result = daemon.cli("keys", "create", "--name", f"{role} key", "--role", role, "--json", *extra)
    created: dict[str, Any] = json.loads(result.stdout)
    remember(created["key"])
    return created


async def login(daemon: Daemon, token: str, **headers: str) -> tuple[int, dict[str, Any], str | None]:
    """POST /api/auth/login; returns (status, body, the Set-Cookie header)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(daemon.http + "/api/auth/login", json={"token": token}, headers=headers) as response,
    ):
        body = await response.json(content_type=None)
        cookie = response.headers.get("Set-Cookie")
        if cookie:
            remember(cookie_value(cookie))
        return response.status, body, cookie


def cookie_value(set_cookie: str) -> str:
    name, _, rest = set_cookie.partition("=")
    assert name == "wardgate_session"
    return rest.split(";", 1)[0]


def browser(daemon: Daemon, cookie: str, *, origin: str | None = "same") -> dict[str, str]:
    """The headers a browser on the daemon's own page sends with the cookie."""
    headers = {"Cookie": f"wardgate_session={cookie}"}
    if origin == "same":
        headers["Origin"] = daemon.http
    elif origin is not None:
        headers["Origin"] = origin
    return headers


async def open_ws(daemon: Daemon, headers: dict[str, str]) -> Rpc:
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(daemon.ws, headers=headers, protocols=("wardgate.v1",))
    except BaseException:
        await http.close()
        raise
    return Rpc(http, ws)


async def request(
    daemon: Daemon, method: str, path: str, headers: dict[str, str]
) -> tuple[int, Any, CIMultiDict[str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, daemon.http + path, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None), response.headers.copy()


# --- API keys ------------------------------------------------------------------------------------


async def test_key_is_printed_once_and_only_its_hash_is_stored(shared_daemon: Daemon) -> None:
    created = create_key(shared_daemon, "viewer")
    assert created["key"].startswith("wgk_")
    assert created["id"].startswith("key_")
    listed = shared_daemon.cli("keys", "list", "--json").stdout
    assert created["key"] not in listed
    entry = next(k for k in json.loads(listed) if k["id"] == created["id"])
    assert entry == {
        "id": created["id"],
        "name": "viewer key",
        "role": "viewer",
        "created": entry["created"],
        "lastUsed": None,
        "expires": None,
        "revoked": False,
    }
    stored = shared_daemon.stored_bytes()
    assert created["key"].encode() not in stored
    assert token_hash(created["key"]).encode() in stored
    # The table view never shows it either; the human form of create prints it on stdout alone.
    assert created["key"] not in shared_daemon.cli("keys", "list").stdout
    human = shared_daemon.cli("keys", "create", "--name", "script")
    remember(human.stdout.strip())
    assert human.stdout.strip().startswith("wgk_")
    assert "shown once" in human.stderr


@pytest.mark.parametrize("where", ["x-api-key", "authorization"])
async def test_key_authenticates_a_websocket_with_its_role(shared_daemon: Daemon, where: str) -> None:
    created = create_key(shared_daemon, "viewer")
    header = (
        {"X-API-Key": created["key"]}
        if where == "x-api-key"
        else {"Authorization": f"Bearer {created['key']}"}
    )
    rpc = await open_ws(shared_daemon, header)
    try:
        response = await rpc.initialize()
        assert response["result"]["role"] == "viewer"
        assert "session" not in response["result"]
        denied = await rpc.call("agent/run", {"prompt": "hi"})
        assert denied["error"]["code"] == -32004
    finally:
        await rpc.close()
    listed = json.loads(shared_daemon.cli("keys", "list", "--json").stdout)
    assert next(k for k in listed if k["id"] == created["id"])["lastUsed"] is not None


async def test_query_api_key_only_when_enabled(wardgate: DaemonFactory) -> None:
    off = wardgate()
    key = create_key(off)["key"]
    status, body = await refusal(off, path=f"/ws?apiKey={key}")
    assert (status, body["error"]) == (401, "authentication_required")
    on = wardgate("security:\n  allow_query_token: true\n")
    key = create_key(on)["key"]
    assert await handshake(on, path=f"/ws?apiKey={key}") == (101, None)
    assert key not in on.logs()


async def test_bad_and_revoked_and_expired_keys_are_refused(wardgate: DaemonFactory) -> None:
    d = wardgate()
    status, body = await refusal(d, {"X-API-Key": "wgk_" + "A" * 43})
    assert (status, body["error"]) == (401, "invalid_token")
    status, body = await refusal(d, {"X-API-Key": "wgk_short"})
    assert (status, body["error"]) == (401, "invalid_token")
    created = create_key(d)
    assert "Revoked" in d.cli("keys", "revoke", created["id"]).stdout
    status, body = await refusal(d, {"X-API-Key": created["key"]})
    assert (status, body["error"]) == (401, "token_revoked")
    again = d.cli("keys", "revoke", created["id"], check=False)
    assert again.returncode == 1
    assert "no active API key" in again.stderr
    short = create_key(d, "operator", "--expires", "1s")
    assert short["expires"] is not None
    await asyncio.sleep(1.2)
    status, body = await refusal(d, {"X-API-Key": short["key"]})
    assert (status, body["error"]) == (401, "token_expired")
    assert {k["id"] for k in json.loads(d.cli("keys", "list", "--all", "--json").stdout)} >= {
        created["id"],
        short["id"],
    }


async def test_revoking_a_key_closes_its_live_sockets_within_a_second(shared_daemon: Daemon) -> None:
    created = create_key(shared_daemon)
    other = create_key(shared_daemon)
    rpc = await open_ws(shared_daemon, {"X-API-Key": created["key"]})
    bystander = await open_ws(shared_daemon, {"X-API-Key": other["key"]})
    try:
        await rpc.initialize()
        await bystander.initialize()
        shared_daemon.cli("keys", "revoke", created["id"])
        started = time.monotonic()  # the CLI's own start-up does not count
        code, _ = await rpc.closed(timeout=5)
        assert code == 4401
        assert time.monotonic() - started < 1.0
        assert rpc.notifications[-1]["method"] == "auth/revoked"
        assert (await bystander.call("status/get"))["result"]
    finally:
        await rpc.close()
        await bystander.close()


def test_key_create_refuses_bad_input(shared_daemon: Daemon) -> None:
    bad_role = shared_daemon.cli("keys", "create", "--name", "x", "--role", "root", check=False)
    assert bad_role.returncode == 2
    assert "viewer, operator, admin" in bad_role.stderr
    bad_ttl = shared_daemon.cli("keys", "create", "--name", "x", "--expires", "soon", check=False)
    assert bad_ttl.returncode == 2
    assert "not a duration" in bad_ttl.stderr
    no_name = shared_daemon.cli("keys", "create", "--name", "  ", check=False)
    assert no_name.returncode == 1
    assert "needs a name" in no_name.stderr


# --- cookie sessions -----------------------------------------------------------------------------


async def test_pairing_login_sets_a_strict_httponly_cookie_once(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    status, body, set_cookie = await login(shared_daemon, token)
    assert status == 200, body
    assert set_cookie is not None
    attributes = [part.strip() for part in set_cookie.split(";")]
    assert attributes[1:] == ["Path=/", f"Max-Age={7 * 86400}", "HttpOnly", "SameSite=Strict"]
    value = cookie_value(set_cookie)
    assert value.startswith("wgc_")
    assert body["csrfToken"] == csrf_token(value)
    assert body["role"] == "operator"
    assert body["deviceId"].startswith("dev_")
    assert value not in json.dumps(body)
    # The pairing token was consumed: a second login with it fails.
    status, again, cookie = await login(shared_daemon, token)
    assert (status, again["error"], cookie) == (401, "invalid_token", None)
    listed = json.loads(shared_daemon.cli("devices", "list", "--json").stdout)
    assert any(d["id"] == body["deviceId"] for d in listed)


async def test_cookie_needs_an_allowed_origin(shared_daemon: Daemon) -> None:
    _, _, set_cookie = await login(shared_daemon, shared_daemon.pairing_token())
    assert set_cookie is not None
    cookie = cookie_value(set_cookie)
    rpc = await open_ws(shared_daemon, browser(shared_daemon, cookie))
    try:
        response = await rpc.initialize()
        assert response["result"]["role"] == "operator"
    finally:
        await rpc.close()
    for origin in (None, "https://evil.example"):
        status, body = await refusal(shared_daemon, browser(shared_daemon, cookie, origin=origin))
        assert (status, body["error"]) == (403, "origin_forbidden")
        status, body, _ = await request(
            shared_daemon, "GET", "/api/auth/session", browser(shared_daemon, cookie, origin=origin)
        )
        assert (status, body["error"]) == (403, "origin_forbidden")


async def test_session_info_logout_and_csrf(shared_daemon: Daemon) -> None:
    _, body, set_cookie = await login(shared_daemon, shared_daemon.pairing_token())
    assert set_cookie is not None
    cookie = cookie_value(set_cookie)
    headers = browser(shared_daemon, cookie)
    status, info, _ = await request(shared_daemon, "GET", "/api/auth/session", headers)
    assert status == 200
    assert info == {
        "csrfToken": body["csrfToken"],
        "role": "operator",
        "deviceId": body["deviceId"],
        "keyId": None,
    }
    rpc = await open_ws(shared_daemon, headers)
    try:
        await rpc.initialize()
        status, refused, _ = await request(shared_daemon, "POST", "/api/auth/logout", headers)
        assert (status, refused["error"]) == (403, "csrf_failed")
        wrong = {**headers, "X-CSRF-Token": csrf_token("wgc_" + "B" * 43)}
        status, refused, _ = await request(shared_daemon, "POST", "/api/auth/logout", wrong)
        assert (status, refused["error"]) == (403, "csrf_failed")
        good = {**headers, "X-CSRF-Token": body["csrfToken"]}
        status, done, response_headers = await request(shared_daemon, "POST", "/api/auth/logout", good)
        assert (status, done) == (200, {"loggedOut": True})
        assert "Max-Age=0" in response_headers["Set-Cookie"]
        # Its live socket closes; the cookie no longer opens anything.
        code, _ = await rpc.closed(timeout=5)
        assert code == 4401
    finally:
        await rpc.close()
    status, refused = await refusal(shared_daemon, headers)
    assert (status, refused["error"]) == (401, "token_revoked")
    status, refused, response_headers = await request(
        shared_daemon, "POST", "/api/auth/logout", {**headers, "X-CSRF-Token": body["csrfToken"]}
    )
    assert status == 401
    assert "Max-Age=0" in response_headers["Set-Cookie"]
    # Only cookies are browser sessions.
    status, refused, _ = await request(
        shared_daemon,
        "GET",
        "/api/auth/session",
        {"Authorization": "Bearer " + shared_daemon.pairing_token()},
    )
    assert (status, refused["error"]) == (401, "invalid_token")


async def test_api_key_login_dies_with_the_key(shared_daemon: Daemon) -> None:
    created = create_key(shared_daemon, "admin")
    status, body, set_cookie = await login(shared_daemon, created["key"])
    assert status == 200
    assert set_cookie is not None
    assert body["role"] == "admin"
    assert body["deviceId"] is None
    headers = browser(shared_daemon, cookie_value(set_cookie))
    status, info, _ = await request(shared_daemon, "GET", "/api/auth/session", headers)
    assert (status, info["keyId"]) == (200, created["id"])
    rpc = await open_ws(shared_daemon, headers)
    try:
        await rpc.initialize()
        shared_daemon.cli("keys", "revoke", created["id"])
        code, _ = await rpc.closed(timeout=5)
        assert code == 4401
    finally:
        await rpc.close()
    status, refused = await refusal(shared_daemon, headers)
    assert (status, refused["error"]) == (401, "token_revoked")


async def test_device_revocation_and_revoke_all_end_browser_sessions(wardgate: DaemonFactory) -> None:
    d = wardgate()
    _, first, first_cookie = await login(d, d.pairing_token())
    _, _, second_cookie = await login(d, d.pairing_token())
    assert first_cookie is not None
    assert second_cookie is not None
    d.cli("devices", "revoke", first["deviceId"])
    status, refused = await refusal(d, browser(d, cookie_value(first_cookie)))
    assert (status, refused["error"]) == (401, "token_revoked")
    assert await handshake(d, browser(d, cookie_value(second_cookie))) == (101, None)
    d.cli("token", "revoke-all")
    status, refused = await refusal(d, browser(d, cookie_value(second_cookie)))
    assert (status, refused["error"]) == (401, "token_revoked")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "invalid_token"),
        ("wgc_" + "C" * 43, "invalid_token"),
        ("wgk_" + "D" * 43, "invalid_token"),
    ],
)
async def test_login_refusals_are_audited(shared_daemon: Daemon, token: str, reason: str) -> None:
    status, body, cookie = await login(shared_daemon, token)
    assert (status, body["error"], cookie) == (401, reason, None)
    events = [json.loads(line) for line in (shared_daemon.home / "audit.log").read_text().splitlines()]
    assert any(e["event"] == "auth.failed" and e.get("via") == "login" for e in events)


async def test_session_token_is_not_a_login(shared_daemon: Daemon) -> None:
    status, body, cookie = await login(shared_daemon, "wgs_not.a-login")
    assert (status, body["error"], cookie) == (401, "invalid_token", None)


async def test_cookie_attributes_follow_settings(wardgate: DaemonFactory) -> None:
    d = wardgate(
        "security:\n  cookie:\n    secure: true\n    path: /app\n    max_ttl: 600\n    idle_ttl: 60\n"
    )
    status, body, set_cookie = await login(d, d.pairing_token())
    assert status == 200
    assert set_cookie is not None
    assert [p.strip() for p in set_cookie.split(";")][1:] == [
        "Path=/app",
        "Max-Age=600",
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
    ]
    ends = time.mktime(time.strptime(body["endsAt"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    idle = time.mktime(time.strptime(body["expiresAt"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 55 <= ends - idle - 480 <= 65


# --- the close rejection style -------------------------------------------------------------------


async def test_close_style_accepts_then_closes_1008_with_the_reason(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  reject_style: close\n")
    async with aiohttp.ClientSession() as http:
        for headers, protocols, reason in (
            ({}, ("wardgate.v1",), "authentication_required"),
            ({"X-API-Key": "wgk_" + "E" * 43}, (), "invalid_token"),
            ({}, ("wardgate.v1", "wardgate.bearer.wgs_forged.x"), "invalid_token"),
            ({"Origin": "https://evil.example"}, ("chat",), "origin_forbidden"),
        ):
            ws = await http.ws_connect(d.ws, headers=headers, protocols=protocols)
            # The refusal never echoes a credential subprotocol back.
            assert ws.protocol == (protocols[0] if protocols else None)
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (1008, reason)
            await ws.close()
    events = [json.loads(line) for line in (d.home / "audit.log").read_text().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "connection.rejected"] == [
        "authentication_required",
        "invalid_token",
        "invalid_token",
        "origin_forbidden",
    ]


async def test_close_style_keeps_http_for_rate_limits(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  reject_style: close\nlimits:\n  handshakes_per_ip: 2\n", relaxed=False)
    statuses = [(await handshake(d))[0] for _ in range(3)]
    assert statuses == [101, 101, 429]


async def test_a_cookie_socket_ends_at_the_session_maximum(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  cookie:\n    max_ttl: 2\n")
    _, _, set_cookie = await login(d, d.pairing_token())
    assert set_cookie is not None
    rpc = await open_ws(d, browser(d, cookie_value(set_cookie)))
    try:
        await rpc.initialize()
        code, _ = await rpc.closed(timeout=6)
        assert code == 4401
        assert rpc.notifications[-1]["method"] == "auth/expired"
    finally:
        await rpc.close()


async def test_bad_cookies_count_toward_the_lockout(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  auth_failures_per_ip: 3\n  auth_lockout: 60\n", relaxed=False)
    bad = browser(d, "wgc_" + "F" * 43)
    statuses = [(await request(d, "GET", "/api/auth/session", bad))[0] for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
