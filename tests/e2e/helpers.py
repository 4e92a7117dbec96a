"""Small real-socket helpers for end-to-end tests."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
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
                if message.type is aiohttp.WSMsgType.CLOSE:
                    # The code the server sent. (aiohttp's own close_code turns into 1006 when
                    # the server drops TCP before the client's close reply is written.)
                    return int(message.data), str(message.extra or "")
                if message.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return self.ws.close_code, ""

        return await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


class RawWebSocket:
    """A hand-rolled WebSocket client over a plain socket that reads only when told to.

    Used to play a peer that stops reading (a slow consumer): aiohttp's client keeps
    draining the socket in the background, which hides the very behaviour under test.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, port: int, token: str, *, rcvbuf: int = 4096) -> RawWebSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: wardgate.v1\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
        return cls(sock)

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        header = bytearray([0x81])
        if len(payload) < 126:
            header.append(0x80 | len(payload))
        elif len(payload) < 65536:
            header.append(0x80 | 126)
            header += struct.pack("!H", len(payload))
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def drain_until_close(self, timeout: float = 20.0) -> int | None:
        """Read everything the server sent; return the close code, or None if TCP just ended."""
        self.sock.settimeout(timeout)
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                break
            buffer += chunk
        # Walk the frames; the close frame (opcode 8) carries the code.
        pos = 0
        while pos + 2 <= len(buffer):
            opcode = buffer[pos] & 0x0F
            length = buffer[pos + 1] & 0x7F
            pos += 2
            if length == 126:
                length = struct.unpack("!H", buffer[pos : pos + 2])[0]
                pos += 2
            elif length == 127:
                length = struct.unpack("!Q", buffer[pos : pos + 8])[0]
                pos += 8
            if opcode == 8 and length >= 2:
                return int(struct.unpack("!H", buffer[pos : pos + 2])[0])
            pos += length
        return None

    def close(self) -> None:
        self.sock.close()
