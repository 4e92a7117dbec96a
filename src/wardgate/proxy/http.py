"""The HTTP relay: ``/proxy/<name>/http/<path>``.

Methods and paths come from the upstream's allowlists (checked before this module runs).
Request: headers filtered (``proxy.headers``), the configured headers injected, the body
streamed to the upstream and capped at ``max_body_bytes`` (413, checked against
``Content-Length`` up front and counted while streaming). No answer within ``timeout`` seconds
is a 504; an upstream that cannot be reached is a 502. Redirects are not followed; a
``Location`` under the upstream's base is pointed back through the relay.

Response: streamed to the client as it arrives, with hop-by-hop headers, ``Set-Cookie`` and
``WWW-Authenticate`` (the upstream's authentication is wardgate's business, and a browser would
prompt for it) removed, and the upstream's secrets scrubbed from header values and the body.
When there are secrets to scrub, the upstream is asked for an uncompressed body (a compressed
one is decompressed), since a secret cannot be found in compressed bytes. An upstream that
fails mid-body makes wardgate drop the client connection, so a truncated body is never
presented as complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web

from wardgate.errors import BadGateway, BodyTooLarge, GatewayTimeout
from wardgate.proxy.headers import client_response_headers, rewrite_location, upstream_request_headers
from wardgate.proxy.state import Admitted, ProxyState

log = logging.getLogger("wardgate.proxy")

READABLE_ENCODINGS: Final = frozenset({"identity", "gzip", "deflate"})
"""Content encodings wardgate can decompress to scrub a body."""
DROPPED_RESPONSE_HEADERS: Final = frozenset({"www-authenticate"})


class _Body:
    """The client's request body as an async iterator, counted and capped."""

    __slots__ = ("content", "limit", "size", "too_large")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.size = 0
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.content.iter_any():
            self.size += len(chunk)
            if self.size > self.limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


async def relay_http(state: ProxyState, admitted: Admitted, request: web.Request) -> web.StreamResponse:
    """Forward one request and stream the answer back; refusals raise WardgateError."""
    upstream = admitted.upstream
    settings = upstream.settings
    scrubber = upstream.scrubber
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        raise BodyTooLarge(hint=f"this upstream accepts bodies up to {settings.max_body_bytes} bytes")
    headers = upstream_request_headers(
        request.headers.items(),
        injected=upstream.headers,
        client_ip=admitted.client_ip,
        proto=request.scheme,
        host=request.host,
        extra_dropped=("expect",),
    )
    if scrubber.active:
        headers["Accept-Encoding"] = "identity"
    if length is not None:
        headers["Content-Length"] = str(length)
    body = _Body(request.content, settings.max_body_bytes) if request.body_exists else None
    timeout = settings.timeout
    method = request.method
    try:
        async with asyncio.timeout(timeout):
            response = await state.session().request(
                method,
                upstream.url(admitted.path.raw, admitted.query),
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                ssl=upstream.tls or True,
                auto_decompress=scrubber.active,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            )
    except BodyTooLarge:
        raise BodyTooLarge(
            hint=f"this upstream accepts bodies up to {settings.max_body_bytes} bytes"
        ) from None
    except TimeoutError:
        raise GatewayTimeout(hint="the upstream did not answer in time") from None
    except (aiohttp.ClientError, OSError, ValueError):
        if body is not None and body.too_large:
            raise BodyTooLarge(
                hint=f"this upstream accepts bodies up to {settings.max_body_bytes} bytes"
            ) from None
        raise BadGateway(hint="the upstream cannot be reached") from None
    try:
        return await _respond(state, admitted, request, response, body.size if body else 0)
    finally:
        response.release()


async def _respond(
    state: ProxyState,
    admitted: Admitted,
    request: web.Request,
    response: aiohttp.ClientResponse,
    bytes_in: int,
) -> web.StreamResponse:
    upstream = admitted.upstream
    scrubber = upstream.scrubber
    if scrubber.active:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in READABLE_ENCODINGS:
            raise BadGateway(hint="the upstream's body is in an encoding wardgate cannot scrub")
    headers = client_response_headers(
        ((k, v) for k, v in response.headers.items() if k.lower() not in DROPPED_RESPONSE_HEADERS),
        scrub=scrubber.scrub_text,
        body_rewritten=scrubber.active,
    )
    location = headers.get("Location")
    if location is not None:
        headers["Location"] = rewrite_location(
            location,
            upstream_base=upstream.base_url,
            relay_base=f"/proxy/{upstream.name}/http",
        )
    out = web.StreamResponse(status=response.status)
    out.headers.extend(headers)
    await out.prepare(request)
    stream = scrubber.stream()
    sent = 0
    status = response.status
    try:
        async for chunk in response.content.iter_any():
            data = stream.feed(chunk)
            if data:
                sent += len(data)
                await out.write(data)
        tail = stream.flush()
        if tail:
            sent += len(tail)
            await out.write(tail)
    except (aiohttp.ClientError, TimeoutError):
        # The upstream failed mid-body: the client must not take a truncated body as complete.
        status = 502
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionError, RuntimeError):
        status = 499  # the client went away
    # Audited before the end of the body goes out, so whoever has the whole answer finds the event.
    state.gateway.audit(
        "proxy.request",
        method=request.method,
        status=status,
        bytes_in=bytes_in,
        bytes_out=sent,
        duration=round(time.monotonic() - admitted.started, 3),
        **admitted.audit_fields(),
    )
    if status == response.status:
        await out.write_eof()
    return out
