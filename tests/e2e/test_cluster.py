"""Several wardgate processes on one Redis behave as one gateway (issue 7).

Three real ``wardgate serve`` processes share a key prefix on a real Redis server; the tests
drive them with real clients: single-use pairing across instances, revocation fan-out to every
instance's live sockets, limits and caps that hold for the sum, leases that free themselves when
an instance dies, and a Redis outage with the server stopped and restarted.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, DaemonFactory, remember
from tests.e2e.helpers import Rpc, handshake, post, refusal
from tests.redis_server import RedisServer, delete_prefix


def cluster(
    wardgate: DaemonFactory, url: str, n: int = 3, config: str = "", env: dict[str, str] | None = None
) -> list[Daemon]:
    """``n`` daemons on one Redis prefix: one gateway."""
    prefix = f"wgtest:{uuid.uuid4().hex[:12]}:"
    wardgate.prefixes.append(prefix)
    wardgate.redis_url = wardgate.redis_url or url
    shared = {
        "WARDGATE_STORE_BACKEND": "redis",
        "WARDGATE_STORE_URL": url,
        "WARDGATE_STORE_PREFIX": prefix,
        **(env or {}),
    }
    return [wardgate(config, env=shared) for _ in range(n)]


async def health(daemon: Daemon) -> int:
    async with aiohttp.ClientSession() as http, http.get(daemon.http + "/health") as response:
        return response.status


async def exchange_on(daemon: Daemon, token: str) -> tuple[int, Any]:
    return await post(daemon, "/api/auth/exchange", {"token": token, "deviceName": "phone"})


async def session(daemon: Daemon) -> dict[str, Any]:
    status, body = await exchange_on(daemon, daemon.pairing_token())
    assert status == 200, body
    remember(body["sessionToken"], body["refreshToken"])
    return dict(body)


async def test_a_pairing_token_is_redeemed_once_across_instances(
    wardgate: DaemonFactory, redis_url: str
) -> None:
    nodes = cluster(wardgate, redis_url)
    for _ in range(3):
        token = nodes[0].pairing_token()
        results = await asyncio.gather(*(exchange_on(node, token) for node in nodes for _ in range(4)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] + [401] * 11
        for status, body in results:
            if status == 200:
                remember(body["sessionToken"], body["refreshToken"])
    devices = json.loads(nodes[2].cli("devices", "list", "--json").stdout)
    assert len(devices) == 3


async def test_revocation_through_one_instance_closes_sockets_on_the_others(
    wardgate: DaemonFactory, redis_url: str
) -> None:
    nodes = cluster(wardgate, redis_url)
    creds = await session(nodes[0])
    sockets = [await Rpc.open(node, creds["sessionToken"]) for node in nodes[1:]]
    bystander_creds = await session(nodes[1])
    bystander = await Rpc.open(nodes[2], bystander_creds["sessionToken"])
    try:
        for rpc in (*sockets, bystander):
            await rpc.initialize()
        status, body = await post(
            nodes[0], "/api/auth/revoke", {}, {"Authorization": f"Bearer {creds['sessionToken']}"}
        )
        started = time.monotonic()  # the revocation is in the store once the answer is out
        assert (status, body) == (200, {"revoked": True})
        closed = await asyncio.gather(*(rpc.closed(timeout=3) for rpc in sockets))
        elapsed = time.monotonic() - started
        assert [code for code, _ in closed] == [4401, 4401]
        assert elapsed < 1.0, elapsed
        assert (await bystander.call("status/get"))["result"]
        # And no instance lets the revoked session back in.
        for node in nodes:
            status, body = await refusal(node, {"Authorization": f"Bearer {creds['sessionToken']}"})
            assert (status, body["error"]) == (401, "token_revoked")
    finally:
        for rpc in (*sockets, bystander):
            await rpc.close()


async def test_cli_revocation_reaches_every_instance(wardgate: DaemonFactory, redis_url: str) -> None:
    nodes = cluster(wardgate, redis_url)
    key = json.loads(nodes[1].cli("keys", "create", "--name", "ci", "--json").stdout)
    remember(key["key"])
    sockets = []
    for node in nodes:
        http = aiohttp.ClientSession()
        sockets.append(Rpc(http, await http.ws_connect(node.ws, headers={"X-API-Key": key["key"]})))
    try:
        for rpc in sockets:
            await rpc.initialize()
        nodes[2].cli("keys", "revoke", key["id"])
        closed = await asyncio.gather(*(rpc.closed(timeout=3) for rpc in sockets))
        assert [code for code, _ in closed] == [4401, 4401, 4401]
    finally:
        for rpc in sockets:
            await rpc.close()


async def test_the_message_rate_holds_for_the_sum_of_instances(
    wardgate: DaemonFactory, redis_url: str
) -> None:
    nodes = cluster(
        wardgate, redis_url, config="limits:\n  messages_per_principal: 30\n  message_window: 86400\n"
    )
    creds = await session(nodes[0])
    sockets = [await Rpc.open(node, creds["sessionToken"]) for node in nodes]
    try:
        answers = []
        for rpc in sockets:
            answers.append(await rpc.initialize())
        for _ in range(9):
            for rpc in sockets:
                answers.append(await rpc.call("status/get"))
        limited = [a for a in answers if a.get("error", {}).get("data", {}).get("reason") == "rate_limited"]
        # 3 initialize + 27 calls fit in 30; each instance alone would have allowed all 30.
        assert len(answers) == 30
        assert limited == []
        extra = [await rpc.call("status/get") for rpc in sockets]
        assert all(a["error"]["data"]["reason"] == "rate_limited" for a in extra)
    finally:
        for rpc in sockets:
            await rpc.close()


async def test_a_connection_cap_holds_across_instances_and_recovers_when_one_dies(
    wardgate: DaemonFactory, redis_url: str
) -> None:
    nodes = cluster(
        wardgate,
        redis_url,
        config="limits:\n  max_connections_per_principal: 3\nstore:\n  lease_ttl: 3\n",
    )
    creds = await session(nodes[0])
    bearer = {"Authorization": f"Bearer {creds['sessionToken']}"}
    sockets = [await Rpc.open(node, creds["sessionToken"]) for node in nodes]
    try:
        for node in nodes:
            status, body = await refusal(node, bearer)
            assert (status, body["error"]) == (503, "too_many_connections")
        # The instance holding one of them dies without a word: its lease expires by itself.
        proc = nodes[2].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                extra = await Rpc.open(nodes[1], creds["sessionToken"])
                break
            except aiohttp.WSServerHandshakeError as exc:
                refused_with = exc.status
            assert refused_with == 503, refused_with
            assert time.monotonic() < deadline, "the dead instance's slot never freed"
            await asyncio.sleep(0.25)
        # The two live ones still count: one more fitted, not two.
        try:
            status, body = await refusal(nodes[0], bearer)
            assert (status, body["error"]) == (503, "too_many_connections")
        finally:
            await extra.close()
    finally:
        for rpc in sockets[:2]:
            await rpc.close()
        await sockets[2].http.close()


async def test_redis_outage_fails_closed_and_recovers(
    wardgate: DaemonFactory, private_redis_factory: Callable[..., RedisServer]
) -> None:
    server = private_redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    nodes = cluster(wardgate, server.url, n=2)
    alive = await session(nodes[0])
    revoked = await session(nodes[1])
    nodes[0].cli("devices", "revoke", revoked["deviceId"])
    rpc = await Rpc.open(nodes[1], alive["sessionToken"])
    try:
        await rpc.initialize()
        server.stop()
        for node in nodes:
            for creds in (alive, revoked):
                status, body = await refusal(node, {"Authorization": f"Bearer {creds['sessionToken']}"})
                assert (status, body["error"]) == (503, "store_unavailable")
            status, body = await exchange_on(node, "wgp_whatever.x")
            assert (status, body["error"]) == (503, "store_unavailable")
        # The established connection carries on.
        assert (await rpc.call("status/get"))["result"]
        # The health check turns 503 once the instance's watcher notices (within its poll).
        deadline = time.monotonic() + 3
        while await health(nodes[0]) != 503:
            assert time.monotonic() < deadline, "/health never reported the outage"
            await asyncio.sleep(0.1)
        server.start()
        deadline = time.monotonic() + 10
        for node in nodes:  # each instance notices by itself
            while (await handshake(node, {"Authorization": f"Bearer {alive['sessionToken']}"}))[0] != 101:
                assert time.monotonic() < deadline, "wardgate did not recover when Redis came back"
                await asyncio.sleep(0.2)
        for node in nodes:
            status, body = await refusal(node, {"Authorization": f"Bearer {revoked['sessionToken']}"})
            assert (status, body["error"]) == (401, "token_revoked")
            assert (await handshake(node, {"Authorization": f"Bearer {alive['sessionToken']}"}))[0] == 101
        assert await health(nodes[1]) == 200
        fresh = await session(nodes[1])
        assert fresh["deviceId"] != alive["deviceId"]
        assert (await rpc.call("status/get"))["result"]
        logs = nodes[0].logs()
        assert "store unavailable" in logs
        assert "store available again" in logs
    finally:
        await rpc.close()
        for prefix in wardgate.prefixes:
            if server.running:
                delete_prefix(server.url, prefix)
        wardgate.prefixes.clear()


async def test_a_refresh_or_logout_lost_to_an_outage_leaves_the_connection_as_it_was(
    wardgate: DaemonFactory, private_redis_factory: Callable[..., RedisServer]
) -> None:
    server = private_redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    (node,) = cluster(wardgate, server.url, n=1)
    creds = await session(node)
    rpc = await Rpc.open(node, creds["sessionToken"])
    try:
        await rpc.initialize()
        server.stop()
        refused = await rpc.call("auth/refresh", {"sessionToken": creds["sessionToken"]})
        assert refused["error"]["data"]["reason"] == "store_unavailable"
        refused = await rpc.call("auth/revoke")
        assert refused["error"]["data"]["reason"] == "store_unavailable"
        assert (await rpc.call("status/get"))["result"]  # still open, still this session
        server.start()
        deadline = time.monotonic() + 10
        while await health(node) != 200:
            assert time.monotonic() < deadline, "wardgate did not recover when Redis came back"
            await asyncio.sleep(0.2)
        # The token the client holds is still the connection's: the refresh can be retried.
        refreshed = await rpc.call("auth/refresh", {"sessionToken": creds["sessionToken"]})
        remember(refreshed["result"]["sessionToken"])
        # And a batch stops at a logout: nothing after it runs on the revoked device.
        await rpc.send_raw(
            json.dumps(
                [
                    {"jsonrpc": "2.0", "method": "auth/revoke", "id": "out"},
                    {"jsonrpc": "2.0", "method": "status/get", "id": "after"},
                ]
            )
        )
        answers = {answer["id"]: answer for answer in await rpc.reply()}
        assert answers["out"]["result"] == {"revoked": True}
        assert answers["after"]["error"]["data"]["reason"] == "token_revoked"
        assert (await rpc.closed())[0] == 1000
    finally:
        await rpc.close()
        for prefix in wardgate.prefixes:
            if server.running:
                delete_prefix(server.url, prefix)
        wardgate.prefixes.clear()


@pytest.mark.parametrize("keys", ["redis", "env"])
async def test_tokens_from_one_instance_work_on_every_other(
    wardgate: DaemonFactory, redis_url: str, keys: str
) -> None:
    env = {}
    if keys == "env":
        import base64
        import os

        env = {
            "WARDGATE_SIGNING_KEYS": base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("="),
            "WARDGATE_SERVER_ID": "cluster-a",
        }
    nodes = cluster(wardgate, redis_url, env=env)
    creds = await session(nodes[0])
    for node in nodes:
        assert (await handshake(node, {"Authorization": f"Bearer {creds['sessionToken']}"}))[0] == 101
    status, refreshed = await post(nodes[2], "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert status == 200
    remember(refreshed["sessionToken"], refreshed["refreshToken"])
    # Reuse of the rotated refresh token on yet another instance revokes the device everywhere.
    status, body = await post(nodes[1], "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert (status, body["error"]) == (401, "token_revoked")
    for node in nodes:
        status, body = await refusal(node, {"Authorization": f"Bearer {refreshed['sessionToken']}"})
        assert (status, body["error"]) == (401, "token_revoked")
