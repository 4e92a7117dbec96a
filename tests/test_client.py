"""wardgate.client against real daemons: pair, call, refresh before expiry, reconnect, pin."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import DaemonFactory, remember
from wardgate.client import ClientError, SessionEnded, WardgateClient


async def test_pairs_from_the_qr_payload_and_calls(wardgate: DaemonFactory) -> None:
    d = wardgate()
    payload = d.pair_payload()
    assert payload["ws"] == d.ws  # `pair` found the running daemon's real address
    async with WardgateClient.from_pairing(payload, device_name="pytest") as client:
        assert client.credentials is not None
        remember(client.credentials.session_token, client.credentials.refresh_token)
        status = await client.call("status/get")
        assert status["you"]["deviceId"] == client.credentials.device_id
        assert client.initialize_result["serverInfo"]["name"] == "wardgate"
    devices = json.loads(d.cli("devices", "list", "--json").stdout)
    assert [x["name"] for x in devices] == ["pytest"]


async def test_refreshes_the_session_before_it_expires(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  token:\n    session_expiry: 4\n")
    async with WardgateClient.from_pairing(d.pair_payload(), reconnect=False) as client:
        assert client.credentials is not None
        first = client.credentials.session_token
        await asyncio.sleep(5)  # past the first token's expiry (at most 4 s after it was issued)
        assert client.credentials.session_token != first
        remember(client.credentials.session_token)
        assert (await client.call("status/get"))["server"]["name"] == "wardgate"


async def test_http_exchange_then_connect(wardgate: DaemonFactory) -> None:
    d = wardgate()
    client = WardgateClient.from_pairing(d.pair_payload(), reconnect=False)
    try:
        creds = await client.exchange()
        remember(creds.session_token, creds.refresh_token)
        await client.connect()
        assert (await client.call("status/get"))["you"]["deviceId"] == creds.device_id
        rotated = await client.refresh_credentials()
        remember(rotated.session_token, rotated.refresh_token)
        assert rotated.refresh_token != creds.refresh_token
    finally:
        await client.close()


async def test_reconnects_with_backoff_after_a_restart(wardgate: DaemonFactory) -> None:
    d = wardgate()
    async with WardgateClient.from_pairing(d.pair_payload(), max_backoff=1.0) as client:
        assert client.credentials is not None
        remember(client.credentials.session_token, client.credentials.refresh_token)
        port = d.port
        d.stop()
        await asyncio.sleep(0.5)
        with pytest.raises(ConnectionError):
            await client.call("status/get")
        d.port = port  # same address, same keys and store
        d.start()
        await client.wait_connected(timeout=15)
        assert (await client.call("status/get"))["server"]["name"] == "wardgate"


async def test_revoked_device_ends_the_client(wardgate: DaemonFactory) -> None:
    d = wardgate()
    async with WardgateClient.from_pairing(d.pair_payload()) as client:
        assert client.credentials is not None
        remember(client.credentials.session_token, client.credentials.refresh_token)
        d.cli("devices", "revoke", client.credentials.device_id)
        note = await client.next_notification("auth/revoked", timeout=5)
        assert note[1] == {"reason": "session_revoked"}
        deadline = asyncio.get_running_loop().time() + 5
        while client.ended is None:  # the close frame follows the notification
            assert asyncio.get_running_loop().time() < deadline, "the client never ended"
            await asyncio.sleep(0.05)
        assert isinstance(client.ended, SessionEnded)
        with pytest.raises(SessionEnded):
            await client.call("status/get")


async def test_used_pairing_code_is_refused(wardgate: DaemonFactory) -> None:
    d = wardgate()
    payload = d.pair_payload()
    first = WardgateClient.from_pairing(payload, reconnect=False)
    await first.exchange()
    await first.close()
    second = WardgateClient.from_pairing(payload, reconnect=False)
    try:
        with pytest.raises(ClientError):
            await second.exchange()
    finally:
        await second.close()


def test_a_pin_requires_tls_urls() -> None:
    with pytest.raises(ValueError, match="wss://"):
        WardgateClient("ws://127.0.0.1:1/ws", "http://127.0.0.1:1", pairing_token="x", cert_sha256="0" * 64)
    with pytest.raises(ValueError, match="credentials or a pairing token"):
        WardgateClient("wss://127.0.0.1:1/ws", "https://127.0.0.1:1")


async def test_tls_auto_cert_is_pinned_by_fingerprint(wardgate: DaemonFactory) -> None:
    d = wardgate("security:\n  tls:\n    auto_cert: true\n")
    payload = d.pair_payload()
    assert payload["ws"].startswith("wss://")
    assert len(payload["certSha256"]) == 64
    async with WardgateClient.from_pairing(payload, reconnect=False) as client:
        assert client.credentials is not None
        remember(client.credentials.session_token, client.credentials.refresh_token)
        assert (await client.call("status/get"))["server"]["name"] == "wardgate"
    # The same daemon, a client pinned to some other certificate: refused before any token is sent.
    other = dict(d.pair_payload(), certSha256="ab" * 32)
    impostor = WardgateClient.from_pairing(other, reconnect=False)
    try:
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            await impostor.connect()
    finally:
        await impostor.close()


def test_remote_mode_without_tls_refuses_to_start(wardgate: DaemonFactory) -> None:
    d = wardgate(
        "server: {host: 0.0.0.0}\nsecurity:\n  mode: remote\n  origins: {allowed: ['https://*.devtunnels.ms']}\n",
        start=False,
    )
    result = d.cli("serve", "--port", "0", check=False)
    assert result.returncode == 2
    assert "security.tls.enabled" in result.stderr
