"""The relays end to end: a real wardgate process in front of real aiohttp upstreams.

The upstreams run in the test process on loopback and REQUIRE the injected bearer token (401
otherwise). They echo, reflect the Authorization header back in bodies, headers, frames and
close reasons, stream SSE events one at a time, set cookies and die mid-stream. Whatever the
client receives is checked for the upstream secret; whatever the upstream receives is checked
for the client's wardgate credential. The secret is registered with ``remember``, so the
session-wide log scan fails if any log line carries it.

One daemon per module (its upstream listens on a port reserved for the module); each test
starts its own upstream server on that port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import WSMsgType, web

from tests.conftest import Daemon, DaemonFactory, remember, store_url_for
from tests.e2e.helpers import exchange
from wardgate.tls import ensure_auto_cert, server_ssl_context

SECRET = "upstream-secret-" + secrets.token_hex(16)
remember(SECRET)
AUTH = f"Bearer {SECRET}"
MAX_MESSAGE = 128 * 1024
MAX_BODY = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(port: int, dead_port: int, extra: str = "") -> str:
    common = '    headers: {Authorization: "Bearer ${UPSTREAM_TOKEN}", X-Tenant: acme}\n'
    return (
        f"limits:\n  max_message_bytes: {MAX_MESSAGE}\n  heartbeat: 5\n{extra}"
        "upstreams:\n"
        f"  echo:\n    url: http://127.0.0.1:{port}/base\n{common}"
        "    allow_paths: ['/ws/**', '/sse/**', '/http/**']\n"
        "    allow_methods: [GET, HEAD, POST, PUT]\n"
        "    max_connections_per_user: 2\n"
        f"    max_body_bytes: {MAX_BODY}\n"
        f"  spliced:\n    url: http://127.0.0.1:{port}/base\n{common}    splice: true\n"
        f"  slow:\n    url: http://127.0.0.1:{port}/base\n{common}    timeout: 0.3\n"
        f"  down:\n    url: http://127.0.0.1:{dead_port}/\n{common}"
    )


# --- the upstream ------------------------------------------------------------------------------------


@dataclass
class Upstream:
    """A test upstream's view of what reached it."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    """Per request: method, path, query, headers (every value) and offered subprotocols."""
    closes: asyncio.Queue[tuple[int | None, str]] = field(default_factory=asyncio.Queue)
    """Close codes and reasons the upstream's WebSockets received."""
    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    stream_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def everything_seen(self) -> str:
        return json.dumps(self.seen)


def build_upstream(state: Upstream) -> web.Application:
    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        state.seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "protocols": request.headers.get("Sec-WebSocket-Protocol", ""),
            }
        )
        if request.headers.get("Authorization") != AUTH:
            return web.json_response({"error": "unauthorized"}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("chat", "superchat"))
        await ws.prepare(request)
        greeting = request.match_info["mode"] == "echo"
        if greeting:
            await ws.send_str(f"hello, you sent {request.headers['Authorization']}")
        reason = ""
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                text = message.data
                if text.startswith("close:"):
                    await ws.close(
                        code=int(text[6:]), message=f"bye {request.headers['Authorization']}".encode()
                    )
                elif text == "die":
                    assert request.transport is not None
                    request.transport.abort()
                elif text == "reflect-binary":
                    await ws.send_bytes(b"\x00\x01" + AUTH.encode() + b"\xff")
                elif text == "reflect-fragmented":
                    # One text message in three frames, the secret cut across all three, a
                    # ping in between, and the middle frame itself cut across two writes.
                    assert request.transport is not None
                    write = request.transport.write
                    write(server_frame(0x1, b"start " + AUTH[:10].encode(), fin=False))
                    write(server_frame(0x9, b"between"))
                    middle = server_frame(0x0, AUTH[10:20].encode(), fin=False)
                    write(middle[:5])
                    await asyncio.sleep(0.05)
                    write(middle[5:] + server_frame(0x0, AUTH[20:].encode() + b" end"))
                elif text == "send-too-big":
                    await ws.send_bytes(b"x" * (MAX_MESSAGE + 1))
                elif text == "send-masked":
                    assert request.transport is not None
                    request.transport.write(client_frame(0x1, AUTH.encode()))  # no server may
                elif text == "go-mute":
                    await asyncio.Event().wait()  # never reads again, so never answers a ping
                else:
                    await ws.send_str(text)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            else:
                if message.type is WSMsgType.CLOSE:
                    reason = str(message.extra or "")
                break
        await state.closes.put((ws.close_code, reason))
        return ws

    async def sse_events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Set-Cookie": "u=1"})
        await response.prepare(request)
        try:
            await response.write(f"data: first {request.headers['Authorization']}\n\n".encode())
            if request.match_info["mode"] == "hold":
                await asyncio.Event().wait()  # until the relay drops us (handler cancellation)
            await state.proceed.wait()
            # A secret split over two writes, then the last event.
            middle = len(AUTH) // 2
            await response.write(f"data: second {AUTH[:middle]}".encode())
            await response.write(f"{AUTH[middle:]}\n\n".encode())
            await response.write(b"data: third\n\n")
            await response.write_eof()
        finally:
            state.stream_ended.set()
        return response

    async def sse_refused(request: web.Request) -> web.Response:
        return web.json_response({"error": "nope"}, status=500)

    async def http_reflect(request: web.Request) -> web.Response:
        body = await request.read()
        response = web.json_response(
            {
                "method": request.method,
                "query": request.query_string,
                "auth": request.headers.get("Authorization"),
                "body": body.decode(errors="replace"),
            },
            headers={"X-Echo-Auth": request.headers.get("Authorization", ""), "WWW-Authenticate": "Basic"},
        )
        response.set_cookie("upstream_session", "abc")
        return response

    async def http_chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        for piece in ("start ", AUTH[:5], AUTH[5:20], AUTH[20:], " end ", SECRET[:3], SECRET[3:]):
            await response.write(piece.encode())
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def http_die(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100000"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def http_slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def http_redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://{request.host}/base/http/reflect?from=redirect")

    app = web.Application(middlewares=[require_token])
    app.router.add_get("/base/ws/{mode}", ws_echo)
    app.router.add_get("/base/sse/refused", sse_refused)
    app.router.add_get("/base/sse/{mode}", sse_events)
    app.router.add_route("*", "/base/http/reflect", http_reflect)
    app.router.add_get("/base/http/chunks", http_chunks)
    app.router.add_get("/base/http/die", http_die)
    app.router.add_get("/base/http/slow", http_slow)
    app.router.add_get("/base/http/redirect", http_redirect)
    return app


@dataclass
class Setup:
    daemon: Daemon
    port: int
    token: str
    """An operator session token (``wgs_``)."""
    viewer_token: str

    def url(self, path: str) -> str:
        return self.daemon.http + path

    def bearer(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


def _start(factory: DaemonFactory, extra: str = "") -> tuple[Daemon, int]:
    port, dead = free_port(), free_port()
    daemon = factory(config(port, dead, extra), env={"UPSTREAM_TOKEN": SECRET})
    return daemon, port


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Setup]:
    factory = DaemonFactory(tmp_path_factory.mktemp("proxy"), store_url_for(request))
    daemon, port = _start(factory)
    operator = asyncio.run(exchange(daemon, daemon.pairing_token()))["sessionToken"]
    viewer = asyncio.run(exchange(daemon, daemon.pairing_token("viewer")))["sessionToken"]
    yield Setup(daemon, port, operator, viewer)
    factory.stop_all()


@contextlib.asynccontextmanager
async def upstream_on(port: int, tls: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    state = Upstream()
    runner = web.AppRunner(
        build_upstream(state), handler_cancellation=True, access_log=None, shutdown_timeout=0.1
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, ssl_context=tls)
    await site.start()
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def upstream(setup: Setup) -> AsyncIterator[Upstream]:
    async with upstream_on(setup.port) as state:
        yield state


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def assert_clean(*received: object) -> None:
    """Nothing the client received holds the upstream secret."""
    for item in received:
        text = item if isinstance(item, str) else repr(item)
        assert SECRET not in text


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """An unmasked frame (RFC 6455 section 5.2), as a server sends it."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return bytes((first, len(payload))) + payload
    if len(payload) < 1 << 16:
        return bytes((first, 126)) + len(payload).to_bytes(2, "big") + payload
    return bytes((first, 127)) + len(payload).to_bytes(8, "big") + payload


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked frame, as a client sends it."""
    frame = server_frame(opcode, payload, fin=fin)
    header = len(frame) - len(payload)
    mask = secrets.token_bytes(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return frame[:1] + bytes((frame[1] | 0x80,)) + frame[2:header] + mask + masked


class RawClient:
    """A WebSocket client on a bare socket, for what aiohttp's will not do: send fragmented
    messages and frames cut anywhere, or stay silent (never answer a ping)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, base: str, path: str, headers: dict[str, str]) -> RawClient:
        url = yarl.URL(base)
        secure = url.scheme == "https"
        context = None
        if secure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the test daemon's own self-signed certificate
        reader, writer = await asyncio.open_connection(url.host, url.port, ssl=context)
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {url.host}:{url.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(secrets.token_bytes(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self, timeout: float = 5.0) -> tuple[bool, int, bytes]:
        """The next frame: (FIN, opcode, payload)."""
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            assert not second & 0x80, "a masked frame from the server"
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            return bool(first & 0x80), first & 0x0F, await self.reader.readexactly(length)

    async def message(self) -> tuple[int, bytes]:
        """The next data message (fragments joined), answering pings on the way."""
        opcode, payload = 0, b""
        while True:
            fin, op, data = await self.frame()
            if op == 0x9:
                self.send(client_frame(0xA, data))
                continue
            if op == 0xA:
                continue
            assert op != 0x8, f"closed: {data!r}"
            opcode, payload = opcode or op, payload + data
            if fin:
                return opcode, payload

    async def close_frame(self) -> tuple[int, str]:
        """Skip to the server's close frame: (code, reason)."""
        while True:
            _, op, data = await self.frame()
            if op == 0x8:
                return int.from_bytes(data[:2], "big"), data[2:].decode()

    def close(self) -> None:
        self.writer.close()


RELAYS = pytest.mark.parametrize("relay", ["echo", "spliced"])
"""The WebSocket tests run against both relays: frame by frame, and spliced."""


async def next_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> tuple[int, str]:
    """The close frame the server sent (code, reason), skipping data frames."""
    while True:
        message = await ws.receive(timeout=timeout)
        if message.type is WSMsgType.CLOSE:
            return int(message.data), str(message.extra or "")
        if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            raise AssertionError(f"no close frame: {message.type}")


# --- WebSocket relay ------------------------------------------------------------------------------------


async def test_spliced_websocket_relays_text_and_binary_untouched(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(
        setup.url("/proxy/spliced/ws/ws/plain?x=1&token=nope"), headers=setup.bearer(), protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        for index in range(50):
            await ws.send_str(f"m{index}")
        assert [await ws.receive_str(timeout=5) for _ in range(50)] == [f"m{i}" for i in range(50)]
        big = bytes(range(256)) * 200  # a 16-bit and a 64-bit length field, across many reads
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == big
        await ws.send_bytes(b"")
        assert await ws.receive_bytes(timeout=5) == b""
        await ws.ping(b"hello")  # passed through to the upstream, which answers it
    (seen,) = upstream.seen
    assert seen["query"] == "x=1"
    assert seen["protocols"] == "chat"
    assert seen["headers"]["authorization"] == AUTH
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert "sec-websocket-extensions" not in seen["headers"]
    assert setup.token not in upstream.everything_seen()


async def test_websocket_echoes_text_and_binary_and_scrubs_the_secret(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(
        setup.url("/proxy/echo/ws/ws/echo?x=1&token=nope"), headers=setup.bearer(), protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        greeting = await ws.receive_str(timeout=5)
        assert greeting == "hello, you sent [redacted]"
        await ws.send_str("ping text")
        assert await ws.receive_str(timeout=5) == "ping text"
        await ws.send_bytes(b"\x00binary\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00binary\xff"
        await ws.send_str("reflect-binary")
        reflected = await ws.receive_bytes(timeout=5)
        assert reflected == b"\x00\x01[redacted]\xff"
    assert_clean(greeting, reflected)
    (seen,) = upstream.seen
    assert seen["path"] == "/base/ws/echo"
    assert seen["query"] == "x=1"  # wardgate's credential parameter is not passed on
    assert seen["protocols"] == "chat"
    assert seen["headers"]["authorization"] == AUTH
    assert seen["headers"]["x-tenant"] == "acme"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
    assert setup.token not in upstream.everything_seen()


@RELAYS
async def test_bearer_subprotocol_is_never_offered_upstream(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    protocols = (f"wardgate.bearer.{setup.token}", "superchat")
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), protocols=protocols) as ws:
        assert ws.protocol == "superchat"
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "x"
    assert upstream.seen[0]["protocols"] == "superchat"
    assert setup.token not in upstream.everything_seen()


@RELAYS
async def test_browser_gets_a_subprotocol_it_offered_when_the_upstream_selects_none(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    protocols = (f"wardgate.bearer.{setup.token}", "wardgate.v1")
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), protocols=protocols) as ws:
        assert ws.protocol == "wardgate.v1"
    assert upstream.seen[0]["protocols"] == "wardgate.v1"


@RELAYS
async def test_client_close_code_and_reason_reach_the_upstream(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    ws = await http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer())
    await ws.send_str("x")
    assert await ws.receive_str(timeout=5) == "x"
    await ws.close(code=4000, message=b"client says bye")
    # The relay answers the client's close with its code; the splice passes on the upstream's
    # own answer (aiohttp answers any close with 1000).
    assert ws.close_code == (4000 if relay == "echo" else 1000)
    assert await asyncio.wait_for(upstream.closes.get(), 5) == (4000, "client says bye")


@RELAYS
async def test_upstream_close_code_reaches_the_client_with_the_reason_scrubbed(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_str("close:4001")
        code, reason = await next_close(ws)
    assert (code, reason) == (4001, "bye [redacted]")


@RELAYS
async def test_upstream_dying_mid_stream_closes_the_client_with_1011(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_str("still there?")
        assert await ws.receive_str(timeout=5) == "still there?"
        await ws.send_str("die")
        code, reason = await next_close(ws)
    assert (code, reason) == (1011, "upstream connection lost")


@RELAYS
async def test_oversized_client_message_closes_1009_and_the_upstream_1001(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_bytes(b"x" * (MAX_MESSAGE + 1))
        code, _ = await next_close(ws)
    assert code == 1009
    assert (await asyncio.wait_for(upstream.closes.get(), 5))[0] == 1001


async def test_splice_mode_relays_frames_and_still_scrubs_close_reasons(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(setup.url("/proxy/spliced/ws/ws/plain"), headers=setup.bearer()) as ws:
        for index in range(50):
            await ws.send_str(f"m{index}")
        assert [await ws.receive_str(timeout=5) for _ in range(50)] == [f"m{i}" for i in range(50)]
        await ws.send_bytes(b"\x01\x02")
        assert await ws.receive_bytes(timeout=5) == b"\x01\x02"
        await ws.send_str("close:4002")
        assert await next_close(ws) == (4002, "bye [redacted]")


async def test_a_secret_cut_across_fragments_and_network_reads_is_scrubbed(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_str("reflect-fragmented")
        received = await ws.receive_str(timeout=5)
        await ws.send_str("after")  # the stream goes on, in order
        assert await ws.receive_str(timeout=5) == "after"
    assert received == "start [redacted] end"
    assert_clean(received)


async def test_large_messages_stream_through_and_are_scrubbed_across_reads(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer()) as ws:
        big = bytes(range(256)) * 400  # re-framed as it streams: many reads, no secret
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=5) == big
        await ws.send_str("x" * 70_000 + SECRET + "y" * 30_000)  # echoed back by the upstream
        received = await ws.receive_str(timeout=5)
    assert received == "x" * 70_000 + "[redacted]" + "y" * 30_000


@RELAYS
async def test_an_oversized_upstream_message_closes_the_client_with_1009(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    async with http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_str("send-too-big")
        assert await next_close(ws) == (1009, "upstream message too big")
    assert await asyncio.wait_for(upstream.closes.get(), 5) == (1009, "message too big")


@RELAYS
async def test_the_size_cap_sums_the_fragments_of_a_client_message(
    setup: Setup, upstream: Upstream, relay: str
) -> None:
    client = await RawClient.connect(setup.daemon.http, f"/proxy/{relay}/ws/ws/plain", setup.bearer())
    try:
        half = MAX_MESSAGE // 2
        # A message of exactly the cap, in three frames cut across writes: relayed whole.
        stream = (
            client_frame(0x2, b"a" * half, fin=False)
            + client_frame(0x9, b"keepalive")
            + client_frame(0x0, b"b" * (half - 1), fin=False)
            + client_frame(0x0, b"c")
        )
        for start in range(0, len(stream), 7000):
            client.send(stream[start : start + 7000])
        assert await client.message() == (0x2, b"a" * half + b"b" * (half - 1) + b"c")
        # One byte more, though no frame is over the cap: 1009, and nothing of it relayed.
        client.send(client_frame(0x2, b"a" * half, fin=False) + client_frame(0x0, b"b" * (half + 1)))
        assert await client.close_frame() == (1009, "message too big")
        assert await asyncio.wait_for(upstream.closes.get(), 5) == (1001, "client connection closed")
    finally:
        client.close()


@RELAYS
async def test_permessage_deflate_is_never_negotiated(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    async with http.ws_connect(
        setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer(), compress=15
    ) as ws:
        assert ws.compress == 0  # the client's offer was declined
        await ws.send_str("plain " * 100)
        assert await ws.receive_str(timeout=5) == "plain " * 100
    (seen,) = upstream.seen
    assert "sec-websocket-extensions" not in seen["headers"]  # and never passed on


async def test_a_frame_no_server_may_send_ends_the_relay_with_1014(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # A masked frame's payload cannot be searched for the secret as it stands: never passed.
    async with http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer()) as ws:
        await ws.send_str("send-masked")
        assert await next_close(ws) == (1014, "upstream protocol error")
    assert (await asyncio.wait_for(upstream.closes.get(), 5))[0] == 1002


async def test_upstream_down_or_refusing_is_a_502_before_any_upgrade(
    setup: Setup, http: aiohttp.ClientSession
) -> None:
    # No upstream server runs in this test: "echo" and "spliced" are down too.
    for path in ("/proxy/down/ws/x", "/proxy/echo/ws/ws/plain", "/proxy/spliced/ws/ws/plain"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(setup.url(path), headers=setup.bearer())
        assert info.value.status == 502
    async with http.get(setup.url("/proxy/down/sse/x"), headers=setup.bearer()) as response:
        assert response.status == 502
        assert (await response.json())["error"] == "bad_gateway"
    async with http.get(setup.url("/proxy/down/http/x"), headers=setup.bearer()) as response:
        assert response.status == 502
        body = await response.text()
    assert "127.0.0.1" not in body  # the upstream's address is not disclosed


@RELAYS
async def test_upstream_refusing_the_handshake_is_a_502(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/"), headers=setup.bearer())  # upstream 404
    assert info.value.status == 502


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "reason"),
    [
        ("GET", "/proxy/nope/http/http/reflect", 404, "upstream_not_found"),
        ("GET", "/proxy/ec%2Fho/http/http/reflect", 404, "upstream_not_found"),
        ("GET", "/proxy/echo/http/other", 403, "path_refused"),
        ("GET", "/proxy/echo/http/http/../../admin", 400, "invalid_request"),
        ("GET", "/proxy/echo/http/http/%2e%2e/%2e%2e/admin", 400, "invalid_request"),
        ("GET", "/proxy/echo/http/http%2Freflect", 400, "invalid_request"),
        ("GET", "/proxy/echo/http/http//reflect", 400, "invalid_request"),
        ("DELETE", "/proxy/echo/http/http/reflect", 405, "method_not_allowed"),
        ("POST", "/proxy/echo/sse/sse/events", 405, "method_not_allowed"),
        ("PUT", "/proxy/echo/ws/ws/echo", 405, "method_not_allowed"),
    ],
)
async def test_refused_requests(
    setup: Setup,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    status: int,
    reason: str,
) -> None:
    url = yarl.URL(setup.url(path), encoded=True)  # sent as written, dot segments and all
    async with http.request(method, url, headers=setup.bearer()) as response:
        body = await response.json()
        assert (response.status, body["error"]) == (status, reason)
        if status == 405:
            assert response.headers["Allow"] == ("GET" if "/http/" not in path else "GET, HEAD, POST, PUT")
    assert "echo" not in json.dumps(body)
    assert "spliced" not in json.dumps(body)
    assert upstream.seen == []


async def test_no_credential_is_401_and_a_viewer_is_403(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    for kind, path in (("ws", "ws/plain"), ("sse", "sse/events"), ("http", "http/reflect")):
        async with http.get(setup.url(f"/proxy/echo/{kind}/{path}")) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "authentication_required"
        async with http.get(
            setup.url(f"/proxy/echo/{kind}/{path}"), headers=setup.bearer(setup.viewer_token)
        ) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "permission_denied"
    # An unknown upstream looks the same as a known one until authenticated.
    async with http.get(setup.url("/proxy/nope/http/x")) as response:
        assert response.status == 401
    assert upstream.seen == []


async def test_a_pairing_code_is_no_relay_credential(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # A pairing code is single use and only ever traded for a session: presented to a relay it
    # would be a reusable hour-long bearer token.
    pairing = setup.daemon.pairing_token()
    for _ in range(2):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer(pairing))
        assert info.value.status == 401
        for kind, path in (("sse", "sse/events"), ("http", "http/reflect")):
            async with http.get(setup.url(f"/proxy/echo/{kind}/{path}"), headers=setup.bearer(pairing)) as r:
                assert r.status == 401
                body = await r.json()
                assert body["error"] == "invalid_token"
                assert "session" in body["hint"]
    assert upstream.seen == []
    # It was not consumed: the device can still pair with it.
    assert (await exchange(setup.daemon, pairing))["sessionToken"].startswith("wgs_")


# --- caps and revocation -------------------------------------------------------------------------------


async def test_per_user_cap_per_upstream(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    first = await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer())
    second = await http.get(setup.url("/proxy/echo/sse/sse/hold"), headers=setup.bearer())
    assert second.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer())
    assert info.value.status == 503
    async with http.get(setup.url("/proxy/echo/sse/sse/events"), headers=setup.bearer()) as refused:
        assert refused.status == 503
        assert (await refused.json())["error"] == "too_many_connections"
    # Another upstream has its own count.
    other = await http.ws_connect(setup.url("/proxy/spliced/ws/ws/plain"), headers=setup.bearer())
    await other.close()
    # Closing one frees its slot at once: locally by the time the close handshake completes, on
    # Redis one round trip later.
    await first.close()
    deadline = asyncio.get_running_loop().time() + 2
    while True:
        try:
            again = await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=setup.bearer())
            break
        except aiohttp.WSServerHandshakeError as exc:
            refused_with = exc.status
        assert refused_with == 503, refused_with
        assert asyncio.get_running_loop().time() < deadline, "the closed relay's slot was not freed"
        await asyncio.sleep(0.02)
    await again.close()
    second.close()


@RELAYS
async def test_revoking_the_device_closes_its_live_relays_with_4401(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession, relay: str
) -> None:
    session = (await exchange(setup.daemon, setup.daemon.pairing_token(), name="to revoke"))["sessionToken"]
    ws = await http.ws_connect(setup.url(f"/proxy/{relay}/ws/ws/plain"), headers=setup.bearer(session))
    events = await http.get(setup.url("/proxy/echo/sse/sse/hold"), headers=setup.bearer(session))
    assert (await events.content.readuntil(b"\n\n")).startswith(b"data: first ")
    async with http.post(setup.url("/api/auth/revoke"), headers=setup.bearer(session)) as response:
        assert response.status == 200
    assert await next_close(ws) == (4401, "token revoked")
    assert await asyncio.wait_for(events.content.read(), 5) == b""  # the stream ended
    assert (await asyncio.wait_for(upstream.closes.get(), 5))[0] == 1001
    await asyncio.wait_for(upstream.stream_ended.wait(), 5)
    await ws.close()
    events.close()


@RELAYS
async def test_relays_end_with_the_session_token_they_were_opened_with(
    wardgate: DaemonFactory, relay: str
) -> None:
    daemon, port = _start(wardgate, "security:\n  token:\n    session_expiry: 4\n")
    session = (await exchange(daemon, daemon.pairing_token()))["sessionToken"]
    bearer = {"Authorization": f"Bearer {session}"}
    async with upstream_on(port) as state, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(daemon.http + f"/proxy/{relay}/ws/ws/plain", headers=bearer)
        events = await http.get(daemon.http + "/proxy/echo/sse/sse/hold", headers=bearer)
        assert (await events.content.readuntil(b"\n\n")).startswith(b"data: first ")
        await ws.send_str("still valid")
        assert await ws.receive_str(timeout=5) == "still valid"
        # The token lives at most 4 s: the relays end then, as a JSON-RPC socket would.
        assert await next_close(ws, timeout=8) == (4401, "session expired")
        assert await asyncio.wait_for(events.content.read(), 5) == b""
        assert (await asyncio.wait_for(state.closes.get(), 5))[0] == 1001
        await ws.close()
        events.close()
    expired = [
        line for line in (daemon.home / "audit.log").read_text().splitlines() if "session.expired" in line
    ]
    assert len(expired) == 2


async def test_an_https_upstream_signed_by_a_private_ca(wardgate: DaemonFactory, tmp_path: Path) -> None:
    tls = ensure_auto_cert(tmp_path / "upstream", ["127.0.0.1"])
    port = free_port()
    base = (
        f"    url: https://127.0.0.1:{port}/base\n"
        + '    headers: {Authorization: "Bearer ${UPSTREAM_TOKEN}"}\n'
    )
    daemon = wardgate(
        f"upstreams:\n  private:\n{base}    ca_file: {tls.cert_file}\n  untrusted:\n{base}",
        env={"UPSTREAM_TOKEN": SECRET},
    )
    session = (await exchange(daemon, daemon.pairing_token()))["sessionToken"]
    bearer = {"Authorization": f"Bearer {session}"}
    async with (
        upstream_on(port, server_ssl_context(tls.cert_file, tls.key_file)) as state,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(daemon.http + "/proxy/private/http/http/reflect", headers=bearer) as response:
            assert response.status == 200
            assert (await response.json())["auth"] == "[redacted]"
        ws = await http.ws_connect(daemon.http + "/proxy/private/ws/ws/plain", headers=bearer)
        await ws.send_str("over tls")
        assert await ws.receive_str(timeout=5) == "over tls"
        await ws.close()
        async with http.get(daemon.http + "/proxy/private/sse/sse/events", headers=bearer) as response:
            assert response.status == 200
            assert (await response.content.readuntil(b"\n\n")).startswith(b"data: first ")
        assert [seen["headers"]["authorization"] for seen in state.seen] == [AUTH] * 3
        # The same server is a stranger to an upstream that trusts the system's authorities only.
        async with http.get(daemon.http + "/proxy/untrusted/http/http/reflect", headers=bearer) as response:
            assert (response.status, (await response.json())["error"]) == (502, "bad_gateway")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(daemon.http + "/proxy/untrusted/ws/ws/plain", headers=bearer)
        assert info.value.status == 502
        assert len(state.seen) == 3
        # The daemon's pooled TLS connections end before the upstream does (no half-closed
        # TLS sockets left behind in this process).
        daemon.stop()
        await asyncio.sleep(0.1)


# --- SSE relay -------------------------------------------------------------------------------------------


async def test_sse_events_arrive_one_by_one_and_scrubbed(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    headers = {**setup.bearer(), "Last-Event-ID": "41", "Accept": "text/html"}
    async with http.get(setup.url("/proxy/echo/sse/sse/events?a=1&apiKey=x"), headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "Set-Cookie" not in response.headers
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first [redacted]\n\n"
        assert not upstream.stream_ended.is_set()  # the upstream has not finished
        upstream.proceed.set()
        rest = await asyncio.wait_for(response.content.read(), 5)
    assert rest == b"data: second [redacted]\n\ndata: third\n\n"
    seen = upstream.seen[0]
    assert seen["query"] == "a=1"
    assert seen["headers"]["accept"] == "text/event-stream"
    assert seen["headers"]["last-event-id"] == "41"  # so a reconnecting EventSource resumes
    assert setup.token not in upstream.everything_seen()


async def test_sse_client_disconnect_closes_the_upstream_request(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    response = await http.get(setup.url("/proxy/echo/sse/sse/hold"), headers=setup.bearer())
    assert (await response.content.readuntil(b"\n\n")).startswith(b"data: first ")
    response.close()  # drop the connection
    await asyncio.wait_for(upstream.stream_ended.wait(), 5)


async def test_sse_upstream_error_status_is_a_502(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(setup.url("/proxy/echo/sse/sse/refused"), headers=setup.bearer()) as response:
        assert response.status == 502
        assert (await response.json())["error"] == "bad_gateway"


# --- HTTP relay ------------------------------------------------------------------------------------------


async def test_http_relay_injects_strips_and_scrubs(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    headers = {
        **setup.bearer(),
        "Cookie": "other=1",
        "X-API-Key": "wgk_forged",
        "X-Forwarded-For": "6.6.6.6",
        "Connection": "X-Hop",
        "X-Hop": "hop",
        "X-Custom": "kept",
    }
    async with http.get(setup.url("/proxy/echo/http/http/reflect?q=1&token=t"), headers=headers) as response:
        assert response.status == 200
        body = await response.text()
        received_headers = dict(response.headers)
    assert json.loads(body) == {"method": "GET", "query": "q=1", "auth": "[redacted]", "body": ""}
    assert received_headers["X-Echo-Auth"] == "[redacted]"
    assert "Set-Cookie" not in received_headers
    assert "WWW-Authenticate" not in received_headers
    assert_clean(body, received_headers)
    seen = upstream.seen[0]["headers"]
    assert seen["authorization"] == AUTH
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-custom"] == "kept"
    for absent in ("cookie", "x-api-key", "x-hop", "origin"):
        assert absent not in seen
    assert setup.token not in upstream.everything_seen()


async def test_http_head_and_post_bodies(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        setup.url("/proxy/echo/http/http/reflect"), headers=setup.bearer(), data=b"hello"
    ) as r:
        assert r.status == 200
        assert (await r.json())["body"] == "hello"

    async def chunked() -> AsyncIterator[bytes]:
        yield b"chunked "
        yield b"body"

    async with http.put(
        setup.url("/proxy/echo/http/http/reflect"), headers=setup.bearer(), data=chunked()
    ) as r:
        assert (await r.json())["body"] == "chunked body"
    async with http.head(setup.url("/proxy/echo/http/http/reflect"), headers=setup.bearer()) as r:
        assert r.status == 200
        assert await r.read() == b""


async def test_http_body_cap_is_413(setup: Setup, upstream: Upstream, http: aiohttp.ClientSession) -> None:
    big = b"x" * (MAX_BODY + 1)
    async with http.post(setup.url("/proxy/echo/http/http/reflect"), headers=setup.bearer(), data=big) as r:
        assert (r.status, (await r.json())["error"]) == (413, "body_too_large")
    assert upstream.seen == []  # refused on Content-Length, before the upstream

    async def streamed() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * 600

    async with http.post(
        setup.url("/proxy/echo/http/http/reflect"), headers=setup.bearer(), data=streamed()
    ) as r:
        assert r.status == 413


async def test_http_body_is_streamed_and_scrubbed_across_chunks(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(setup.url("/proxy/echo/http/http/chunks"), headers=setup.bearer()) as response:
        body = await response.read()
    assert body == b"start [redacted] end [redacted]"


async def test_http_upstream_timeout_is_504_and_death_mid_body_is_not_a_complete_body(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(setup.url("/proxy/slow/http/http/slow"), headers=setup.bearer()) as response:
        assert (response.status, (await response.json())["error"]) == (504, "gateway_timeout")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(setup.url("/proxy/echo/http/http/die"), headers=setup.bearer()) as response:
            await response.read()


async def test_http_redirect_points_back_through_the_relay(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        setup.url("/proxy/echo/http/http/redirect"), headers=setup.bearer(), allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/proxy/echo/http/http/reflect?from=redirect"


# --- browsers: cookie sessions ----------------------------------------------------------------------------


async def login(setup: Setup, http: aiohttp.ClientSession, token: str) -> tuple[str, str]:
    """Log in like the web UI; return (cookie value, CSRF token)."""
    async with http.post(setup.url("/api/auth/login"), json={"token": token}) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
        cookie = response.cookies["wardgate_session"].value
    remember(cookie, body["csrfToken"])
    return cookie, body["csrfToken"]


async def test_browser_cookie_session_through_every_relay(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    cookie, csrf = await login(setup, http, setup.daemon.pairing_token())
    origin = setup.daemon.http
    jar = {"Cookie": f"wardgate_session={cookie}"}
    async with http.ws_connect(setup.url("/proxy/echo/ws/ws/echo"), headers={**jar, "Origin": origin}) as ws:
        assert await ws.receive_str(timeout=5) == "hello, you sent [redacted]"
    async with http.get(setup.url("/proxy/echo/sse/sse/hold"), headers={**jar, "Origin": origin}) as response:
        assert (await response.content.readuntil(b"\n\n")) == b"data: first [redacted]\n\n"
    async with http.get(setup.url("/proxy/echo/http/http/reflect"), headers={**jar, "Origin": origin}) as r:
        assert r.status == 200
    # A state-changing request needs the CSRF header of the login.
    async with http.post(setup.url("/proxy/echo/http/http/reflect"), headers={**jar, "Origin": origin}) as r:
        assert (r.status, (await r.json())["error"]) == (403, "csrf_failed")
    async with http.post(
        setup.url("/proxy/echo/http/http/reflect"), headers={**jar, "Origin": origin, "X-CSRF-Token": csrf}
    ) as r:
        assert r.status == 200
    # A foreign or missing Origin with a cookie is refused before anything reaches the upstream.
    count = len(upstream.seen)
    for headers in ({**jar, "Origin": "https://evil.example"}, jar):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers=headers)
        assert info.value.status == 403
    assert len(upstream.seen) == count
    everything = upstream.everything_seen()
    assert cookie not in everything
    assert csrf not in everything
    assert "wardgate_session" not in everything


# --- API keys ---------------------------------------------------------------------------------------------


async def test_api_key_reaches_the_relay_and_its_revocation_closes_the_socket(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    created = setup.daemon.cli("keys", "create", "--name", "relay test", "--role", "operator", "--json")
    data = json.loads(created.stdout)
    key, key_id = data["key"], data["id"]
    remember(key)
    ws = await http.ws_connect(setup.url("/proxy/echo/ws/ws/plain"), headers={"X-API-Key": key})
    await ws.send_str("via key")
    assert await ws.receive_str(timeout=5) == "via key"
    setup.daemon.cli("keys", "revoke", key_id)
    assert await next_close(ws) == (4401, "token revoked")
    await ws.close()
    assert key not in upstream.everything_seen()


# --- audit ---------------------------------------------------------------------------------------------


async def test_audit_events_carry_bytes_and_no_secrets_or_queries(
    setup: Setup, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(
        setup.url("/proxy/echo/ws/ws/plain?audit=marker-q"), headers=setup.bearer()
    ) as ws:
        await ws.send_str("12345")
        assert await ws.receive_str(timeout=5) == "12345"
    async with http.ws_connect(
        setup.url("/proxy/spliced/ws/ws/plain?audit=marker-q"), headers=setup.bearer()
    ) as ws:
        await ws.send_str("12345")
        assert await ws.receive_str(timeout=5) == "12345"
    async with http.get(
        setup.url("/proxy/echo/http/http/reflect?audit=marker-q"), headers=setup.bearer()
    ) as r:
        await r.read()
    audit = (setup.daemon.home / "audit.log").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    spliced = [e for e in events if e["event"] == "proxy.closed" and e.get("splice")][-1]
    assert spliced["upstream"] == "spliced"
    assert spliced["client_code"] == spliced["upstream_code"] == 1000
    assert spliced["bytes_in"] >= 5 + 6  # wire bytes: one masked frame and the close frame
    closed = [
        e for e in events if e["event"] == "proxy.closed" and e["kind"] == "ws" and not e.get("splice")
    ][-1]
    assert closed["upstream"] == "echo"
    assert closed["path"] == "/ws/plain"
    assert (closed["bytes_in"], closed["bytes_out"]) == (5, 5)
    assert closed["client_code"] == 1000
    assert "duration" in closed
    assert any(e["event"] == "proxy.connected" and e["conn"] == closed["conn"] for e in events)
    request = [e for e in events if e["event"] == "proxy.request"][-1]
    assert (request["method"], request["status"], request["upstream"]) == ("GET", 200, "echo")
    assert request["bytes_out"] > 0
    assert "marker-q" not in audit
    assert SECRET not in audit
    assert setup.token not in audit


# --- limits and in-band refusals (a daemon of their own) ---------------------------------------------------


async def test_message_rate_close_style_tls_and_shutdown(wardgate: DaemonFactory) -> None:
    """A daemon serving TLS (the splice takes over TLS sockets too), refusing in-band."""
    daemon, port = _start(
        wardgate,
        "  messages_per_principal: 5\n  message_window: 86400\n"
        "security:\n  reject_style: close\n  tls:\n    auto_cert: true\n",
    )
    base = f"https://127.0.0.1:{daemon.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        async with http.post(base + "/api/auth/exchange", json={"token": daemon.pairing_token()}) as response:
            issued = await response.json()
        remember(issued["sessionToken"], issued["refreshToken"])
        bearer = {"Authorization": f"Bearer {issued['sessionToken']}"}
        async with upstream_on(port) as state:
            # No credential: the upgrade is accepted and closed with 1008 and the reason.
            async with http.ws_connect(base + "/proxy/echo/ws/ws/plain") as ws:
                assert await next_close(ws) == (1008, "authentication_required")
            # The principal's message rate (shared with JSON-RPC) closes the relay with 4429.
            async with http.ws_connect(base + "/proxy/echo/ws/ws/plain", headers=bearer) as ws:
                for index in range(5):
                    await ws.send_str(str(index))
                    assert await ws.receive_str(timeout=5) == str(index)
                await ws.send_str("one too many")
                assert await next_close(ws) == (4429, "rate limited")
            assert (await asyncio.wait_for(state.closes.get(), 5))[0] == 1001
            # Splice mode has no per-message rate limit; shutdown closes it with 1001.
            ws = await http.ws_connect(base + "/proxy/spliced/ws/ws/plain", headers=bearer)
            for index in range(10):
                await ws.send_str(str(index))
                assert await ws.receive_str(timeout=5) == str(index)
            await ws.send_bytes(b"z" * 100_000)
            assert await ws.receive_bytes(timeout=5) == b"z" * 100_000
            # (a checked relay too; the principal is over its message rate, but just connects)
            checked = await http.ws_connect(base + "/proxy/echo/ws/ws/plain", headers=bearer)
            stopping = asyncio.ensure_future(asyncio.to_thread(daemon.stop))
            assert await next_close(ws) == (1001, "server shutting down")
            assert await next_close(checked) == (1001, "server shutting down")
            await ws.close()
            await checked.close()
            await stopping
            assert (await asyncio.wait_for(state.closes.get(), 5))[0] == 1001
            assert (await asyncio.wait_for(state.closes.get(), 5))[0] == 1001


# --- liveness and slow rate decisions (a daemon of their own) -----------------------------------------


@dataclass
class Lively:
    """A daemon with a 0.3 s heartbeat and a message rate of 5 per minute, on Redis, whose
    ``take_message`` suspends for every message (it draws its budget one message at a time)."""

    daemon: Daemon
    port: int
    bearer: dict[str, str]
    """An operator's (for the tests that send few messages)."""

    async def fresh_bearer(self) -> dict[str, str]:
        """A new device's: a message budget of its own."""
        session = (await exchange(self.daemon, self.daemon.pairing_token()))["sessionToken"]
        return {"Authorization": f"Bearer {session}"}


@pytest.fixture(scope="module")
def lively(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Lively]:
    factory = DaemonFactory(tmp_path_factory.mktemp("lively"), redis_url)
    daemon, port = _start(factory, "  heartbeat: 0.3\n  messages_per_principal: 5\n  message_window: 86400\n")
    session = asyncio.run(exchange(daemon, daemon.pairing_token()))["sessionToken"]
    yield Lively(daemon, port, {"Authorization": f"Bearer {session}"})
    factory.stop_all()


@RELAYS
async def test_a_client_that_answers_no_ping_is_dropped_and_the_upstream_told(
    lively: Lively, relay: str
) -> None:
    async with upstream_on(lively.port) as state:
        client = await RawClient.connect(lively.daemon.http, f"/proxy/{relay}/ws/ws/plain", lively.bearer)
        try:
            # Reads nothing, answers nothing: pinged after one heartbeat, dropped after two.
            assert await asyncio.wait_for(state.closes.get(), 5) == (1001, "client went away")
            _, opcode, _ = await client.frame()
            assert opcode == 0x9  # wardgate's ping, unanswered
        finally:
            client.close()


@RELAYS
async def test_an_upstream_that_answers_no_ping_is_dropped_and_the_client_gets_1011(
    lively: Lively, relay: str
) -> None:
    async with upstream_on(lively.port), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(lively.daemon.http + f"/proxy/{relay}/ws/ws/plain", headers=lively.bearer)
        await ws.send_str("go-mute")
        assert await next_close(ws) == (1011, "upstream connection lost")
        await ws.close()


@RELAYS
async def test_quiet_peers_that_answer_pings_are_kept(lively: Lively, relay: str) -> None:
    async with upstream_on(lively.port), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(lively.daemon.http + f"/proxy/{relay}/ws/ws/plain", headers=lively.bearer)
        with pytest.raises(TimeoutError):
            # Three heartbeats of silence both ways; receive() answers wardgate's pings meanwhile
            # (its own timeout would not expire: it restarts at every ping).
            await asyncio.wait_for(ws.receive(), 1.0)
        await ws.send_str("still here")
        assert await ws.receive_str(timeout=5) == "still here"
        await ws.close()


async def test_the_message_rate_counts_messages_not_frames_and_waits_for_slow_decisions(
    lively: Lively,
) -> None:
    async with upstream_on(lively.port) as state:
        client = await RawClient.connect(
            lively.daemon.http, "/proxy/echo/ws/ws/plain", await lively.fresh_bearer()
        )
        try:
            # Three messages in one write, the first in three frames with a ping among them:
            # each message waits for its own decision (a Redis round trip), in order.
            client.send(
                client_frame(0x1, b"one-", fin=False)
                + client_frame(0x9, b"p")
                + client_frame(0x0, b"in-", fin=False)
                + client_frame(0x0, b"three")
                + client_frame(0x1, b"two")
                + client_frame(0x2, b"three")
            )
            assert [await client.message() for _ in range(3)] == [
                (0x1, b"one-in-three"),
                (0x1, b"two"),
                (0x2, b"three"),
            ]
            for text in (b"four", b"five"):  # seven data frames so far, five messages
                client.send(client_frame(0x1, text))
                assert await client.message() == (0x1, text)
            client.send(client_frame(0x1, b"six"))
            assert await client.close_frame() == (4429, "rate limited")
            assert (await asyncio.wait_for(state.closes.get(), 5))[0] == 1001
        finally:
            client.close()
