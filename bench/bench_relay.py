"""WebSocket relay throughput and per-message latency: wardgate against nginx, same upstream.

DESIGN.md targets: relay throughput of small messages >= 0.8x nginx proxying the same
upstream (splice mode >= 1.0x); added latency per relayed message p50 <= 100 µs at low load.

Everything runs on loopback, each piece in its own process:

* the upstream: an aiohttp WebSocket echo server on uvloop (this file, ``--serve-upstream``)
  that refuses any upgrade without ``Authorization: Bearer <secret>``; the secret is random
  per run and only the proxies (and the ``direct`` path) know it;
* nginx (Debian's), in the foreground with a config generated into the run's temporary
  directory (``nginx -p TMP -c TMP/nginx.conf -g 'daemon off;'``; ``worker_processes 1``,
  access log off, error log, pid and temp paths in TMP) proxying ``/proxy/bench/ws/`` to the
  upstream with ``proxy_http_version 1.1``, the Upgrade/Connection headers,
  ``proxy_set_header Authorization "Bearer <secret>"`` and ``proxy_buffering off``;
* one ``wardgate serve`` (authenticated mode, audit log off, logging at ``warning``, message
  rate and connection limits raised) with two upstreams on the same echo server: ``bench``
  (the normal relay) and ``splice`` (``splice: true``), the secret injected from
  ``${UPSTREAM_TOKEN}``; the client sends ``Authorization: Bearer <session token>``
  (``wardgate pair --json`` + ``POST /api/auth/exchange``);
* two reference relays (``--no-references`` leaves them out), no checks at all, to show
  what the building blocks cost: ``aiohttp relay`` (this file, ``--serve-aiohttp-relay``:
  aiohttp server + ``ws_connect``, one task per direction, receive then ``send_frame``:
  the least a relay built like wardgate's does) and ``uvloop byte pipe``
  (``--serve-byte-pipe``: rewrites the request head, then copies bytes between the two
  sockets in ``data_received``: a splice at the transport level, like nginx's);
* the client: a fresh process per measurement (this file, ``--client``, spec on stdin),
  a minimal RFC 6455 client on raw sockets (pre-masked frames, header-only parsing), so
  that it costs far less per message than any path it measures and never shares an event
  loop with a server.

Paths, all reaching the same upstream path ``/echo``: ``direct`` (client to upstream, the
reference), ``nginx``, the two reference relays, ``wardgate`` and ``wardgate splice``. A
warm-up pass runs each path once; then each round runs every path in turn (the order
alternates between rounds) and measures

1. throughput: C connections, each keeping W text messages outstanding (a new message per
   echo received, written in one batch per read), echoes counted over a fixed time after a
   short warm-up; also the CPU time (``/proc/<pid>/stat``) the proxy process(es) and the
   upstream spent per echoed message, and how busy the client was;
2. latency: one connection, one message at a time (send, await its echo), N round trips
   after N/10 warm-up ones; p50 and p99, and the proxy's CPU time per round trip. The
   added latency of a proxy = its p50 (p99) minus the direct p50 (p99) of the same round.

Reported: medians over rounds; throughput as the median of per-round ratios to nginx (and
to direct); added latency. The client, the proxy and the upstream share the machine's
cores (2 on the reference box), so throughput is bounded by all three: the proxy CPU per
message column is the proxy-only view. Exits non-zero only if something crashes, or with
2 and an installation hint if nginx is missing.

    .venv/bin/python bench/bench_relay.py [--quick] [--rounds 5] [--seconds 2] [--warmup 0.3]
        [--connections 4] [--window 16] [--pings 2000] [--size 64] [--no-references]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from bench_handshake import BenchDaemon
# bench_handshake (and with it aiohttp) is imported only where needed: the client process
# starts once per measurement and needs neither.

TARGET_RELAY = 0.8
TARGET_SPLICE = 1.0
TARGET_ADDED_P50_US = 100.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")
SECRET_ENV = "BENCH_RELAY_UPSTREAM_SECRET"  # noqa: S105 (a variable's name, not a secret)
UPSTREAM_PATH = "/echo"
WARDGATE_ENV = {
    # with bench_handshake.BENCH_ENV (limits raised, audit off, logging at warning)
    "WARDGATE_LIMITS_MAX_CONNECTIONS": "100000",
    # Sessions outlive the run (the default 300 s could end one during a long run).
    "WARDGATE_SECURITY_TOKEN_SESSION_EXPIRY": "3600",
}
# limits.messages_per_principal is per message_window (10 s): far above any rate here.
WARDGATE_CONFIG = """\
limits:
  messages_per_principal: 1000000000
upstreams:
  bench:
    url: http://127.0.0.1:{port}
    headers: {{Authorization: "Bearer ${{UPSTREAM_TOKEN}}"}}
    max_connections_per_user: 10000
    splice: false
  splice:
    url: http://127.0.0.1:{port}
    headers: {{Authorization: "Bearer ${{UPSTREAM_TOKEN}}"}}
    max_connections_per_user: 10000
    splice: true
"""
NGINX_CONF = """\
# Generated by bench/bench_relay.py for one run; lives in the run's temporary directory.
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port};

        location /proxy/bench/ws/ {{
            proxy_pass http://127.0.0.1:{upstream_port}/;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Authorization "Bearer {secret}";
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""
NGINX_MISSING = """\
bench_relay: nginx not found (looked for `nginx` on PATH and /usr/sbin/nginx).
It compares wardgate with Debian's nginx proxying the same upstream; install it with

    sudo apt-get update && sudo apt-get install -y nginx

The benchmark starts its own nginx in the foreground with a generated config in a
temporary directory; the system service need not run (`systemctl disable --now nginx`)."""

# RFC 6455 section 5.2 opcodes.
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


# --------------------------------------------------------------------------------------------
# The client's WebSocket codec: just enough RFC 6455 to echo small messages cheaply.


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame as a client must send it: masked (RFC 6455 section 5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return head + mask + masked


CLOSE_FRAME = client_frame(OP_CLOSE, (1000).to_bytes(2, "big"))


def parse_frames(buf: bytearray, want_data: bool) -> tuple[int, int, list[tuple[int, bytes]]]:
    """Complete server frames at the start of ``buf``: (bytes consumed, data messages
    completed, [(opcode, payload)] of every control frame, and of data frames if
    ``want_data``). Server frames are unmasked (section 5.1)."""
    pos, size, messages = 0, len(buf), 0
    frames: list[tuple[int, bytes]] = []
    while size - pos >= 2:
        first, second = buf[pos], buf[pos + 1]
        if second & 0x80:
            raise RuntimeError("the server sent a masked frame")
        length, head = second & 0x7F, 2
        if length == 126:
            if size - pos < 4:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if size - pos < 10:
                break
            length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        end = pos + head + length
        if end > size:
            break
        opcode = first & 0x0F
        if opcode >= OP_CLOSE:
            frames.append((opcode, bytes(buf[pos + head : end])))
        else:
            if first & 0x80:
                messages += 1
            if want_data:
                frames.append((opcode, bytes(buf[pos + head : end])))
        pos = end
    return pos, messages, frames


@dataclass
class Target:
    """One way to reach the upstream's echo: where to connect, what to send."""

    name: str
    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    cpu_pids: list[int] = field(default_factory=list)
    """The proxy's processes, whose CPU time is charged to the relayed messages."""


def upgrade_request(target: Target) -> tuple[bytes, str]:
    """The HTTP/1.1 upgrade request (RFC 6455 section 4.1) and the accept value to expect."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: 127.0.0.1:{target.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in target.headers.items()),
    ]
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()  # noqa: S324
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), accept


def check_upgrade_response(head: bytes, accept: str) -> str | None:
    """None if ``head`` (up to the blank line) is a valid 101 for our key, else why not."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        return f"upgrade refused: {lines[0]!r}"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("sec-websocket-accept") != accept:
        return "upgrade answered with a wrong Sec-WebSocket-Accept"
    return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# Client process: throughput (asyncio protocol on uvloop) and latency (one blocking socket).


class Pump(asyncio.Protocol):
    """One connection keeping ``window`` messages outstanding: every echo received is
    answered with a new message, written in one batch per read."""

    def __init__(self, target: Target, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.request, self.accept = upgrade_request(target)
        self.payload = payload
        self.frame = client_frame(OP_TEXT, payload)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.verified = False
        self.pumping = False
        self.received = 0
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.request)

    def _fail(self, why: str) -> None:
        for future in (self.ready, self.done):
            if not future.done():
                future.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            problem = check_upgrade_response(bytes(self.buf[:end]), self.accept)
            if problem:
                self._fail(problem)
                return
            del self.buf[: end + 4]
            self.upgraded = True
            self.transport.write(self.frame)  # the first echo is checked, not counted
        consumed, messages, frames = parse_frames(self.buf, not self.verified)
        del self.buf[:consumed]
        for opcode, body in frames:
            if opcode == OP_PING:
                self.transport.write(client_frame(OP_PONG, body))
            elif opcode == OP_CLOSE:
                if not self.done.done():
                    self.done.set_result(None)
                self.transport.close()
                if not self.ready.done():
                    self._fail(f"closed by the server before the first echo: {body!r}")
                return
            elif opcode != OP_PONG and not self.verified:
                if body != self.payload:
                    self._fail("the echo differs from the message sent")
                    return
                self.verified = True
                messages -= 1
                self.ready.set_result(None)
        if self.pumping and messages:
            self.received += messages
            self.transport.write(self.frame * messages)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._fail(f"connection lost before the first echo ({exc or 'EOF'})")
        if not self.done.done():
            self.done.set_result(None)

    def start(self, window: int) -> None:
        assert self.transport is not None
        self.pumping = True
        self.transport.write(self.frame * window)

    def stop(self) -> None:
        """Stop refilling the window and begin the closing handshake."""
        assert self.transport is not None
        self.pumping = False
        if not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)


async def measure_throughput(spec: dict[str, Any]) -> dict[str, float]:
    target = Target(**spec["target"])
    payload = b"x" * spec["size"]
    loop = asyncio.get_running_loop()
    pumps = [Pump(target, payload) for _ in range(spec["connections"])]
    for pump in pumps:
        await loop.create_connection(lambda pump=pump: pump, "127.0.0.1", target.port)  # type: ignore[misc]
    await asyncio.wait_for(asyncio.gather(*(pump.ready for pump in pumps)), 30)
    for pump in pumps:
        pump.start(spec["window"])
    await asyncio.sleep(spec["warmup"])
    pids = [*target.cpu_pids, spec["upstream_pid"]]
    count0 = sum(pump.received for pump in pumps)
    proxy0, upstream0, own0 = cpu_seconds(target.cpu_pids), cpu_seconds(pids[-1:]), own_cpu_seconds()
    started = time.perf_counter()
    await asyncio.sleep(spec["seconds"])
    elapsed = time.perf_counter() - started
    count = sum(pump.received for pump in pumps) - count0
    proxy, upstream = cpu_seconds(target.cpu_pids) - proxy0, cpu_seconds(pids[-1:]) - upstream0
    own = own_cpu_seconds() - own0
    for pump in pumps:
        pump.stop()
    await asyncio.wait([pump.done for pump in pumps], timeout=5)
    for pump in pumps:
        if pump.transport is not None:
            pump.transport.close()
    if count == 0:
        raise RuntimeError(f"{target.name}: no echo during the measurement")
    return {
        "rate": count / elapsed,
        "proxy_cpu_us": proxy / count * 1e6,
        "upstream_cpu_us": upstream / count * 1e6,
        "client_busy": own / elapsed,
    }


def measure_latency(spec: dict[str, Any]) -> dict[str, float]:
    target = Target(**spec["target"])
    payload = b"x" * spec["size"]
    frame = client_frame(OP_TEXT, payload)
    request, accept = upgrade_request(target)
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        buf = bytearray()
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed during the upgrade")
            buf += chunk
        problem = check_upgrade_response(bytes(buf[:end]), accept)
        if problem:
            raise RuntimeError(problem)
        del buf[: end + 4]
        samples: list[int] = []
        total = spec["warmup_pings"] + spec["pings"]
        clock = time.perf_counter_ns
        proxy_cpu = 0.0
        for index in range(total):
            if index == spec["warmup_pings"]:
                proxy_cpu = cpu_seconds(target.cpu_pids)
            started = clock()
            sock.sendall(frame)
            while True:
                consumed, messages, frames = parse_frames(buf, index == 0)
                del buf[:consumed]
                for opcode, body in frames:
                    if opcode == OP_PING:
                        sock.sendall(client_frame(OP_PONG, body))
                    elif opcode == OP_CLOSE:
                        raise RuntimeError(f"closed by the server: {body!r}")
                    elif opcode != OP_PONG and body != payload:
                        raise RuntimeError("the echo differs from the message sent")
                if messages:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("connection closed")
                buf += chunk
            if index >= spec["warmup_pings"]:
                samples.append(clock() - started)
        proxy_cpu = cpu_seconds(target.cpu_pids) - proxy_cpu
        sock.sendall(CLOSE_FRAME)
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_us": cuts[49] / 1e3,
        "p99_us": cuts[98] / 1e3,
        "proxy_cpu_us": proxy_cpu / len(samples) * 1e6,
    }


def client_main() -> int:
    """``--client``: one measurement as specified by the JSON on stdin; a JSON line out."""
    spec = json.loads(sys.stdin.read())
    latency = spec["kind"] == "latency"
    result = measure_latency(spec) if latency else run_loop(measure_throughput(spec))
    print(json.dumps(result), flush=True)
    return 0


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop if installed, as wardgate and the upstream do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------------------------
# Upstream process: aiohttp echo server that wants the bearer secret.


def upstream_main(port: int) -> int:
    """``--serve-upstream``: the echo server every path reaches."""
    from aiohttp import WSMsgType, web

    expected = f"Bearer {os.environ[SECRET_ENV]}".encode()

    async def echo(request: web.Request) -> web.StreamResponse:
        supplied = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(supplied, expected):
            raise web.HTTPUnauthorized(text="bearer secret required")
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print(f"upstream listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    run_loop(serve())
    return 0


def aiohttp_relay_main(port: int, upstream_port: int) -> int:
    """``--serve-aiohttp-relay``: the reference row "aiohttp relay", the least a relay built
    on aiohttp does (what wardgate's relay is built on): connect upstream with the secret,
    accept, then one task per direction, receive a message and send it on as a frame of the
    same type (text left undecoded: ``decode_text=False`` + ``send_frame``). No gate, no
    checks, no limits, no heartbeat; the same event loop and library as wardgate."""
    from aiohttp import ClientSession, ClientWebSocketResponse, TCPConnector, WSMsgType, web

    authorization = {"Authorization": f"Bearer {os.environ[SECRET_ENV]}"}
    session_key = web.AppKey("session", ClientSession)

    async def forward(
        source: web.WebSocketResponse[Any] | ClientWebSocketResponse[Any],
        sink: web.WebSocketResponse[Any] | ClientWebSocketResponse[Any],
    ) -> None:
        async for message in source:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await sink.send_frame(message.data, message.type)
        await sink.close()

    async def relay(request: web.Request) -> web.StreamResponse:
        url = f"http://127.0.0.1:{upstream_port}/{request.match_info['tail']}"
        session = request.app[session_key]
        async with session.ws_connect(url, headers=authorization, decode_text=False, compress=0) as upstream:
            ws = web.WebSocketResponse(compress=False, decode_text=False)
            await ws.prepare(request)
            tasks = {asyncio.create_task(forward(ws, upstream)), asyncio.create_task(forward(upstream, ws))}
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        return ws

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/proxy/bench/ws/{tail:.*}", relay)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        app[session_key] = ClientSession(connector=TCPConnector(limit=0))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        print(f"aiohttp relay listening on http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await app[session_key].close()

    run_loop(serve())
    return 0


class PipeSide(asyncio.Protocol):
    """One socket of the byte pipe: what arrives is written to the peer's socket as is;
    when this socket's send buffer fills, the peer stops being read (backpressure)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: PipeSide | None = None
        self.pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class PipeClientSide(PipeSide):
    """The client's socket: read the request head, rewrite it for the upstream (path prefix
    off, the client's Authorization replaced by the secret), connect, then pipe bytes."""

    def __init__(self, upstream_port: int, authorization: bytes) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.authorization = authorization
        self.head_seen = False
        self.connecting: asyncio.Task[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.head_seen:
            super().data_received(data)
            return
        self.pending += data
        end = self.pending.find(b"\r\n\r\n")
        if end < 0:
            return
        self.head_seen = True
        lines = bytes(self.pending[:end]).split(b"\r\n")
        rest = bytes(self.pending[end + 4 :])
        method, target, version = lines[0].split(b" ", 2)
        target = target.removeprefix(b"/proxy/bench/ws")
        kept = [line for line in lines[1:] if not line.lower().startswith(b"authorization:")]
        head = [b" ".join((method, target, version)), *kept, self.authorization]
        self.pending = bytearray(b"\r\n".join(head) + b"\r\n\r\n" + rest)
        self.connecting = asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        upstream = PipeSide()
        upstream.peer = self
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: upstream, "127.0.0.1", self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert upstream.transport is not None
        self.peer = upstream
        upstream.transport.write(bytes(self.pending))
        self.pending.clear()


def byte_pipe_main(port: int, upstream_port: int) -> int:
    """``--serve-byte-pipe``: the reference row "uvloop byte pipe", a splice at the transport
    level: after rewriting the request head it copies bytes both ways in ``data_received``,
    no WebSocket parsing, no task per direction. What a Python relay on uvloop costs at
    the least; no checks at all."""
    authorization = f"Authorization: Bearer {os.environ[SECRET_ENV]}".encode()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: PipeClientSide(upstream_port, authorization), "127.0.0.1", port
        )
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        bound = server.sockets[0].getsockname()[1]
        print(f"byte pipe listening on http://127.0.0.1:{bound}", flush=True)
        async with server:
            await stop.wait()

    run_loop(serve())
    return 0


# --------------------------------------------------------------------------------------------
# The run: processes, rounds, table.


@dataclass
class ServerProcess:
    """One of this file's servers (``--serve-upstream``, ``--serve-aiohttp-relay``) as a
    subprocess; like ``wardgate serve`` it prints ``listening on http://127.0.0.1:PORT``."""

    name: str
    root: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log_path = self.root / f"{self.name.replace(' ', '-')}.log"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *self.args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Nginx:
    """nginx in the foreground with a generated config under ``root``."""

    binary: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, upstream_port: int, secret: str, timeout: float = 15.0) -> Nginx:
        self.port = free_port()
        conf = self.root / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(tmp=self.root, port=self.port, upstream_port=upstream_port, secret=secret)
        )
        conf.chmod(0o600)
        log = self.root / "nginx-stderr.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                error_log = self.root / "nginx-error.log"
                errors = error_log.read_text(errors="replace") if error_log.exists() else ""
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{log.read_text()}{errors}")
            if self.workers():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("nginx did not start in time")

    def workers(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *self.workers()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def run_client(spec: dict[str, Any]) -> dict[str, float]:
    """One measurement in a fresh client process."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--client"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"client for {spec['target']['name']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def probe(target: Target) -> str | None:
    """None if ``target`` upgrades and echoes, else why not (the relay may not exist yet)."""
    try:
        measure_latency({"target": asdict(target), "size": 8, "warmup_pings": 0, "pings": 2})
    except (OSError, RuntimeError) as exc:
        return f"{target.name}: {exc}"
    return None


async def _session_token(daemon: BenchDaemon) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        return await daemon.obtain_session(http)


@dataclass
class Row:
    """Everything measured for one path, one entry per round."""

    target: Target
    rate: list[float] = field(default_factory=list)
    proxy_cpu: list[float] = field(default_factory=list)
    upstream_cpu: list[float] = field(default_factory=list)
    client_busy: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    idle_cpu: list[float] = field(default_factory=list)
    """Proxy CPU per echo during the latency run (one message at a time)."""
    p99: list[float] = field(default_factory=list)
    to_nginx: list[float] = field(default_factory=list)
    to_direct: list[float] = field(default_factory=list)
    added_p50: list[float] = field(default_factory=list)
    added_p99: list[float] = field(default_factory=list)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_rounds(args: argparse.Namespace, targets: list[Target], upstream_pid: int) -> list[Row]:
    rows = {target.name: Row(target) for target in targets}

    def spec(target: Target, kind: str, **extra: Any) -> dict[str, Any]:
        return {
            "kind": kind,
            "target": asdict(target),
            "size": args.size,
            "upstream_pid": upstream_pid,
            **extra,
        }

    def throughput(target: Target, seconds: float, warmup: float) -> dict[str, float]:
        return run_client(
            spec(
                target,
                "throughput",
                connections=args.connections,
                window=args.window,
                seconds=seconds,
                warmup=warmup,
            )
        )

    for target in targets:  # warm-up: first connections, imports, caches
        throughput(target, 0.5, 0.2)
    for rnd in range(args.rounds):
        order = targets if rnd % 2 == 0 else targets[::-1]
        this_round: dict[str, tuple[float, float, float]] = {}
        for target in order:
            tput = throughput(target, args.seconds, args.warmup)
            lat = run_client(spec(target, "latency", pings=args.pings, warmup_pings=args.pings // 10))
            row = rows[target.name]
            row.rate.append(tput["rate"])
            row.proxy_cpu.append(tput["proxy_cpu_us"])
            row.upstream_cpu.append(tput["upstream_cpu_us"])
            row.client_busy.append(tput["client_busy"])
            row.p50.append(lat["p50_us"])
            row.p99.append(lat["p99_us"])
            row.idle_cpu.append(lat["proxy_cpu_us"])
            this_round[target.name] = (tput["rate"], lat["p50_us"], lat["p99_us"])
            proxy = f"({tput['proxy_cpu_us']:5.1f} µs proxy CPU)" if target.cpu_pids else " " * 22
            print(
                f"  round {rnd + 1} {target.name:<16} {tput['rate']:7.0f} msg/s {proxy}   "
                f"RTT p50 {lat['p50_us']:6.1f} µs  p99 {lat['p99_us']:7.1f} µs",
                flush=True,
            )
        base_rate, base_p50, base_p99 = this_round["direct"]
        nginx_rate = this_round["nginx"][0]
        for name, (rate, p50, p99) in this_round.items():
            rows[name].to_nginx.append(rate / nginx_rate)
            rows[name].to_direct.append(rate / base_rate)
            rows[name].added_p50.append(p50 - base_p50)
            rows[name].added_p99.append(p99 - base_p99)
    return list(rows.values())


def report(args: argparse.Namespace, rows: list[Row], skipped: list[str]) -> None:
    def cpu(row: Row, values: list[float]) -> str:
        return f"{median(values):8.1f} µs" if row.target.cpu_pids else f"{'-':>11}"

    print()
    print(f"throughput: {args.connections} connections x {args.window} outstanding {args.size}-byte messages")
    print(
        f"{'path':<17} {'msg/s':>7} {'min':>7} {'max':>7} {'/nginx':>7} {'/direct':>8} "
        f"{'proxy CPU/msg':>14} {'upstream CPU':>13} {'client busy':>12}"
    )
    for row in rows:
        print(
            f"{row.target.name:<17} {median(row.rate):>7.0f} {min(row.rate):>7.0f} {max(row.rate):>7.0f} "
            f"{median(row.to_nginx):>6.2f}x {median(row.to_direct):>7.2f}x {cpu(row, row.proxy_cpu):>14} "
            f"{median(row.upstream_cpu):>10.1f} µs {median(row.client_busy) * 100:>11.0f}%"
        )
    print()
    print(f"latency: one {args.size}-byte message at a time, {args.pings} round trips per path per round")
    print(
        f"{'path':<17} {'RTT p50':>10} {'p99':>10} {'added p50':>10} {'added p99':>10} {'proxy CPU/msg':>14}"
    )
    for row in rows:
        added = (
            f"{'-':>10} {'-':>10}"
            if row.target.name == "direct"
            else f"{median(row.added_p50):>7.1f} µs {median(row.added_p99):>7.1f} µs"
        )
        print(
            f"{row.target.name:<17} {median(row.p50):>7.1f} µs {median(row.p99):>7.1f} µs {added} "
            f"{cpu(row, row.idle_cpu):>14}"
        )
    print()
    by_name = {row.target.name: row for row in rows}
    checks = [
        ("wardgate", "relay throughput", TARGET_RELAY),
        ("wardgate splice", "splice throughput", TARGET_SPLICE),
    ]
    for name, what, goal in checks:
        if name in by_name:
            ratio = median(by_name[name].to_nginx)
            verdict = "PASS" if ratio >= goal else "MISS"
            print(f"target: {what} >= {goal}x nginx: {ratio:.2f}x {verdict}")
    for name in ("wardgate", "wardgate splice"):
        if name in by_name:
            added_us = median(by_name[name].added_p50)
            verdict = "PASS" if added_us <= TARGET_ADDED_P50_US else "MISS"
            print(
                f"target: {name} added latency p50 <= {TARGET_ADDED_P50_US:g} µs: {added_us:.1f} µs {verdict}"
            )
    if "nginx" in by_name:
        print(f"(nginx adds {median(by_name['nginx'].added_p50):.1f} µs p50 on the same machine)")
        nginx_cpu = median(by_name["nginx"].proxy_cpu)
        views = [
            f"{row.target.name} {nginx_cpu / median(row.proxy_cpu):.2f}x"
            for row in rows
            if row.target.cpu_pids and row.target.name != "nginx"
        ]
        print(f"proxy-only view, nginx CPU per message / the path's: {', '.join(views)}")
    for problem in skipped:
        print(f"skipped: {problem}")
    print(
        "msg/s = echoed messages per second (each message crosses the proxy twice); ratios are\n"
        "medians of per-round ratios; CPU/msg = the process's CPU time per echoed message;\n"
        "added = the path's RTT percentile minus direct's in the same round; medians over rounds"
    )


def bench(args: argparse.Namespace, nginx_binary: str, root: Path) -> None:
    from bench_handshake import BENCH_ENV, BenchDaemon

    secret = secrets.token_urlsafe(24)
    upstream = ServerProcess("upstream", root, ["--serve-upstream"], {SECRET_ENV: secret})
    nginx = Nginx(nginx_binary, root)
    references = [
        ServerProcess("aiohttp relay", root, ["--serve-aiohttp-relay"], {SECRET_ENV: secret}),
        ServerProcess("uvloop byte pipe", root, ["--serve-byte-pipe"], {SECRET_ENV: secret}),
    ]
    wardgate = BenchDaemon("wardgate", root, env={**BENCH_ENV, **WARDGATE_ENV, "UPSTREAM_TOKEN": secret})
    skipped: list[str] = []
    try:
        upstream.start()
        nginx.start(upstream.port, secret)
        wardgate.config = WARDGATE_CONFIG.format(port=upstream.port)
        wardgate.start()
        token = asyncio.run(_session_token(wardgate))
        relayed = "/proxy/bench/ws" + UPSTREAM_PATH
        targets = [
            Target("direct", upstream.port, UPSTREAM_PATH, {"Authorization": f"Bearer {secret}"}),
            Target("nginx", nginx.port, relayed, cpu_pids=nginx.pids()),
        ]
        for reference in [] if args.no_references else references:
            reference.args += ["--upstream-port", str(upstream.port)]
            reference.start()
            targets.append(Target(reference.name, reference.port, relayed, cpu_pids=[reference.pid]))
        for target in targets:
            problem = probe(target)
            if problem is not None:
                raise RuntimeError(problem)
        bearer = {"Authorization": f"Bearer {token}"}
        for name, upstream_name in (("wardgate", "bench"), ("wardgate splice", "splice")):
            path = f"/proxy/{upstream_name}/ws{UPSTREAM_PATH}"
            target = Target(name, wardgate.port, path, bearer, [wardgate.pid])
            problem = probe(target)
            if problem is None:
                targets.append(target)
            else:
                skipped.append(problem)
                print(f"  skipped: {problem}")
        pids = [f"upstream {upstream.pid}", f"nginx {' '.join(map(str, nginx.pids()))}"]
        pids += [f"{r.name} {r.pid}" for r in references if r.proc is not None]
        print(f"  pids (for a profiler): {', '.join(pids)}, wardgate {wardgate.pid}", flush=True)
        rows = run_rounds(args, targets, upstream.pid)
    finally:
        wardgate.stop()
        for reference in references:
            reference.stop()
        nginx.stop()
        upstream.stop()
    report(args, rows, skipped)


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (``/proc/stat``), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_and_children_seconds() -> float:
    """CPU time of this process and every descendant it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds x 1 s, 1000 pings (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="throughput seconds per path per round (2)"
    )
    parser.add_argument("--warmup", type=float, default=0.3, help="seconds pumped before counting (0.3)")
    parser.add_argument("--connections", type=int, default=4, help="throughput connections (default 4)")
    parser.add_argument("--window", type=int, default=16, help="messages outstanding per connection (16)")
    parser.add_argument("--pings", type=int, default=2000, help="latency round trips per path per round")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes (default 64)")
    parser.add_argument(
        "--no-references", action="store_true", help="skip the aiohttp relay and byte pipe rows"
    )
    # Internal: the processes this file starts of itself.
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-aiohttp-relay", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-byte-pipe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main()
    if args.serve_upstream:
        return upstream_main(args.port)
    if args.serve_aiohttp_relay:
        return aiohttp_relay_main(args.port, args.upstream_port)
    if args.serve_byte_pipe:
        return byte_pipe_main(args.port, args.upstream_port)
    from bench_handshake import machine

    if args.quick:
        args.rounds, args.seconds, args.pings = 2, 1.0, 1000
    nginx_binary = find_nginx()
    if nginx_binary is None:
        print(NGINX_MISSING, file=sys.stderr)
        return 2
    version = subprocess.run([nginx_binary, "-v"], capture_output=True, text=True).stderr.strip()
    print(
        f"bench_relay: {args.rounds} rounds; throughput {args.connections} connections x window "
        f"{args.window}, {args.size}-byte text, {args.seconds:g} s per path; latency {args.pings} round trips"
    )
    print(f"machine: {machine()} (client, proxy and upstream share these cores)")
    print(f"load average (1 min) at the start: {load_average()}")
    busy0, own0, wall0 = machine_busy_seconds(), own_and_children_seconds(), time.monotonic()
    print(
        f"{version.replace('nginx version: ', '')} with worker_processes 1; upstream: aiohttp echo on uvloop"
    )
    with tempfile.TemporaryDirectory(prefix="wardgate-bench-") as tmp:
        bench(args, nginx_binary, Path(tmp))
    # Every process this run started has been waited for by now, so its CPU time is counted.
    others = machine_busy_seconds() - busy0 - (own_and_children_seconds() - own0)
    cores = os.cpu_count() or 1
    print(
        f"other processes used {max(others, 0.0) / (time.monotonic() - wall0) / cores * 100:.0f}% "
        f"of the {cores} cores during the run (this run: {time.monotonic() - wall0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
