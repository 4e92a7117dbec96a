"""Small real-socket helpers for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from tests.conftest import Daemon, remember


async def post(
    daemon: Daemon, path: str, body: Any, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(daemon.http + path, json=body, headers=headers) as response,
    ):
        return response.status, await response.json(content_type=None)


async def exchange(daemon: Daemon, token: str, name: str = "test device") -> dict[str, Any]:
    status, body = await post(daemon, "/api/auth/exchange", {"token": token, "deviceName": name})
    assert status == 200, body
    remember(body["sessionToken"], body["refreshToken"])
    return dict(body)


async def handshake(
    daemon: Daemon,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/ws",
    protocols: tuple[str, ...] = (),
) -> tuple[int, Any]:
    """Attempt an upgrade; return (status, JSON body) of a refusal, or (101, None)."""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(daemon.http + path, headers=headers, protocols=protocols)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, None
        await ws.close()
        return 101, None


async def refusal(
    daemon: Daemon, headers: Mapping[str, str] | None = None, path: str = "/ws"
) -> tuple[int, Any]:
    """Send a raw upgrade request and return the HTTP status and JSON body of the refusal."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.get(daemon.http + path, headers={**upgrade, **(headers or {})}) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text


class Rpc:
    """A raw JSON-RPC WebSocket client that keeps notifications apart from responses."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    @classmethod
    async def open(
        cls, daemon: Daemon, token: str | None, *, protocols: tuple[str, ...] = ("wardgate.v1",)
    ) -> Rpc:
        http = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            ws = await http.ws_connect(daemon.ws, headers=headers, protocols=protocols)
        except BaseException:
            await http.close()
            raise
        return cls(http, ws)

    async def send_raw(self, data: str) -> None:
        await self.ws.send_str(data)

    async def receive(self, timeout: float = 10.0) -> Any:
        message = await self.ws.receive(timeout=timeout)
        if message.type is not aiohttp.WSMsgType.TEXT:
            return message
        return json.loads(message.data)

    async def reply(self, timeout: float = 10.0) -> Any:
        """The next message that is not a notification."""
        while True:
            data = await self.receive(timeout)
            if isinstance(data, dict) and "method" in data and "id" not in data:
                self.notifications.append(data)
                continue
            return data

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        self.next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        if params is not None:
            request["params"] = params
        await self.ws.send_str(json.dumps(request))
        response = await self.reply()
        assert isinstance(response, dict), response
        return response

    async def notify(self, method: str, params: Any = None) -> None:
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            request["params"] = params
        await self.ws.send_str(json.dumps(request))

    async def initialize(self, **auth: Any) -> dict[str, Any]:
        response = await self.call(
            "initialize", {"protocolVersion": "2025-06-18", "clientInfo": {"name": "t"}, "auth": auth}
        )
        session = response.get("result", {}).get("session", {})
        remember(session.get("token"), session.get("refreshToken"))
        return response

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Wait for the server to close; return (code, reason), collecting notifications."""

        async def wait() -> tuple[int | None, str]:
            while True:
                message = await self.ws.receive()
                if message.type is aiohttp.WSMsgType.TEXT:
                    self.notifications.append(json.loads(message.data))
                    continue
                if message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                ):
                    return self.ws.close_code, str(message.extra or "")

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()
