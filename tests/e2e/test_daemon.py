"""The daemon end to end: real ``wardgate serve`` processes, real WebSocket clients.

Pairing, the two-phase seed 000 flow, the HTTP exchange, refresh rotation and
reuse detection, revocation from the CLI reaching live sockets, restarts, the
initialize deadline and every JSON-RPC error path.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import pytest

from tests.conftest import Daemon, DaemonFactory, remember
from tests.e2e.helpers import Rpc, exchange, handshake, post, refusal
from wardgate import tokens
from wardgate.tokens import TokenClaims, TokenKind


def forge(daemon: Daemon, kind: TokenKind, *, key: bytes | None = None, **over: Any) -> str:
    """A token signed with the daemon's own key (or another), for negative tests."""
    ring = daemon.key_ring()
    now = int(time.time())
    fields: dict[str, Any] = {
        "v": 1,
        "kid": ring.active_kid,
        "typ": kind,
        "sid": ring.server_id,
        "iat": now,
        "exp": now + 300,
        "jti": tokens.new_token_id(),
        "sub": "dev_forged",
        "role": "admin",
    }
    fields.update(over)
    token = tokens.sign(TokenClaims(**fields), key or ring.active_key)
    remember(token)
    return token


# --- before the upgrade --------------------------------------------------------------------------


async def test_health_needs_no_auth_and_says_nothing_more(shared_daemon: Daemon) -> None:
    status, body = await refusal(shared_daemon, path="/health")
    assert (status, body) == (200, {"status": "ok"})


async def test_no_credential_is_refused_before_upgrade(shared_daemon: Daemon) -> None:
    status, body = await refusal(shared_daemon)
    assert status == 401
    assert body["error"] == "authentication_required"
    assert "message" in body


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("garbage", "invalid_token"),
        ("tampered", "invalid_token"),
        ("refresh_as_session", "invalid_token"),
        ("wrong_key", "invalid_token"),
        ("other_server", "invalid_token"),
        ("expired", "token_expired"),
        ("not_bearer", "invalid_token"),
    ],
)
async def test_bad_tokens_are_refused_before_upgrade(shared_daemon: Daemon, case: str, reason: str) -> None:
    d = shared_daemon
    token = {
        "garbage": "wgs_garbage",
        "tampered": forge(d, TokenKind.SESSION)[:-3] + "AAA",
        "refresh_as_session": forge(d, TokenKind.REFRESH),
        "wrong_key": forge(d, TokenKind.SESSION, key=secrets.token_bytes(32)),
        "other_server": forge(d, TokenKind.SESSION, sid="another-server"),
        "expired": forge(d, TokenKind.SESSION, iat=int(time.time()) - 600, exp=int(time.time()) - 300),
        "not_bearer": "x",
    }[case]
    header = f"Basic {token}" if case == "not_bearer" else f"Bearer {token}"
    status, body = await refusal(d, {"Authorization": header})
    assert status == 401
    assert body["error"] == reason
    assert token not in json.dumps(body)


async def test_session_token_for_an_unknown_device_signed_by_us_still_needs_a_live_device(
    shared_daemon: Daemon,
) -> None:
    # A session token can only come from this server; the test forges one with the real key to show
    # that verification alone admits it (so the key file must stay private: mode 0600).
    status, _ = await handshake(
        shared_daemon, {"Authorization": f"Bearer {forge(shared_daemon, TokenKind.SESSION)}"}
    )
    assert status == 101


async def test_query_token_is_refused_unless_enabled(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    status, body = await refusal(shared_daemon, path=f"/ws?token={token}")
    assert status == 401
    assert body["error"] == "authentication_required"
    assert "allow_query_token" in body["hint"]


async def test_query_token_works_when_enabled_and_never_reaches_the_log(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  allow_query_token: true\n")
    token = d.pairing_token()
    status, _ = await handshake(d, path=f"/ws?token={token}", protocols=("wardgate.v1",))
    assert status == 101
    assert token not in d.logs()


async def test_foreign_origin_and_rebinding_host_are_refused(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    auth = {"Authorization": f"Bearer {token}"}
    status, body = await refusal(shared_daemon, {**auth, "Origin": "https://evil.example"})
    assert (status, body["error"]) == (403, "origin_forbidden")
    status, body = await refusal(shared_daemon, {**auth, "Host": "attacker.example:8766"})
    assert (status, body["error"]) == (403, "host_forbidden")
    status, _ = await handshake(shared_daemon, {**auth, "Origin": "http://localhost:3000"})
    assert status == 101


# --- the seed 000 two-phase flow -------------------------------------------------------------------


async def test_pairing_token_on_upgrade_then_initialize_returns_a_session(shared_daemon: Daemon) -> None:
    d = shared_daemon
    pairing = d.pairing_token()
    rpc = await Rpc.open(d, pairing)
    try:
        assert rpc.ws.protocol == "wardgate.v1"
        response = await rpc.initialize(token=pairing, deviceName="phone", deviceId="client-chosen")
        result = response["result"]
        session = result["session"]
        assert session["token"].startswith("wgs_")
        assert session["refreshToken"].startswith("wgr_")
        assert session["autoRefresh"] is True
        assert session["expiresAt"].endswith("Z")
        assert result["serverInfo"]["name"] == "wardgate"
        assert result["clientId"]
        await rpc.notify("initialized")
        status = await rpc.call("status/get")
        assert status["result"]["you"]["deviceId"] == session["deviceId"]
        assert status["result"]["you"]["role"] == "operator"

        refreshed = await rpc.call("auth/refresh", {"sessionToken": session["token"]})
        new_token = refreshed["result"]["sessionToken"]
        remember(new_token)
        assert new_token != session["token"]
        assert (await rpc.call("status/get"))["result"]["server"]["name"] == "wardgate"
    finally:
        await rpc.close()
    # The old session token stopped working; the new one connects.
    status_code, body = await refusal(d, {"Authorization": f"Bearer {session['token']}"})
    assert (status_code, body["error"]) == (401, "token_revoked")
    assert (await handshake(d, {"Authorization": f"Bearer {new_token}"}, protocols=("wardgate.v1",)))[
        0
    ] == 101
    # The pairing token was consumed by initialize.
    status_code, body = await refusal(d, {"Authorization": f"Bearer {pairing}"})
    assert (status_code, body["error"]) == (401, "invalid_token")


async def test_refreshing_in_band_never_closes_the_connection_it_refreshes(shared_daemon: Daemon) -> None:
    # Each refresh revokes the previous session token, which wakes every instance's revocation
    # scan (pub/sub on Redis). The connection must already hold the new session by then.
    d = shared_daemon
    pairing = d.pairing_token()
    rpc = await Rpc.open(d, pairing)
    try:
        token = (await rpc.initialize(token=pairing))["result"]["session"]["token"]
        remember(token)
        for _ in range(20):
            token = (await rpc.call("auth/refresh", {"sessionToken": token}))["result"]["sessionToken"]
            remember(token)
        await asyncio.sleep(0.3)  # past a revocation scan woken by the last refresh
        assert (await rpc.call("status/get"))["result"]["server"]["name"] == "wardgate"
        assert not rpc.ws.closed
    finally:
        await rpc.close()


async def test_initialize_with_a_different_token_than_the_upgrade_is_refused(shared_daemon: Daemon) -> None:
    rpc = await Rpc.open(shared_daemon, shared_daemon.pairing_token())
    try:
        response = await rpc.initialize(token=shared_daemon.pairing_token())
        assert response["error"]["code"] == -32001
        code, _ = await rpc.closed()
        assert code == 4401
    finally:
        await rpc.close()


async def test_session_token_connects_directly(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    rpc = await Rpc.open(
        shared_daemon, None, protocols=("wardgate.v1", f"wardgate.bearer.{creds['sessionToken']}")
    )
    try:
        assert rpc.ws.protocol == "wardgate.v1"  # never the bearer entry
        result = (await rpc.initialize())["result"]
        assert result["session"]["deviceId"] == creds["deviceId"]
        assert "token" not in result["session"]
        assert "result" in await rpc.call("status/get")
    finally:
        await rpc.close()


# --- the HTTP exchange and refresh ----------------------------------------------------------------------


async def test_http_exchange_refresh_and_reuse_detection_closes_live_socket(shared_daemon: Daemon) -> None:
    d = shared_daemon
    creds = await exchange(d, d.pairing_token(), name="laptop")
    assert set(creds) >= {"sessionToken", "expiresAt", "refreshToken", "refreshExpiresAt", "deviceId"}
    status, rotated = await post(d, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert status == 200
    remember(rotated["sessionToken"], rotated["refreshToken"])
    assert rotated["refreshToken"] != creds["refreshToken"]
    assert rotated["deviceId"] == creds["deviceId"]

    rpc = await Rpc.open(d, rotated["sessionToken"])
    try:
        await rpc.initialize()
        # The already-used refresh token comes back: a stolen copy. The device is revoked...
        status, body = await post(d, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
        assert (status, body["error"]) == (401, "token_revoked")
        # ...its live socket is told and closed with 4401...
        code, _ = await rpc.closed()
        assert code == 4401
        assert rpc.notifications[-1]["method"] == "auth/revoked"
    finally:
        await rpc.close()
    # ...and even the legitimate latest refresh token is dead.
    status, body = await post(d, "/api/auth/refresh", {"refreshToken": rotated["refreshToken"]})
    assert (status, body["error"]) == (401, "token_revoked")


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/api/auth/exchange", {"token": "wgp_nope"}, "invalid_token"),
        ("/api/auth/exchange", {"tokn": "x"}, "invalid_request"),
        ("/api/auth/exchange", [1, 2], "invalid_request"),
        ("/api/auth/refresh", {"refreshToken": "wgr_nope"}, "invalid_token"),
    ],
)
async def test_http_auth_errors(shared_daemon: Daemon, path: str, body: Any, reason: str) -> None:
    status, answer = await post(shared_daemon, path, body)
    assert status in (400, 401)
    assert answer["error"] == reason


async def test_session_token_presented_as_refresh_is_refused(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    status, body = await post(shared_daemon, "/api/auth/refresh", {"refreshToken": creds["sessionToken"]})
    assert (status, body["error"]) == (401, "invalid_token")
    status, body = await post(shared_daemon, "/api/auth/exchange", {"token": creds["refreshToken"]})
    assert (status, body["error"]) == (401, "invalid_token")


async def test_http_revoke_logs_the_device_out(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    status, body = await post(
        shared_daemon, "/api/auth/revoke", {}, {"Authorization": f"Bearer {creds['sessionToken']}"}
    )
    assert (status, body) == (200, {"revoked": True})
    status, body = await refusal(shared_daemon, {"Authorization": f"Bearer {creds['sessionToken']}"})
    assert (status, body["error"]) == (401, "token_revoked")
    status, body = await post(shared_daemon, "/api/auth/revoke", {})
    assert (status, body["error"]) == (401, "authentication_required")


# --- single use ----------------------------------------------------------------------------------------


async def test_pairing_token_used_twice_fails_the_second_time(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    await exchange(shared_daemon, token)
    status, body = await post(shared_daemon, "/api/auth/exchange", {"token": token})
    assert (status, body["error"]) == (401, "invalid_token")


async def test_concurrent_http_redemptions_have_exactly_one_winner(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    results = await asyncio.gather(
        *(post(shared_daemon, "/api/auth/exchange", {"token": token}) for _ in range(12))
    )
    for _, body in results:
        remember(body.get("sessionToken"), body.get("refreshToken"))
    assert sorted(status for status, _ in results) == [200] + [401] * 11


async def test_concurrent_initialize_redemptions_have_exactly_one_winner(shared_daemon: Daemon) -> None:
    token = shared_daemon.pairing_token()
    clients = [await Rpc.open(shared_daemon, token) for _ in range(5)]
    try:
        responses = await asyncio.gather(*(c.initialize() for c in clients))
        winners = [r for r in responses if "result" in r]
        losers = [r for r in responses if "error" in r]
        assert len(winners) == 1
        assert {r["error"]["code"] for r in losers} == {-32001}
    finally:
        for c in clients:
            await c.close()


async def test_pair_refresh_invalidates_outstanding_codes(shared_daemon: Daemon) -> None:
    old = shared_daemon.pairing_token()
    new = shared_daemon.pair_payload("operator", "--refresh")["token"]
    status, body = await post(shared_daemon, "/api/auth/exchange", {"token": old})
    assert (status, body["error"]) == (401, "invalid_token")
    await exchange(shared_daemon, new)


# --- revocation and expiry reach live sockets --------------------------------------------------------


async def test_cli_device_revocation_closes_live_socket_within_a_second(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    rpc = await Rpc.open(shared_daemon, creds["sessionToken"])
    try:
        await rpc.initialize()
        shared_daemon.cli("devices", "revoke", creds["deviceId"])
        started = time.monotonic()  # the CLI's own start-up does not count
        code, reason = await rpc.closed(timeout=5)
        # The daemon notices within its poll interval (or at once through Redis pub/sub).
        assert code == 4401
        assert reason == "session revoked"
        assert time.monotonic() - started < 1.0
        assert rpc.notifications[-1] == {
            "jsonrpc": "2.0",
            "method": "auth/revoked",
            "params": {"reason": "session_revoked"},
        }
    finally:
        await rpc.close()
    listed = json.loads(shared_daemon.cli("devices", "list", "--json").stdout)
    assert next(d for d in listed if d["id"] == creds["deviceId"])["revoked"] is True


async def test_cli_token_revoke_all_closes_every_socket(wardgate: DaemonFactory) -> None:
    d = wardgate()
    sockets = []
    for _ in range(3):
        creds = await exchange(d, d.pairing_token())
        rpc = await Rpc.open(d, creds["sessionToken"])
        await rpc.initialize()
        sockets.append(rpc)
    listed = json.loads(d.cli("token", "list", "--json").stdout)
    assert len(listed) == 3
    assert "Revoked 3 token" in d.cli("token", "revoke-all").stdout
    try:
        codes = await asyncio.gather(*(s.closed() for s in sockets))
        assert [c for c, _ in codes] == [4401, 4401, 4401]
    finally:
        for s in sockets:
            await s.close()


async def test_session_expiry_closes_with_auth_expired(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  token:\n    session_expiry: 4\n")
    creds = await exchange(d, d.pairing_token())
    rpc = await Rpc.open(d, creds["sessionToken"])
    try:
        await rpc.initialize()
        code, reason = await rpc.closed(timeout=8)
        assert (code, reason) == (4401, "session expired")
        assert rpc.notifications[-1]["method"] == "auth/expired"
    finally:
        await rpc.close()


async def test_ws_auth_revoke_logs_out(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    rpc = await Rpc.open(shared_daemon, creds["sessionToken"])
    try:
        await rpc.initialize()
        assert (await rpc.call("auth/revoke"))["result"] == {"revoked": True}
        code, _ = await rpc.closed()
        assert code == 1000
    finally:
        await rpc.close()
    status, body = await post(shared_daemon, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert (status, body["error"]) == (401, "token_revoked")


async def test_ws_auth_revoke_answers_before_the_revocation_scan_can_close_it(shared_daemon: Daemon) -> None:
    # The device's revocation wakes every instance's revocation scan (pub/sub on Redis), which
    # must leave the connection that asked alone: it gets its answer, then closes with 1000.
    for _ in range(10):
        creds = await exchange(shared_daemon, shared_daemon.pairing_token())
        rpc = await Rpc.open(shared_daemon, creds["sessionToken"])
        try:
            await rpc.initialize()
            assert (await rpc.call("auth/revoke"))["result"] == {"revoked": True}
            assert (await rpc.closed())[0] == 1000
        finally:
            await rpc.close()


async def test_restart_keeps_devices_and_keys(wardgate: DaemonFactory) -> None:
    d = wardgate()
    creds = await exchange(d, d.pairing_token(), name="survivor")
    d.restart()
    rpc = await Rpc.open(d, creds["sessionToken"])
    try:
        assert (await rpc.initialize())["result"]["session"]["deviceId"] == creds["deviceId"]
    finally:
        await rpc.close()
    names = [x["name"] for x in json.loads(d.cli("devices", "list", "--json").stdout)]
    assert names == ["survivor"]
    status, body = await post(d, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert status == 200
    remember(body["sessionToken"], body["refreshToken"])


# --- lifecycle ------------------------------------------------------------------------------------------


async def test_initialize_deadline_closes_4408(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  init_timeout: 0.5\n")
    rpc = await Rpc.open(d, d.pairing_token())
    try:
        code, reason = await rpc.closed(timeout=5)
        assert (code, reason) == (4408, "initialize timeout")
    finally:
        await rpc.close()


async def test_method_before_initialize_is_refused(shared_daemon: Daemon) -> None:
    rpc = await Rpc.open(shared_daemon, shared_daemon.pairing_token())
    try:
        response = await rpc.call("status/get")
        assert response["error"]["code"] == -32600
        assert response["error"]["data"]["reason"] == "not_initialized"
        assert (await rpc.call("auth/refresh", {"sessionToken": "x"}))["error"]["data"][
            "reason"
        ] == "not_initialized"
        assert "result" in await rpc.initialize()
        second = await rpc.initialize()
        assert second["error"]["data"]["reason"] == "already_initialized"
    finally:
        await rpc.close()


async def test_shutdown_closes_normally(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    rpc = await Rpc.open(shared_daemon, creds["sessionToken"])
    try:
        await rpc.initialize()
        assert (await rpc.call("shutdown"))["result"] is None
        code, _ = await rpc.closed()
        assert code == 1000
    finally:
        await rpc.close()


# --- JSON-RPC 2.0 in full ----------------------------------------------------------------------------


@pytest.fixture
async def ready(shared_daemon: Daemon) -> Any:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    rpc = await Rpc.open(shared_daemon, creds["sessionToken"])
    await rpc.initialize()
    yield rpc
    await rpc.close()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{not json", {"jsonrpc": "2.0", "error": {"code": -32700}, "id": None}),
        ('{"jsonrpc": "2.0", "method": 1, "params": "bar"}', {"error": {"code": -32600}, "id": None}),
        ('{"jsonrpc": "1.0", "method": "status/get", "id": 1}', {"error": {"code": -32600}}),
        ('{"jsonrpc": "2.0", "method": "nope/nope", "id": "a"}', {"error": {"code": -32601}, "id": "a"}),
        ('{"jsonrpc": "2.0", "method": "rpc.discover", "id": 2}', {"error": {"code": -32601}, "id": 2}),
        (
            '{"jsonrpc": "2.0", "method": "status/get", "params": {"x": 1}, "id": 3}',
            {"error": {"code": -32602}, "id": 3},
        ),
        (
            '{"jsonrpc": "2.0", "method": "status/get", "params": [1, 2], "id": 4}',
            {"error": {"code": -32602}, "id": 4},
        ),
        ('{"jsonrpc": "2.0", "method": "status/get", "id": true}', {"error": {"code": -32600}, "id": None}),
        ("[]", {"error": {"code": -32600}, "id": None}),
        ('"just a string"', {"error": {"code": -32600}}),
    ],
)
async def test_jsonrpc_error_paths(ready: Rpc, raw: str, expected: dict[str, Any]) -> None:
    await ready.send_raw(raw)
    response = await ready.reply()
    assert response["jsonrpc"] == "2.0"
    assert response["error"]["code"] == expected["error"]["code"]
    if "id" in expected:
        assert response["id"] == expected["id"]
    assert "Traceback" not in json.dumps(response)


@pytest.mark.parametrize("request_id", ["abc", "", "ünïcødé", 0, -7, 2**53, 1.5, None])
async def test_every_legal_id_type_is_echoed(ready: Rpc, request_id: Any) -> None:
    await ready.send_raw(json.dumps({"jsonrpc": "2.0", "method": "status/get", "id": request_id}))
    response = await ready.reply()
    assert response["id"] == request_id
    assert "result" in response


async def test_batches_and_notifications(ready: Rpc) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "status/get", "id": 1},
        {"jsonrpc": "2.0", "method": "status/get"},
        {"jsonrpc": "2.0", "method": "nope", "id": 2},
        1,
        {"jsonrpc": "2.0", "method": "nope"},
    ]
    await ready.send_raw(json.dumps(batch))
    responses = await ready.reply()
    assert isinstance(responses, list)
    by_id = {json.dumps(r["id"]): r for r in responses}
    assert len(responses) == 3
    assert "result" in by_id["1"]
    assert by_id["2"]["error"]["code"] == -32601
    assert by_id["null"]["error"]["code"] == -32600
    # A batch of notifications only is answered with nothing at all.
    await ready.send_raw(json.dumps([{"jsonrpc": "2.0", "method": "status/get"}] * 3))
    await ready.send_raw(json.dumps({"jsonrpc": "2.0", "method": "status/get", "id": "after"}))
    assert (await ready.reply())["id"] == "after"


async def test_openrpc_discovery_lists_methods(shared_daemon: Daemon) -> None:
    status, body = await refusal(shared_daemon, path="/api/rpc/discover")
    assert status == 200
    names = {m["name"] for m in body["methods"]}
    assert "status/get" in names
    assert body["openrpc"].startswith("1.")
