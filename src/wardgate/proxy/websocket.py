"""The WebSocket relay: ``/proxy/<name>/ws/<path>``, frame by frame, checked or spliced.

Handshake: wardgate connects to the upstream FIRST and performs the upstream's handshake
itself (the upstream's configured headers; the subprotocols the client offered minus
``wardgate.bearer.*``; no extension offered and none accepted, so permessage-deflate is never
negotiated and payloads are readable), then answers the client's upgrade with its own 101,
selecting the subprotocol the upstream selected. An upstream that is down, refuses the
handshake or does not answer within its ``timeout`` is therefore an HTTP 502/504 with a JSON
body, before any upgrade.

Then both sockets are taken over by two small protocols (``_Side``): each chunk that arrives
on one goes through that side's *reader* (``frames.FrameWalker`` or
``frames.ScrubbingFramer``), and what the reader returns is written to the other socket in
``data_received``, with no task, queue or message object per frame. Client frames arrive
masked and go to the upstream masked, as a client's must; upstream frames go to the client
unmasked, as a server's must: neither needs unmasking to be passed on.

Checked (the default), per message:

* the size cap (``limits.max_message_bytes``, the fragments of a message summed), both ways:
  an oversized message is not passed on; its sender is closed with 1009;
* the principal's message rate, shared with the JSON-RPC socket (``Limits.take_message``),
  counted once per client message at its first frame; over the limit the client is closed
  with 4429 and the upstream with 1001. ``take_message`` is stepped in place; only when it
  really suspends (a Redis round trip) does the client's socket pause until it decided;
* the upstream's secrets scrubbed from text and binary payloads (and ping/pong payloads),
  also when split across the frames of a fragmented message or across network reads: a frame
  that holds no secret passes as it came, any other is re-framed. Without secrets (no
  ``scrubber.active``) the upstream's bytes pass untouched. A frame a server may not send
  (masked, RSV bits, reserved opcode) ends the relay: the client gets 1014;
* close frames are answered by wardgate (with the sender's code) and passed on with the same
  code and reason (the upstream's reason scrubbed), as a WebSocket endpoint would.

Spliced (``splice: true``): the size cap both ways and the scrubbing of the upstream's close
reason; close frames and their answers pass through end to end; no rate limit, no scrubbing
of data frames. Audit byte counts are wire bytes (frame headers included) instead of payload.

Both: pings and pongs pass through end to end. Liveness: a side from which nothing has
arrived for ``limits.heartbeat`` seconds is sent a ping of wardgate's own (its pong then
reaches the other side as an unsolicited pong, which RFC 6455 section 5.5.3 allows); if
nothing arrives within another heartbeat the side is dropped as dead, and the other side is
closed as below. A side whose reading wardgate paused (backpressure) is not idle.

Closing: when a side goes away without a close frame the other is closed, the client with
1011 "upstream connection lost", the upstream with 1001 "client went away". wardgate's own
close frames are written only at a frame boundary (otherwise the connection is dropped).
After sending a close frame wardgate reads on, discarding, until the answer; ``CLOSE_TIMEOUT``
seconds after a relay started closing, whatever is still open is dropped. Revocation closes
the client with 4401, shutdown with 1001; both close the upstream with 1001.

Backpressure: when one socket's send buffer is full, the other socket is not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

from aiohttp import web

from wardgate.errors import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_RATE_LIMITED,
    CLOSE_SESSION_EXPIRED,
    BadGateway,
    GatewayTimeout,
    InvalidRequest,
    TooManyConnections,
)
from wardgate.gate.credentials import SUBPROTOCOL, offered_subprotocols
from wardgate.proxy.frames import (
    MAX_HEAD_BYTES,
    FrameWalker,
    HandshakeRefused,
    ScrubbingFramer,
    Stop,
    accept_for,
    check_response_head,
    close_frame,
    close_payload,
    close_reason,
    new_key,
    parse_frame,
    ping_frame,
    relayed_subprotocols,
    request_head,
    response_head,
    wire_close_code,
)
from wardgate.proxy.headers import upstream_request_headers
from wardgate.proxy.state import Admitted, ProxyState
from wardgate.ratelimit import RateDecision

log = logging.getLogger("wardgate.proxy")

CLOSE_TIMEOUT: Final = 5.0
"""Seconds a relay that is closing waits for both connections to end before dropping them."""
MAX_CLOSE_FRAME: Final = 14 + 125
"""A close frame longer than this (its payload may not exceed 125 bytes) ends the relay."""
CLOSE_PROTOCOL_ERROR: Final = 1002
REASON_REVOKED: Final = "token revoked"
REASON_EXPIRED: Final = "session expired"
REASON_RATE_LIMITED: Final = "rate limited"
REASON_UPSTREAM_LOST: Final = "upstream connection lost"
REASON_UPSTREAM_TOO_BIG: Final = "upstream message too big"
REASON_UPSTREAM_PROTOCOL: Final = "upstream protocol error"
REASON_PROTOCOL: Final = "protocol error"
REASON_TOO_BIG: Final = "message too big"
REASON_CLIENT_GONE: Final = "client went away"
REASON_CLIENT_CLOSED: Final = "client connection closed"
REASON_INTERNAL: Final = "internal error"

_BACKPRESSURE: Final = 1
"""Reasons a side's reading is paused (bits): the other side's send buffer is full,"""
_RATE: Final = 2
"""the message rate decision for the message at hand is under way,"""
_HANDSHAKE: Final = 4
"""the upstream answered its handshake and the client is not accepted yet."""

Reader = FrameWalker | ScrubbingFramer
T = TypeVar("T")


def _drop(data: bytes) -> None:
    """The sink of a side whose peer is closed or closing: nothing more goes there."""


class _Side(asyncio.Protocol):
    """One of the two sockets of a relay; ``reader`` follows the frames coming FROM it."""

    def __init__(self, relay: WebSocketRelay, reader: Reader, *, upstream: bool) -> None:
        self.relay = relay
        self.upstream = upstream
        self.reader: Reader = reader
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.sink: Callable[[bytes], object] = _drop
        """Where what the reader passes goes: the peer's ``transport.write``, or nowhere."""
        self.received = 0
        """Bytes read from this socket (wire bytes)."""
        self.passed = 0
        """Data payload bytes passed on by readers this side no longer uses."""
        self.discarding = False
        self.close_sent = False
        """A close frame went to this side: nothing more may be written to it."""
        self.close_received = False
        """This side's close frame arrived: nothing more will be read from it."""
        self.lost = False
        self.paused = 0
        # Liveness (``WebSocketRelay._beat``).
        self.idle = 0
        self.mark = 0
        self.toward_mark = 0
        self.pinged = False

    # --- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.close_received:
            return
        reader = self.reader
        out = reader.feed(data)
        if out:
            self.sink(out)
        if reader.stop is not None:
            self.relay.stopped(self)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause(_BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume(_BACKPRESSURE)

    # --- flow --------------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        paused = self.paused
        self.paused = paused | reason
        if not paused and self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                self.transport.pause_reading()

    def resume(self, reason: int) -> None:
        paused = self.paused
        self.paused = paused & ~reason
        if paused and not self.paused and self.transport is not None and not self.lost:
            with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
                self.transport.resume_reading()

    def can_write_frame(self) -> bool:
        """Whether a frame written to this side now starts at a frame boundary."""
        return self.peer is None or self.peer.reader.at_boundary

    def payload(self) -> int:
        return self.passed + (0 if self.discarding else self.reader.payload)

    def discard(self) -> None:
        """Pass nothing more from this side (its peer is closed or closing); go on reading its
        frames, unchecked, to find its close frame."""
        self.sink = _drop
        if self.discarding:
            return
        self.discarding = True
        reader = self.reader
        self.passed += reader.payload
        self.resume(_BACKPRESSURE | _RATE)
        if reader.stop is Stop.CLOSE:
            return  # its close frame is being collected
        walker = FrameWalker.following(reader)
        self.reader = walker
        if reader.stop is not None and reader.rest:
            walker.feed(reader.rest)
            if walker.stop is not None:
                self.relay.stopped(self)


class _UpstreamSide(_Side):
    """The upstream's socket: first the handshake response, then frames."""

    def __init__(self, relay: WebSocketRelay, reader: Reader) -> None:
        super().__init__(relay, reader, upstream=True)
        self.head: asyncio.Future[tuple[bytes, bytes]] | None = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head is None:
            super().data_received(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES and not head.done():
                head.set_exception(HandshakeRefused())
            return
        # Frames the upstream sends right after its 101 wait until the client is accepted.
        self.pause(_HANDSHAKE)
        self.head = None
        if not head.done():
            head.set_result((bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])))
        self._buffer = bytearray()

    def connection_lost(self, exc: Exception | None) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(ConnectionResetError())
        super().connection_lost(exc)


class _ClientSide(_Side):
    """The client's socket, taken over from aiohttp after the 101; aiohttp's own protocol for
    it is told when it ends, so that aiohttp finishes the request as for any lost client."""

    def __init__(self, relay: WebSocketRelay, reader: Reader, original: asyncio.BaseProtocol) -> None:
        super().__init__(relay, reader, upstream=False)
        self.original: asyncio.BaseProtocol | None = original

    def connection_lost(self, exc: Exception | None) -> None:
        original, self.original = self.original, None
        if original is not None:
            original.connection_lost(exc)
        super().connection_lost(exc)


class WebSocketRelay:
    """One relayed WebSocket: the two sides and how it ends. A ``server.app.Live``."""

    def __init__(self, state: ProxyState, admitted: Admitted, *, checked: bool) -> None:
        self.state = state
        self.admitted = admitted
        self.checked = checked
        self.id = admitted.conn_id
        self.principal = admitted.principal
        self.client_ip = admitted.client_ip
        self.counted_as = admitted.principal.key
        limits = state.gateway.config.limits
        self.max_message = limits.max_message_bytes
        self.heartbeat = limits.heartbeat
        self.scrubber = admitted.upstream.scrubber
        upstream_reader: Reader
        if checked and self.scrubber.active:
            upstream_reader = ScrubbingFramer(self.scrubber, self.max_message)
        else:
            upstream_reader = FrameWalker(self.max_message)
        self.upstream = _UpstreamSide(self, upstream_reader)
        self.client: _ClientSide | None = None
        self.client_code: int | None = None
        """The close code the client was sent."""
        self.upstream_code: int | None = None
        """The close code the upstream was sent."""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.early = b""
        """What the upstream sent right after its 101 (passed on once the client is accepted)."""
        self.ending = False
        self._released = False
        self._timer: asyncio.TimerHandle | None = None
        self._beating: asyncio.TimerHandle | None = None
        self._take_message = state.gateway.limits.take_message
        self._take_message_now = state.gateway.limits.take_message_now
        self._verdict: tuple[int, str] | None = None
        """The close code and reason for the client when a message was refused in place."""
        self._deciding: asyncio.Future[RateDecision] | None = None

    @property
    def device_id(self) -> str | None:
        return self.principal.device_id

    # --- starting --------------------------------------------------------------------------

    def attach_client(self, transport: asyncio.Transport, original: asyncio.BaseProtocol) -> None:
        reader = FrameWalker(self.max_message, self._admit_message if self.checked else None)
        client = _ClientSide(self, reader, original)
        client.transport = transport
        upstream = self.upstream
        assert upstream.transport is not None
        client.peer, upstream.peer = upstream, client
        client.sink, upstream.sink = upstream.transport.write, transport.write
        self.client = client
        transport.set_protocol(client)
        with contextlib.suppress(RuntimeError, AttributeError, NotImplementedError):
            transport.resume_reading()

    def start(self) -> None:
        """Pass on what the upstream sent after its 101, then let bytes flow."""
        if self.early:
            self.upstream.data_received(self.early)
            self.early = b""
        self.upstream.resume(_HANDSHAKE)
        if self.heartbeat > 0:
            self._beating = asyncio.get_running_loop().call_later(self.heartbeat, self._beat)

    # --- what the readers stop at ----------------------------------------------------------

    def stopped(self, side: _Side) -> None:
        """``side``'s reader stopped at a frame it does not pass on by itself."""
        stop = side.reader.stop
        if stop is Stop.CLOSE:
            self._close_frame_progress(side)
        elif stop is Stop.HOLD:
            self._hold(side)
        elif stop is Stop.TOO_BIG:
            if side.upstream:
                self._end(
                    (CLOSE_MESSAGE_TOO_BIG, REASON_UPSTREAM_TOO_BIG), (CLOSE_MESSAGE_TOO_BIG, REASON_TOO_BIG)
                )
            else:
                self._end((CLOSE_MESSAGE_TOO_BIG, REASON_TOO_BIG), (CLOSE_GOING_AWAY, REASON_CLIENT_CLOSED))
        else:  # Stop.PROTOCOL: a frame no server may send
            self._end((CLOSE_BAD_GATEWAY, REASON_UPSTREAM_PROTOCOL), (CLOSE_PROTOCOL_ERROR, REASON_PROTOCOL))

    def _close_frame_progress(self, side: _Side) -> None:
        """More of ``side``'s close frame arrived: answer it and pass it on once it is whole."""
        rest = side.reader.rest
        frame = parse_frame(rest)
        if frame is None:
            if len(rest) > MAX_CLOSE_FRAME:
                self.abort()  # not a close frame any peer may send
            return
        side.close_received = True
        side.reader.rest = b""
        self._begin_ending()
        code, reason = close_payload(frame.payload)
        peer = side.peer
        if self.checked:
            # Like an endpoint: answer with the sender's code, pass the close on.
            sendable = wire_close_code(code)
            self._send_close(side, sendable, reason)
            if peer is not None:
                self._send_close(peer, sendable, reason)
        elif peer is not None:
            # Spliced: the close frame passes on (the upstream's with its reason scrubbed) and
            # so does its answer.
            if side.upstream:
                self._send_close(peer, None if code is None else wire_close_code(code), reason)
            else:
                self._send_close(peer, code, reason, frame=rest[: frame.size])
        self._close_if_done(side)

    def _send_close(self, to: _Side, code: int | None, reason: str, *, frame: bytes | None = None) -> None:
        """Write a close frame to ``to`` (ours, or ``frame`` passed on) and nothing after it.

        The close frame must start at a frame boundary of the stream toward ``to``; if it
        cannot, the connection is dropped instead. A reason toward the client is scrubbed.
        """
        if to.close_sent or to.lost or to.transport is None or to.transport.is_closing():
            return
        to.close_sent = True
        if to.upstream:
            self.upstream_code = code
        else:
            self.client_code = code
            reason = self.scrubber.scrub_text(reason)
        if to.can_write_frame():
            if frame is None:
                frame = close_frame(code, close_reason(reason), masked=to.upstream)
            to.transport.write(frame)
        else:
            self._abort(to)
        if to.peer is not None:
            to.peer.discard()
        self._close_if_done(to)

    @staticmethod
    def _close_if_done(side: _Side) -> None:
        """Both close frames passed ``side``'s connection: close it (the server side, wardgate
        toward the client, closes first; toward the upstream nothing more is expected)."""
        if side.close_sent and side.close_received and not side.lost and side.transport is not None:
            side.transport.close()

    # --- the message rate (checked relays) ---------------------------------------------------

    def _admit_message(self) -> bool:
        """The client reader's hook at each message: count it against the principal's rate.

        ``take_message_now`` decides without I/O when it can (the local limits, a Redis budget
        drawn earlier). Otherwise ``take_message``, a coroutine, is stepped right here, no task;
        when it does suspend, a task finishes it, and the message waits (``Stop.HOLD``) until it
        decided.
        """
        decided = self._take_message_now(self.counted_as)
        if decided is not None:
            if decided:
                return True
            self._verdict = (CLOSE_RATE_LIMITED, REASON_RATE_LIMITED)
            return False
        coro = self._take_message(self.counted_as)
        try:
            step = coro.send(None)
        except StopIteration as finished:
            if finished.value.allowed:
                return True
            self._verdict = (CLOSE_RATE_LIMITED, REASON_RATE_LIMITED)
            return False
        except Exception:
            log.exception("message rate check failed")
            self._verdict = (CLOSE_INTERNAL_ERROR, REASON_INTERNAL)
            return False
        deciding = asyncio.ensure_future(_finish(coro, step))
        deciding.add_done_callback(self._decided)
        self._deciding = deciding
        return False

    def _hold(self, side: _Side) -> None:
        verdict, self._verdict = self._verdict, None
        if verdict is not None:
            if verdict[0] == CLOSE_RATE_LIMITED:
                self.state.gateway.metrics.rate_limited.labels("messages").inc()
            self._end(verdict, (CLOSE_GOING_AWAY, REASON_CLIENT_CLOSED))
        elif self._deciding is not None:
            side.pause(_RATE)

    def _decided(self, deciding: asyncio.Future[RateDecision]) -> None:
        self._deciding = None
        client = self.client
        if self.ending or client is None or deciding.cancelled():
            return
        error = deciding.exception()
        if error is not None:
            log.error("message rate check failed", exc_info=error)
            self._end((CLOSE_INTERNAL_ERROR, REASON_INTERNAL), (CLOSE_GOING_AWAY, REASON_CLIENT_CLOSED))
            return
        if not deciding.result().allowed:
            self.state.gateway.metrics.rate_limited.labels("messages").inc()
            self._end((CLOSE_RATE_LIMITED, REASON_RATE_LIMITED), (CLOSE_GOING_AWAY, REASON_CLIENT_CLOSED))
            return
        reader = client.reader
        assert isinstance(reader, FrameWalker)
        out = reader.resume()
        if out:
            client.sink(out)
        if reader.stop is None:
            client.resume(_RATE)
        else:
            self.stopped(client)

    # --- liveness ----------------------------------------------------------------------------

    def _beat(self) -> None:
        """Every ``heartbeat`` seconds: ping a side that sent nothing since the last beat; drop
        one that still sent nothing a beat after that (or could not be pinged, with nothing
        flowing toward it either)."""
        self._beating = None
        if self.ending or self.client is None:
            return
        for side in (self.client, self.upstream):
            if side.received != side.mark or side.paused:
                side.mark, side.idle = side.received, 0
                continue
            side.idle += 1
            assert side.peer is not None
            assert side.transport is not None
            if side.idle == 1:
                side.pinged = side.can_write_frame() and not side.transport.is_closing()
                if side.pinged:
                    side.transport.write(ping_frame(masked=side.upstream))
                else:
                    side.toward_mark = side.peer.received
            elif side.pinged or side.peer.received == side.toward_mark:
                self._abort(side)  # dead: connection_lost closes the other side
                return
            else:
                side.idle = 0  # a frame is still flowing toward it: try again next beat
        self._beating = asyncio.get_running_loop().call_later(self.heartbeat, self._beat)

    # --- ending ----------------------------------------------------------------------------

    def release(self) -> None:
        """Leave the gateway's live set (which gives the caps' lease back). Idempotent."""
        if not self._released:
            self._released = True
            self.state.gateway.unregister(self)
            self.state.relays.pop(self.id, None)

    def _begin_ending(self) -> None:
        if self.ending:
            return
        self.ending = True
        # The slot is free before either side sees a close: the client may reconnect at once.
        self.release()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)
        if self._beating is not None:
            self._beating.cancel()
            self._beating = None

    def abort(self) -> None:
        """Drop both connections at once."""
        for side in (self.client, self.upstream):
            if side is not None:
                self._abort(side)

    @staticmethod
    def _abort(side: _Side) -> None:
        """Drop ``side``'s connection; nothing more is written to it, even before asyncio
        reports it lost (uvloop refuses writes to a transport it closed)."""
        if side.peer is not None:
            side.peer.sink = _drop
        if side.transport is not None and not side.lost:
            side.transport.abort()

    def _end(self, to_client: tuple[int, str], to_upstream: tuple[int, str]) -> None:
        """Close both sides with our own close frames."""
        self._begin_ending()
        if self.client is not None:
            self._send_close(self.client, *to_client)
        self._send_close(self.upstream, *to_upstream)

    def lost(self, side: _Side) -> None:
        """One socket ended: end the other (with a close frame if it was not a clean close)."""
        peer = side.peer
        if peer is not None and not peer.lost:
            if not side.close_received and not peer.close_sent:
                self._begin_ending()
                if side.upstream:
                    self._send_close(peer, CLOSE_INTERNAL_ERROR, REASON_UPSTREAM_LOST)
                else:
                    self._send_close(peer, CLOSE_GOING_AWAY, REASON_CLIENT_GONE)
            peer.discard()
        if self.client is not None and self.client.lost and self.upstream.lost:
            self._finish()  # (a relay whose client was never attached failed its handshake)

    def _finish(self) -> None:
        if self.done.done():
            return
        for timer in (self._timer, self._beating):
            if timer is not None:
                timer.cancel()
        self._timer = self._beating = None
        if self._deciding is not None:
            self._deciding.cancel()
        self.release()
        client, upstream = self.client, self.upstream
        assert client is not None
        if self.checked:
            bytes_in, bytes_out = client.payload(), upstream.payload()
        else:
            bytes_in, bytes_out = client.received, upstream.received
        self.state.gateway.audit(
            "proxy.closed",
            kind="ws",
            splice=None if self.checked else True,
            **self.admitted.audit_fields(),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration=round(time.monotonic() - self.admitted.started, 3),
            client_code=self.client_code,
            upstream_code=self.upstream_code,
        )
        self.done.set_result(None)

    # --- Live --------------------------------------------------------------------------------

    async def revoke(self) -> None:
        self.state.gateway.audit("session.closed_revoked", device=self.device_id, ip=self.client_ip)
        await self.close(CLOSE_SESSION_EXPIRED, REASON_REVOKED)

    async def expire(self) -> None:
        if self.ending:
            return  # ended meanwhile, for another reason
        self.state.gateway.audit("session.expired", device=self.device_id, ip=self.client_ip)
        await self.close(CLOSE_SESSION_EXPIRED, REASON_EXPIRED)

    async def close(self, code: int, reason: str) -> None:
        """Close the client with ``code`` and the upstream with 1001; wait (bounded) for the end."""
        self._end((code, reason), (CLOSE_GOING_AWAY, REASON_CLIENT_CLOSED))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * CLOSE_TIMEOUT):
                await asyncio.shield(self.done)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], step: Any) -> Generator[Any, Any, T]:
    """Go on with ``coro``, whose first step (``coro.send(None)``) yielded ``step``: what
    ``await coro`` would have done from there, for the task that runs this."""
    while True:
        try:
            sent = yield step
        except BaseException as exc:  # thrown in by the task (cancellation): pass it on
            try:
                step = coro.throw(exc)
            except StopIteration as finished:
                return cast(T, finished.value)
        else:
            try:
                step = coro.send(sent)
            except StopIteration as finished:
                return cast(T, finished.value)


async def _finish(coro: Coroutine[Any, Any, T], step: Any) -> T:
    return await _resume(coro, step)


# --- the handshakes ----------------------------------------------------------------------------------


async def relay_websocket(state: ProxyState, admitted: Admitted, request: web.Request) -> web.StreamResponse:
    """Handshake with the upstream, take over the client's socket, relay until both end;
    refusals before the upgrade raise WardgateError."""
    gateway = state.gateway
    upstream = admitted.upstream
    offered = request.headers.get("Sec-WebSocket-Protocol")
    if not web.WebSocketResponse(protocols=tuple(offered_subprotocols(offered))).can_prepare(request).ok:
        raise InvalidRequest(hint="expected a WebSocket upgrade")
    if state.closing:
        raise TooManyConnections(hint="the server is shutting down")
    checked = not upstream.settings.splice
    relay = WebSocketRelay(state, admitted, checked=checked)
    selected = await _connect(state, admitted, request, relay, relayed_subprotocols(offered))
    if selected is None and SUBPROTOCOL in offered_subprotocols(offered):
        selected = SUBPROTOCOL  # a browser fails a handshake that selects none it offered
    transport = request.transport
    if transport is None or transport.is_closing():
        _drop_upstream(relay)
        raise ConnectionResetError  # the client is gone
    original = transport.get_protocol()
    # No await between the 101 and the takeover: every byte after the 101 reaches the relay.
    transport.write(response_head(accept_for(request.headers["Sec-WebSocket-Key"]), selected))
    relay.attach_client(transport, original)
    state.relays[relay.id] = relay
    gateway.register(relay)
    gateway.audit("proxy.connected", kind="ws", splice=None if checked else True, **admitted.audit_fields())
    log.info("relay opened", extra={"upstream": upstream.name, "kind": "ws", "ip": admitted.client_ip})
    relay.start()
    try:
        await asyncio.shield(relay.done)
    finally:
        if not relay.done.done():  # this handler was cancelled
            relay.abort()
        log.info("relay closed", extra={"upstream": upstream.name, "kind": "ws", "code": relay.client_code})
    # The client's socket is closed and aiohttp was told so: this answer is never written.
    return web.StreamResponse(status=101)


async def _connect(
    state: ProxyState, admitted: Admitted, request: web.Request, relay: WebSocketRelay, protocols: list[str]
) -> str | None:
    """Open the upstream connection and complete its handshake; the selected subprotocol."""
    upstream = admitted.upstream
    origin = urlsplit(upstream.origin)
    secure = origin.scheme == "https"
    host = origin.hostname or ""
    headers = upstream_request_headers(
        request.headers.items(),
        injected=upstream.headers,
        client_ip=admitted.client_ip,
        proto=request.scheme,
        host=request.host,
    )
    target = upstream.base_path + admitted.path.raw + (f"?{admitted.query}" if admitted.query else "")
    key = new_key()
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(upstream.settings.timeout):
            await loop.create_connection(
                lambda: relay.upstream,
                host,
                origin.port or (443 if secure else 80),
                ssl=(upstream.tls or state.ssl_context()) if secure else None,
                server_hostname=host if secure else None,
            )
            assert relay.upstream.transport is not None
            assert relay.upstream.head is not None
            relay.upstream.transport.write(
                request_head(target, origin.netloc, key, protocols, headers.items())
            )
            head, relay.early = await relay.upstream.head
        return check_response_head(head, key, protocols)
    except TimeoutError:
        _drop_upstream(relay)
        raise GatewayTimeout(hint="the upstream did not accept the WebSocket in time") from None
    except HandshakeRefused:
        _drop_upstream(relay)
        raise BadGateway(hint="the upstream refused the WebSocket handshake") from None
    except (OSError, ssl.SSLError, ValueError):
        _drop_upstream(relay)
        raise BadGateway(hint="the upstream cannot be reached") from None


def _drop_upstream(relay: WebSocketRelay) -> None:
    transport = relay.upstream.transport
    if transport is not None:
        transport.abort()
