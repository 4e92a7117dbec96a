"""The gate over real sockets: every refusal and every disconnect path.

Test clients all come from 127.0.0.1; where a test needs several client
addresses, the daemon trusts 127.0.0.1 as a proxy and the client states its
address in X-Forwarded-For, exactly as a reverse proxy would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, DaemonFactory
from tests.e2e.helpers import RawWebSocket, Rpc, exchange, handshake, refusal

BEHIND_PROXY = "security:\n  trusted_proxies: [127.0.0.1/32]\n"


def xff(address: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": address}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# --- addresses ------------------------------------------------------------------------------------------


async def test_denied_address_is_refused_everywhere(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  ip_deny: [127.0.0.0/8]\n")
    status, body = await refusal(d, {"Authorization": f"Bearer {d.pairing_token()}"})
    assert (status, body["error"]) == (403, "ip_forbidden")
    status, body = await refusal(d, path="/health")
    assert (status, body["error"]) == (403, "ip_forbidden")


async def test_forwarded_address_is_believed_only_from_trusted_proxies(wardgate: DaemonFactory) -> None:
    allow = "  ip_allow: [203.0.113.0/24]\n"
    trusted = wardgate(BEHIND_PROXY + allow)
    status, body = await refusal(trusted, xff("203.0.113.5"))
    assert (status, body["error"]) == (401, "authentication_required")  # past the address check
    status, body = await refusal(trusted, xff("198.51.100.1"))
    assert (status, body["error"]) == (403, "ip_forbidden")
    # A client-added entry left of the proxy's is not believed: the rightmost untrusted one counts.
    status, body = await refusal(trusted, xff("203.0.113.9, 198.51.100.1"))
    assert (status, body["error"]) == (403, "ip_forbidden")

    untrusted = wardgate("security:\n" + allow)
    status, body = await refusal(untrusted, xff("203.0.113.5"))
    assert (status, body["error"]) == (403, "ip_forbidden")  # the header is ignored: the peer is 127.0.0.1


async def _status(daemon: Daemon, headers: list[tuple[str, str]]) -> tuple[int, Any]:
    """A refusal for an upgrade whose headers may repeat (several X-Forwarded-For lines)."""
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    async with aiohttp.ClientSession() as http, http.get(daemon.ws, headers=upgrade + headers) as response:
        return response.status, await response.json(content_type=None)


async def test_every_forwarded_for_line_counts(wardgate: DaemonFactory) -> None:
    """HAProxy's option forwardfor appends its own line after the client's: the client's forged
    first line must not decide who the client is."""
    d = wardgate(BEHIND_PROXY + "  ip_deny: [198.51.100.0/24]\n")
    status, body = await _status(d, [("X-Forwarded-For", "203.0.113.5"), ("X-Forwarded-For", "198.51.100.7")])
    assert (status, body["error"]) == (403, "ip_forbidden")
    status, body = await _status(d, [("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "203.0.113.5")])
    assert (status, body["error"]) == (401, "authentication_required")
    events = [json.loads(line) for line in (d.home / "audit.log").read_text().splitlines()]
    rejected = [e for e in events if e["event"] == "connection.rejected"]
    # Refusals are logged with the client's address, not the proxy's.
    assert [e["ip"] for e in rejected] == ["198.51.100.7", "203.0.113.5"]


@pytest.mark.parametrize(
    ("trusted", "proto", "expected"), [(True, "https", 401), (True, None, 403), (False, "https", 403)]
)
async def test_forwarded_proto_from_a_trusted_proxy_makes_our_own_page_same_origin(
    wardgate: DaemonFactory, trusted: bool, proto: str | None, expected: int
) -> None:
    config = (BEHIND_PROXY if trusted else "security:\n") + "  origins:\n    allowed: [https://app.example]\n"
    d = wardgate(config)
    headers = [("Origin", f"https://127.0.0.1:{d.port}")]
    if proto:
        headers.append(("X-Forwarded-Proto", proto))
    status, _ = await _status(d, headers)
    assert status == expected


# --- rate limits ------------------------------------------------------------------------------------------


async def test_upgrade_attempts_per_address_are_limited_with_retry_after(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  handshakes_per_ip: 5\n  handshake_window: 60\n", relaxed=False)
    for _ in range(5):
        status, _ = await refusal(d)
        assert status == 401
    async with aiohttp.ClientSession() as http, http.get(d.ws) as response:
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"] == "rate_limited"


async def test_failed_authentications_lock_out_the_address_not_others(wardgate: DaemonFactory) -> None:
    d = wardgate(
        BEHIND_PROXY
        + "limits:\n  auth_failures_per_ip: 3\n  auth_lockout: 30\n  handshakes_per_ip: 100000\n",
        relaxed=False,
    )
    attacker, user = "198.51.100.66", "203.0.113.7"
    creds = await exchange(d, d.pairing_token())  # exchange from 127.0.0.1, not the attacker's address

    async def hammer() -> list[int]:
        codes = []
        for i in range(40):
            status, _ = await refusal(d, xff(attacker, f"wgs_forged{i}.{'A' * 43}"))
            codes.append(status)
        return codes

    async def use() -> list[int]:
        codes = []
        for _ in range(20):
            status, _ = await handshake(d, xff(user, creds["sessionToken"]), protocols=("wardgate.v1",))
            codes.append(status)
        return codes

    attack, served = await asyncio.gather(hammer(), use())
    assert attack[:3] == [401, 401, 401]
    assert set(attack[3:]) == {429}
    assert served == [101] * 20
    # Once locked out, even a valid token from the attacker's address waits.
    status, body = await refusal(d, xff(attacker, creds["sessionToken"]))
    assert (status, body["error"]) == (429, "rate_limited")


async def test_messages_are_limited_per_principal_across_connections(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  messages_per_principal: 20\n  message_window: 86400\n")
    creds = await exchange(d, d.pairing_token())
    a = await Rpc.open(d, creds["sessionToken"])
    b = await Rpc.open(d, creds["sessionToken"])
    try:
        await a.initialize()
        await b.initialize()
        results = []
        for i in range(24):
            rpc = a if i % 2 else b
            results.append(await rpc.call("status/get"))
        limited = [r for r in results if r.get("error", {}).get("data", {}).get("reason") == "rate_limited"]
        # 20 per principal in total (initialize counted too), not 20 per connection.
        assert len(limited) >= 4
        assert all(r["error"]["data"]["retryAfter"] > 0 for r in limited)
        # A client that keeps sending regardless is closed with 4429.
        for _ in range(60):
            await a.send_raw(json.dumps({"jsonrpc": "2.0", "method": "status/get"}))
        code, reason = await a.closed()
        assert (code, reason) == (4429, "rate limited")
    finally:
        await a.close()
        await b.close()


# --- connection caps ---------------------------------------------------------------------------------------


async def test_connection_caps_per_principal_per_address_and_global(wardgate: DaemonFactory) -> None:
    d = wardgate(
        BEHIND_PROXY
        + "limits:\n  max_connections_per_principal: 2\n  max_connections_per_ip: 3\n  max_connections: 4\n",
        relaxed=False,
    )
    one = await exchange(d, d.pairing_token())
    opened = [await Rpc.open(d, one["sessionToken"]) for _ in range(2)]
    try:
        status, body = await refusal(d, {"Authorization": f"Bearer {one['sessionToken']}"})
        assert (status, body["error"]) == (503, "too_many_connections")
        await opened.pop().close()
        await asyncio.sleep(0.2)
        opened.append(await Rpc.open(d, one["sessionToken"]))  # the slot came back

        two = await exchange(d, d.pairing_token())
        opened.append(await Rpc.open(d, two["sessionToken"]))  # 3 from 127.0.0.1
        status, body = await refusal(d, {"Authorization": f"Bearer {two['sessionToken']}"})
        assert (status, body["error"]) == (503, "too_many_connections")  # per address

        three = await exchange(d, d.pairing_token())
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(d.ws, headers=xff("203.0.113.1", three["sessionToken"]))
        status, body = await refusal(d, xff("203.0.113.2", three["sessionToken"]))
        assert (status, body["error"]) == (503, "too_many_connections")  # global: 4 open
        await ws.close()
        await http.close()
    finally:
        for rpc in opened:
            await rpc.close()


# --- message limits and disconnect paths ----------------------------------------------------------------


async def test_oversized_message_closes_1009_before_parsing(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  max_message_bytes: 1024\n")
    creds = await exchange(d, d.pairing_token())
    rpc = await Rpc.open(d, creds["sessionToken"])
    try:
        await rpc.send_raw("[" * 5000)  # would be a parse error; the size check comes first
        code, _ = await rpc.closed()
        assert code == 1009
    finally:
        await rpc.close()


async def test_compression_is_off_by_default(shared_daemon: Daemon) -> None:
    creds = await exchange(shared_daemon, shared_daemon.pairing_token())
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            shared_daemon.ws, headers={"Authorization": f"Bearer {creds['sessionToken']}"}, compress=15
        ) as ws,
    ):
        assert ws.compress == 0


async def test_compressed_message_is_capped_after_decompression(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  compression: true\n  max_message_bytes: 4096\n")
    creds = await exchange(d, d.pairing_token())
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            d.ws, headers={"Authorization": f"Bearer {creds['sessionToken']}"}, compress=15
        ) as ws,
    ):
        assert ws.compress == 15  # negotiated
        small = json.dumps({"jsonrpc": "2.0", "method": "initialize", "params": {}, "id": 1})
        await ws.send_str(small)
        assert "result" in json.loads((await ws.receive(timeout=5)).data)
        # 1 MB of spaces compresses to about 1 KB on the wire: a decompression bomb in miniature.
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "method": "status/get", "id": 2}) + " " * 1_000_000)
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 1009


async def test_slow_consumer_is_disconnected_and_memory_stays_bounded(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  send_queue_messages: 8\n  messages_per_principal: 100000\n")
    creds = await exchange(d, d.pairing_token())

    def stall() -> int | None:
        peer = RawWebSocket.connect(d.port, creds["sessionToken"])
        try:
            peer.send_text(json.dumps({"jsonrpc": "2.0", "method": "initialize", "params": {}, "id": 0}))
            # Cheap to answer, large to send back: unknown methods whose long ids are echoed.
            batch = json.dumps(
                [{"jsonrpc": "2.0", "method": "no/such", "id": f"{i:04}" + "x" * 500} for i in range(100)]
            )
            # Keep asking, never read: replies fill the socket buffers, then the bounded queue.
            try:
                for _ in range(400):
                    peer.send_text(batch)
            except OSError:
                pass  # the server already hung up on us
            time.sleep(4)  # still not reading: the server's queue overflows meanwhile
            return peer.drain_until_close()
        finally:
            peer.close()

    code = await asyncio.to_thread(stall)
    assert code in (1008, None)  # the close frame may sit behind replies we never read
    metrics = await _metrics(d)
    assert 'wardgate_disconnects_total{reason="slow_consumer"} 1.0' in metrics
    assert "send queue full" in d.logs()


async def test_dead_peer_is_dropped_by_heartbeat(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  heartbeat: 0.5\n")
    creds = await exchange(d, d.pairing_token())
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            d.ws, headers={"Authorization": f"Bearer {creds['sessionToken']}"}, autoping=False
        )
        started = time.monotonic()
        while not ws.closed and time.monotonic() - started < 10:
            message = await ws.receive(timeout=10)  # pings arrive; we never answer them
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
        assert time.monotonic() - started < 5
        await ws.close()


async def test_idle_connection_is_closed(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  idle_timeout: 1\n")
    creds = await exchange(d, d.pairing_token())
    rpc = await Rpc.open(d, creds["sessionToken"])
    try:
        await rpc.initialize()
        code, reason = await rpc.closed(timeout=6)
        assert (code, reason) == (1001, "idle timeout")
    finally:
        await rpc.close()


async def test_slow_request_head_is_cut_off(wardgate: DaemonFactory) -> None:
    d = wardgate("limits:\n  handshake_timeout: 1\n")

    def slowloris() -> bytes:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            started = time.monotonic()
            data = sock.recv(100)  # b"" once the server closes
            assert time.monotonic() - started < 5
            return data

    assert await asyncio.to_thread(slowloris) == b""


# --- explainable refusals ------------------------------------------------------------------------------


async def _metrics(d: Daemon) -> str:
    async with aiohttp.ClientSession() as http, http.get(d.http + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_refusals_are_counted_and_logged_with_the_address(shared_daemon: Daemon) -> None:
    await refusal(shared_daemon, {"Origin": "https://evil.example"})
    await refusal(shared_daemon, {"Host": "rebind.example"})
    text = await _metrics(shared_daemon)
    assert 'wardgate_handshakes_total{outcome="rejected",reason="origin_forbidden"}' in text
    assert 'wardgate_handshakes_total{outcome="rejected",reason="host_forbidden"}' in text
    assert "refused GET /ws: origin_forbidden ip=127.0.0.1" in shared_daemon.logs()


async def test_metrics_refuse_a_rebinding_host_even_from_loopback(shared_daemon: Daemon) -> None:
    status, body = await refusal(shared_daemon, {"Host": "attacker.example"}, path="/metrics")
    assert (status, body["error"]) == (403, "host_forbidden")


async def test_metrics_need_loopback_or_admin(wardgate: DaemonFactory) -> None:
    d = wardgate(BEHIND_PROXY)
    status, body = await refusal(d, xff("203.0.113.9"), path="/metrics")
    assert (status, body["error"]) == (401, "authentication_required")
    operator = await exchange(d, d.pairing_token("operator"))
    status, body = await refusal(d, xff("203.0.113.9", operator["sessionToken"]), path="/metrics")
    assert (status, body["error"]) == (403, "permission_denied")
    # An admin pairing code is no credential until traded for a session (it is single use).
    status, body = await refusal(d, xff("203.0.113.9", d.pairing_token("admin")), path="/metrics")
    assert (status, body["error"]) == (401, "invalid_token")
    admin = await exchange(d, d.pairing_token("admin"))
    async with (
        aiohttp.ClientSession() as http,
        http.get(d.http + "/metrics", headers=xff("203.0.113.9", admin["sessionToken"])) as response,
    ):
        assert response.status == 200
        assert "wardgate_connections_open" in await response.text()


@pytest.mark.parametrize(
    ("args", "reason", "decided_by"),
    [
        (["--origin", "https://evil.example"], "origin_forbidden", "origin"),
        (["--host", "rebind.example"], "host_forbidden", "host"),
        (["--ip", "10.1.2.3", "--forwarded-for", "203.0.113.5"], "ip_forbidden", "ip allowlist"),
        (["--origin", "http://localhost:5173"], "authentication_required", "authentication"),
        (["--token", "wgs_garbage"], "invalid_token", "authentication"),
        (["--cookie", "--token", "wgs_whatever"], "origin_forbidden", "origin"),
    ],
)
def test_doctor_explains_which_check_decides(
    wardgate: DaemonFactory, args: list[str], reason: str, decided_by: str
) -> None:
    d = wardgate("security:\n  ip_allow: [127.0.0.0/8]\n", start=False)
    result = d.cli("doctor", "--json", *args, check=False)
    assert result.returncode == 1
    verdict: dict[str, Any] = json.loads(result.stdout)
    assert verdict["allowed"] is False
    assert verdict["reason"] == reason
    assert [c["check"] for c in verdict["checks"] if not c["allowed"]] == [decided_by]
    assert "wgs_" not in result.stdout


def test_doctor_allows_a_valid_request(wardgate: DaemonFactory) -> None:
    d = wardgate(start=False)
    token = d.pairing_token()
    result = d.cli("doctor", "--json", "--origin", "http://localhost:3000", "--token", token)
    verdict = json.loads(result.stdout)
    assert verdict["allowed"] is True
    assert verdict["checks"][-1]["detail"] == "valid pairing token, role operator"
    assert token not in result.stdout
