"""The Server-Sent Events relay: ``/proxy/<name>/sse/<path>``.

A GET to the upstream with ``Accept: text/event-stream`` (and ``Last-Event-ID`` passed on, so
reconnecting clients resume); an answer other than 200 is a 502 before anything is sent. The
body is then passed to the client chunk by chunk as it arrives, each chunk written (and the
socket drained) before the next is read: nothing is buffered beyond what scrubbing must hold
back, and scrubbing never holds back across a line break, so every complete event goes out at
once. The upstream is asked for an uncompressed body (compression would delay events).

The relay counts toward the caps like a WebSocket relay and is a ``server.app.Live``: a
revocation or shutdown ends the stream (an EventSource then reconnects and meets the gate).
A client that disconnects is noticed at the next write, or within ``CLIENT_CHECK_INTERVAL``
seconds when the upstream is quiet (aiohttp gives a streaming handler no disconnect signal),
and the upstream request is closed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Final

import aiohttp
from aiohttp import web

from wardgate.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_SESSION_EXPIRED,
    BadGateway,
    GatewayTimeout,
    TooManyConnections,
)
from wardgate.proxy.headers import upstream_request_headers
from wardgate.proxy.state import Admitted, ProxyState

log = logging.getLogger("wardgate.proxy")

CLIENT_CHECK_INTERVAL: Final = 1.0
"""Seconds between checks that the client of a quiet stream is still connected."""
EVENT_STREAM: Final = "text/event-stream"


class SseRelay:
    """One relayed event stream. A ``server.app.Live``."""

    def __init__(self, state: ProxyState, admitted: Admitted, request: web.Request) -> None:
        self.state = state
        self.admitted = admitted
        self.request = request
        self.id = admitted.conn_id
        self.principal = admitted.principal
        self.client_ip = admitted.client_ip
        self.counted_as = admitted.principal.key
        self.bytes_out = 0
        self.end_code: int | None = None
        """Why the stream ended, as a close code: 1000 upstream finished, 1001 client gone or
        shutdown, 4401 revoked, 1011 upstream failed."""
        self._pump: asyncio.Task[None] | None = None
        self._check: asyncio.TimerHandle | None = None
        self._client_gone = False
        self._released = False

    @property
    def device_id(self) -> str | None:
        return self.principal.device_id

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.state.gateway.unregister(self)
        self.state.relays.pop(self.id, None)

    async def revoke(self) -> None:
        self.state.gateway.audit("session.closed_revoked", device=self.device_id, ip=self.client_ip)
        await self.close(CLOSE_SESSION_EXPIRED, "token revoked")

    async def expire(self) -> None:
        if self._released:
            return  # ended meanwhile, for another reason
        self.state.gateway.audit("session.expired", device=self.device_id, ip=self.client_ip)
        await self.close(CLOSE_SESSION_EXPIRED, "session expired")

    async def close(self, code: int, reason: str) -> None:
        """End the stream (an event stream has no close code; ``code`` goes to the audit)."""
        del reason
        self._stop(code)

    def _stop(self, code: int) -> None:
        if self.end_code is None:
            self.end_code = code
        self.release()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()

    def _check_client(self) -> None:
        self._check = None
        transport = self.request.transport
        if transport is None or transport.is_closing():
            self._client_gone = True
            self._stop(CLOSE_GOING_AWAY)
            return
        self._check = asyncio.get_running_loop().call_later(CLIENT_CHECK_INTERVAL, self._check_client)

    async def run(self, upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
        """Relay until the upstream ends, the client goes, or the relay is closed."""
        self._pump = pump = asyncio.create_task(self._relay(upstream, response))
        self._check = asyncio.get_running_loop().call_later(CLIENT_CHECK_INTERVAL, self._check_client)
        try:
            await asyncio.wait((pump,))
        finally:
            if self._check is not None:
                self._check.cancel()
                self._check = None
            if not pump.done():  # this handler was cancelled
                self._stop(CLOSE_GOING_AWAY)
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            upstream.close()
            self.release()
            self.state.gateway.audit(
                "proxy.closed",
                kind="sse",
                **self.admitted.audit_fields(),
                bytes_out=self.bytes_out,
                duration=round(time.monotonic() - self.admitted.started, 3),
                client_code=self.end_code,
            )
        if not self._client_gone:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()

    async def _relay(self, upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
        stream = self.admitted.upstream.scrubber.stream()
        count = 0
        try:
            async for chunk in upstream.content.iter_any():
                data = stream.feed(chunk)
                if data:
                    count += len(data)
                    await response.write(data)
            tail = stream.flush()
            if tail:
                count += len(tail)
                await response.write(tail)
            self.end_code = self.end_code or CLOSE_NORMAL
        except (ConnectionError, RuntimeError):
            self._client_gone = True
            self.end_code = self.end_code or CLOSE_GOING_AWAY
        except (aiohttp.ClientError, TimeoutError):
            self.end_code = self.end_code or CLOSE_INTERNAL_ERROR  # the upstream failed mid-stream
        finally:
            self.bytes_out = count


async def relay_sse(state: ProxyState, admitted: Admitted, request: web.Request) -> web.StreamResponse:
    gateway = state.gateway
    upstream = admitted.upstream
    if state.closing:
        raise TooManyConnections(hint="the server is shutting down")
    upstream_response = await _open(state, admitted, request)
    content_type = upstream.scrubber.scrub_text(upstream_response.headers.get("Content-Type", EVENT_STREAM))
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": content_type, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    relay = SseRelay(state, admitted, request)
    try:
        await response.prepare(request)
    except BaseException:
        upstream_response.close()
        raise
    state.relays[relay.id] = relay
    gateway.register(relay)
    gateway.audit("proxy.connected", kind="sse", **admitted.audit_fields())
    log.info("relay opened", extra={"upstream": upstream.name, "kind": "sse", "ip": admitted.client_ip})
    try:
        await relay.run(upstream_response, response)
    finally:
        log.info("relay closed", extra={"upstream": upstream.name, "kind": "sse", "code": relay.end_code})
    return response


async def _open(state: ProxyState, admitted: Admitted, request: web.Request) -> aiohttp.ClientResponse:
    upstream = admitted.upstream
    headers = upstream_request_headers(
        request.headers.items(),
        injected=upstream.headers,
        client_ip=admitted.client_ip,
        proto=request.scheme,
        host=request.host,
        extra_dropped=("accept", "accept-encoding"),
    )
    headers.setdefault("Accept", EVENT_STREAM)
    headers.setdefault("Accept-Encoding", "identity")
    headers.setdefault("Cache-Control", "no-cache")
    url = upstream.url(admitted.path.raw, admitted.query)
    timeout = upstream.settings.timeout
    try:
        async with asyncio.timeout(timeout):
            response = await state.session().get(
                url,
                headers=headers,
                allow_redirects=False,
                ssl=upstream.tls or True,
                auto_decompress=True,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=None),
            )
    except TimeoutError:
        raise GatewayTimeout(hint="the upstream did not answer in time") from None
    except (aiohttp.ClientError, OSError, ValueError):
        raise BadGateway(hint="the upstream cannot be reached") from None
    if response.status != 200:
        response.close()
        raise BadGateway(hint=f"the upstream answered the event stream with status {response.status}")
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", "gzip", "deflate"):
        response.close()
        raise BadGateway(hint="the upstream sent an event stream in an encoding wardgate cannot read")
    return response
