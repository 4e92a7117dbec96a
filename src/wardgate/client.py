"""A Python client for wardgate: pair, connect, call, receive notifications, stay logged in.

::

    client = WardgateClient.from_pairing(json.loads(qr_text), device_name="laptop")
    async with client:
        status = await client.call("status/get")
        async for note in client.notifications():
            ...

The client refreshes its session token before it expires (``auth/refresh``)
and, when the connection drops, reconnects with exponential backoff, using
its refresh token to get a new session when the old one has lapsed. A close
with 4401 after ``auth/revoked`` ends the client for good: the device must pair
again. When the pairing payload carries ``certSha256``, the server certificate
is pinned to it and plain ``ws://`` is refused (a pin cannot protect it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import TracebackType
from typing import Any, Final

import aiohttp

from wardgate.errors import CLOSE_SESSION_EXPIRED
from wardgate.rpc import jsonrpc
from wardgate.tls import pinned_client_ssl

log = logging.getLogger("wardgate.client")

TLS_CLOSE_GRACE: Final = 0.25
REFRESH_AT: Final = 0.8
"""Refresh the session when this fraction of its lifetime has passed."""


class ClientError(Exception):
    """The client cannot go on (pairing refused, device revoked, server unreachable)."""


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    @property
    def reason(self) -> str | None:
        return self.data.get("reason") if isinstance(self.data, dict) else None


class SessionEnded(ClientError):
    """The server ended the session (revoked or expired): pair again."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"session ended ({code}): {reason}")
        self.code = code
        self.reason = reason


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class Credentials:
    device_id: str
    session_token: str = field(repr=False)
    session_expires_at: float
    refresh_token: str = field(repr=False)
    refresh_expires_at: float

    @classmethod
    def from_response(cls, body: Mapping[str, Any]) -> Credentials:
        return cls(
            device_id=body["deviceId"],
            session_token=body["sessionToken"],
            session_expires_at=_parse_time(body["expiresAt"]),
            refresh_token=body["refreshToken"],
            refresh_expires_at=_parse_time(body["refreshExpiresAt"]),
        )


class WardgateClient:
    def __init__(
        self,
        ws_url: str,
        http_url: str,
        *,
        credentials: Credentials | None = None,
        pairing_token: str | None = None,
        device_name: str = "wardgate python client",
        cert_sha256: str | None = None,
        reconnect: bool = True,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if credentials is None and pairing_token is None:
            raise ValueError("give credentials or a pairing token")
        if cert_sha256 and not (ws_url.startswith("wss://") and http_url.startswith("https://")):
            raise ValueError("a pinned certificate needs wss:// and https:// URLs")
        self.ws_url = ws_url
        self.http_url = http_url.rstrip("/")
        self.credentials = credentials
        self._pairing_token = pairing_token
        self.device_name = device_name
        self._ssl: aiohttp.Fingerprint | bool = pinned_client_ssl(cert_sha256) if cert_sha256 else True
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self._headers = dict(headers or {})
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._notes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self.ended: SessionEnded | None = None
        self.initialize_result: dict[str, Any] = {}

    @classmethod
    def from_pairing(cls, payload: Mapping[str, Any], **kwargs: Any) -> WardgateClient:
        """A client for the QR payload of ``wardgate pair --json``."""
        return cls(
            payload["ws"],
            payload["http"],
            pairing_token=payload["token"],
            cert_sha256=payload.get("certSha256"),
            **kwargs,
        )

    # --- HTTP -----------------------------------------------------------------------------------

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers)
        return self._http

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        http = await self._session()
        async with http.post(self.http_url + path, json=dict(body), ssl=self._ssl) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200:
                raise ClientError(f"{path} refused: {response.status} {data.get('error')}")
            return data

    async def exchange(self) -> Credentials:
        """Trade the pairing token for credentials over HTTP (``/api/auth/exchange``)."""
        if self._pairing_token is None:
            raise ClientError("no pairing token to exchange")
        token, self._pairing_token = self._pairing_token, None
        body = await self._post("/api/auth/exchange", {"token": token, "deviceName": self.device_name})
        self.credentials = Credentials.from_response(body)
        return self.credentials

    async def refresh_credentials(self) -> Credentials:
        """Rotate the refresh token for a new session (``/api/auth/refresh``)."""
        if self.credentials is None:
            raise ClientError("no credentials to refresh")
        body = await self._post("/api/auth/refresh", {"refreshToken": self.credentials.refresh_token})
        self.credentials = Credentials.from_response(body)
        return self.credentials

    # --- connection -------------------------------------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket and initialize; returns the ``initialize`` result."""
        await self._open()
        if self.reconnect:
            self._supervisor = asyncio.create_task(self._supervise())
        return self.initialize_result

    async def _open(self) -> None:
        if self.credentials is not None and self.credentials.session_expires_at - time.time() < 5:
            await self.refresh_credentials()
        token = self._pairing_token or (self.credentials.session_token if self.credentials else "")
        http = await self._session()
        self._ws = await http.ws_connect(
            self.ws_url,
            protocols=("wardgate.v1",),
            headers={"Authorization": f"Bearer {token}"},
            ssl=self._ssl,
            heartbeat=20.0,
        )
        self._reader = asyncio.create_task(self._read(self._ws))
        params: dict[str, Any] = {
            "protocolVersion": "2025-06-18",
            "clientInfo": {"name": "wardgate.client"},
            "auth": {"deviceName": self.device_name},
        }
        try:
            result = await self.call("initialize", params)
        except BaseException:
            # A socket that did not get through initialize is not kept (nor leaked) for a retry.
            await self._ws.close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            raise
        session = result.get("session") or {}
        if self._pairing_token is not None and "refreshToken" in session:
            self._pairing_token = None
            self.credentials = Credentials(
                device_id=session["deviceId"],
                session_token=session["token"],
                session_expires_at=_parse_time(session["expiresAt"]),
                refresh_token=session["refreshToken"],
                refresh_expires_at=_parse_time(session["refreshExpiresAt"]),
            )
        await self._notify("initialized")
        self.initialize_result = result
        self._connected.set()
        if self._refresher is not None:
            self._refresher.cancel()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        close_code = None
        while True:
            message = await ws.receive()
            if message.type is aiohttp.WSMsgType.CLOSE:
                close_code = int(message.data)  # what the server sent, even if our reply fails
                break
            if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                close_code = ws.close_code
                break
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                parsed = jsonrpc.parse_response(message.data)
            except jsonrpc.InvalidResponse:
                log.warning("ignored a malformed message from the server")
                continue
            for item in parsed:
                if isinstance(item, jsonrpc.Notification):
                    self._notes.put_nowait((item.method, item.params))
                    continue
                future = self._pending.pop(item.id, None) if isinstance(item.id, int) else None
                if future is None or future.done():
                    continue
                if item.error is not None:
                    future.set_exception(RpcError(item.error.code, item.error.message, item.error.data))
                else:
                    future.set_result(item.result)
        self._connected.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self._pending.clear()
        if close_code == CLOSE_SESSION_EXPIRED:
            self.ended = SessionEnded(ws.close_code, "session revoked or expired")

    async def _refresh_loop(self) -> None:
        while self.credentials is not None:
            lifetime = max(1.0, self.credentials.session_expires_at - time.time())
            # At 80% of what is left, but at least a second before the end when that is possible.
            await asyncio.sleep(min(lifetime * REFRESH_AT, max(lifetime - 1.0, lifetime / 2)))
            try:
                result = await self.call("auth/refresh", {"sessionToken": self.credentials.session_token})
            except (RpcError, ConnectionError) as exc:
                log.warning("session refresh failed: %s", type(exc).__name__)
                return
            self.credentials = replace(
                self.credentials,
                session_token=result["sessionToken"],
                session_expires_at=_parse_time(result["expiresAt"]),
            )

    async def _supervise(self) -> None:
        """Reconnect with exponential backoff and jitter when the connection drops."""
        backoff = 0.5
        while not self._closed:
            if self._reader is not None:
                await asyncio.shield(self._reader)
            if self._closed or self.ended is not None:
                return
            while not self._closed:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                try:
                    if self.credentials is not None and self.credentials.session_expires_at - time.time() < 5:
                        await self.refresh_credentials()
                    await self._open()
                    backoff = 0.5
                    break
                except ClientError as exc:
                    self.ended = SessionEnded(None, str(exc))
                    return
                except (aiohttp.ClientError, ConnectionError, OSError, RpcError):
                    backoff = min(self.max_backoff, backoff * 2)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # --- calls ------------------------------------------------------------------------------------

    async def call(self, method: str, params: Any = None, *, timeout: float = 30.0) -> Any:
        ws = self._ws
        if ws is None or ws.closed:
            if self.ended is not None:
                raise self.ended
            raise ConnectionError("not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await ws.send_str(jsonrpc.encode_request(request_id, method, params).decode())
        return await asyncio.wait_for(future, timeout)

    async def _notify(self, method: str, params: Any = None) -> None:
        if self._ws is not None:
            await self._ws.send_str(jsonrpc.encode_notification(method, params).decode())

    async def notifications(self) -> AsyncIterator[tuple[str, Any]]:
        """Server notifications as (method, params), in order."""
        while True:
            yield await self._notes.get()

    async def next_notification(self, method: str | None = None, *, timeout: float = 10.0) -> tuple[str, Any]:
        async def wait() -> tuple[str, Any]:
            while True:
                item = await self._notes.get()
                if method is None or item[0] == method:
                    return item

        return await asyncio.wait_for(wait(), timeout)

    # --- closing ------------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        for task in (self._refresher, getattr(self, "_supervisor", None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._http is not None:
            await self._http.close()
            if self.http_url.startswith("https://"):
                # aiohttp's documented graceful shutdown: TLS transports finish closing shortly
                # after the session does; give them that moment before the caller's loop ends.
                await asyncio.sleep(TLS_CLOSE_GRACE)

    async def __aenter__(self) -> WardgateClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
