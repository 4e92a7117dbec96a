"""WebSocket frames as the relay sees them (RFC 6455 section 5): headers walked, payloads
copied only when a secret must be cut out of them. No I/O.

A frame is a 2-byte header (FIN, RSV1-3, opcode; MASK, 7-bit length), an extended length (2
or 8 bytes) when the 7-bit length is 126 or 127, a 4-byte masking key when MASK is set, then
the payload (section 5.2). Each direction of a relayed connection is followed, chunk by chunk
as the bytes arrive, by one *reader*, which returns from each chunk what may be passed on:

* :class:`FrameWalker` reads frame headers only and passes the bytes on as they are (every
  client-to-upstream stream, and upstream-to-client when there is nothing to scrub). It checks
  the size of each data message (a text or binary frame plus its continuation frames)
  against a cap, and can ask a hook before passing on the first frame of each data message
  (the relay's per-principal message rate);
* :class:`ScrubbingFramer` follows an upstream's frames when the upstream has secrets: every
  data payload is searched in place; a frame that holds no secret (and does not end with the
  beginning of one, in a fragmented message) passes as it arrived, and any other is re-framed
  with the secrets replaced (a new header carrying the new length). Server frames are not
  masked, so there is nothing to unmask. Its guarantee: each message the client receives is
  ``Scrubber.scrub_bytes`` of the message the upstream sent, however the message was
  fragmented and however its bytes were cut into chunks by the network.

Both hold back an incomplete frame header until the rest of it arrives, so that what they
pass on always ends at a frame boundary or inside a payload whose header went out whole;
and both stop at a frame they must not pass on (``Stop``), keeping the bytes from there
(``rest``) for the caller: a close frame (the relay takes it whole and decides what to send),
a message over the cap, a message start the hook held back, or (framer) a frame a server may
not send.

Also the pure helpers of the relay's handshake (``Sec-WebSocket-Accept``, the request and
response heads) and control frame encoding.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from wardgate.gate.credentials import BEARER_SUBPROTOCOL_PREFIX, offered_subprotocols
from wardgate.proxy.scrub import Scrubber

WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
MAX_HEADER: Final = 14
MAX_CONTROL_PAYLOAD: Final = 125
"""Section 5.5: control frames carry at most 125 bytes and are never fragmented."""
MAX_HEAD_BYTES: Final = 16 * 1024
"""The largest handshake response head accepted from an upstream."""
MAX_REASON_BYTES: Final = 123
UNLIMITED: Final = 1 << 63
"""A message cap no frame length can exceed (lengths are 63-bit)."""
HOLD_FRAME_BYTES: Final = 16 * 1024
"""``ScrubbingFramer``: a frame up to this size (header included) that a chunk ends inside is
held until it is whole, so that it can pass unchanged; a longer one is re-framed as it streams."""


class Stop(Enum):
    """Why a reader stopped; ``rest`` starts with the frame it stopped at."""

    CLOSE = "close"
    """A close frame."""
    TOO_BIG = "too_big"
    """A data frame that takes its message over the cap."""
    HOLD = "hold"
    """The first frame of a data message that the ``on_message`` hook did not admit (yet)."""
    PROTOCOL = "protocol"
    """A frame a server may not send (``ScrubbingFramer`` only): masked, with RSV bits (no
    extension is ever negotiated), a reserved opcode, a fragmented or oversized control
    frame, or a continuation that continues nothing."""


def _header_size(data: bytes, pos: int) -> tuple[int, int] | None:
    """(header length, payload length) of the frame starting at ``pos``, or None if incomplete."""
    available = len(data) - pos
    if available < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    size = 6 if second & 0x80 else 2
    if length == 126:
        size += 2
        if available < size:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
    elif length == 127:
        size += 8
        if available < size:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
    elif available < size:
        return None
    return size, length


class FrameWalker:
    """Follows one direction frame header by frame header; passes the bytes on untouched."""

    __slots__ = (
        "_admitted",
        "carry",
        "max_message",
        "message",
        "on_message",
        "payload",
        "remaining",
        "rest",
        "stop",
    )

    def __init__(self, max_message: int = UNLIMITED, on_message: Callable[[], bool] | None = None) -> None:
        self.max_message = max_message
        self.on_message = on_message
        """Called at the first frame of each data message; False stops the walk there
        (``Stop.HOLD``) until ``resume``."""
        self.carry = b""
        """The beginning of a frame header that the last chunk ended in (not passed on yet)."""
        self.remaining = 0
        """Payload bytes of the current frame still to come (already announced downstream)."""
        self.message = 0
        """Payload bytes of the current data message so far (its fragments summed)."""
        self.payload = 0
        """Data payload bytes passed on (text, binary and continuation frames)."""
        self.stop: Stop | None = None
        self.rest = b""
        """After a stop: the bytes from the frame it stopped at on (and all that came since)."""
        self._admitted = False

    @classmethod
    def following(cls, reader: FrameWalker | ScrubbingFramer) -> FrameWalker:
        """A walker without cap or hook that goes on where ``reader`` is (the relay discards a
        side's frames this way, looking for its close frame). Feed it ``reader.rest`` first."""
        walker = cls()
        walker.remaining = reader.remaining
        walker.carry = reader.carry
        return walker

    @property
    def at_boundary(self) -> bool:
        """Whether what was passed on so far ends at a frame boundary (a control frame of our
        own may be written after it)."""
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        """Walk ``data``; return what may be passed on now (``data`` itself when all of it).

        After a stop, ``feed`` only appends to ``rest``.
        """
        if self.stop is not None:
            self.rest += data
            return b""
        if self.carry:
            data = self.carry + data
            self.carry = b""
        size = len(data)
        remaining = self.remaining
        if remaining >= size:  # inside one payload: the common case for large messages
            self.remaining = remaining - size
            return data
        pos = remaining
        max_message = self.max_message
        hook = self.on_message
        message = self.message
        payload = self.payload
        stop: Stop | None = None
        while pos < size:
            available = size - pos
            if available < 2:
                break
            first = data[pos]
            opcode = first & 0x0F
            if opcode == OP_CLOSE:
                stop = Stop.CLOSE
                break
            second = data[pos + 1]
            length = second & 0x7F
            header = 6 if second & 0x80 else 2
            if length >= 126:
                if length == 126:
                    header += 2
                    if available < header:
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                else:
                    header += 8
                    if available < header:
                        break
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            elif available < header:
                break
            if opcode < OP_CLOSE:  # a data frame
                if opcode:  # the first frame of a message
                    if length > max_message:
                        stop = Stop.TOO_BIG
                        break
                    if hook is not None:
                        if self._admitted:
                            self._admitted = False
                        elif not hook():
                            stop = Stop.HOLD
                            break
                    message = length
                else:
                    message += length
                    if message > max_message:
                        stop = Stop.TOO_BIG
                        break
                payload += length
            pos += header + length
        self.message = message
        self.payload = payload
        if pos > size:
            self.remaining = pos - size
            return data
        self.remaining = 0
        if stop is not None:
            self.stop = stop
            self.rest = data[pos:]
        elif pos < size:
            self.carry = data[pos:]  # an incomplete header
        else:
            return data
        return data[:pos]

    def resume(self) -> bytes:
        """Go on after ``Stop.HOLD`` (the held message is admitted): ``feed`` of the rest."""
        assert self.stop is Stop.HOLD
        rest, self.rest, self.stop = self.rest, b"", None
        self._admitted = True
        return self.feed(rest)


class ScrubbingFramer:
    """Follows an upstream's frames toward the client, cutting its secrets out of every
    payload (see the module docstring). ``at_boundary`` always holds between chunks: what it
    passes on is whole frames only."""

    __slots__ = (
        "carry",
        "fin",
        "held",
        "hold_frame",
        "max_message",
        "message",
        "opcode",
        "payload",
        "remaining",
        "rest",
        "scrubber",
        "started",
        "stop",
    )

    at_boundary: Final = True

    def __init__(self, scrubber: Scrubber, max_message: int, *, hold_frame: int = HOLD_FRAME_BYTES) -> None:
        self.scrubber = scrubber
        self.max_message = max_message
        self.hold_frame = hold_frame
        self.carry = b""
        """An incomplete header, or an incomplete frame of at most ``hold_frame`` bytes."""
        self.remaining = 0
        """Payload bytes still to come of a frame being re-framed as it streams."""
        self.fin = False
        """That frame's FIN bit."""
        self.opcode = 0
        """The opcode of the data message in progress (0: none)."""
        self.message = 0
        """Its payload bytes so far, as the upstream sent them (what the cap applies to)."""
        self.started = False
        """Whether a frame of that message went out (the next one is then a continuation)."""
        self.held = b""
        """The end of that message's payload so far that may be the beginning of a secret."""
        self.payload = 0
        """Data payload bytes passed on, after scrubbing."""
        self.stop: Stop | None = None
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """Follow ``data``; return what may be passed on now. After a stop, appends to ``rest``."""
        if data and not (self.carry or self.remaining or self.opcode) and self.stop is None:
            # The common case on its own: a chunk that is one small whole unfragmented text or
            # binary frame with no secret in it passes as it came.
            first = data[0]
            length = data[1] if len(data) > 1 else 126  # (< 126: no mask bit, a 7-bit length)
            if (first == 0x81 or first == 0x82) and length < 126 and len(data) == length + 2:
                for needle in self.scrubber.needles:
                    if data.find(needle) != -1:
                        break
                else:
                    if length <= self.max_message:
                        self.payload += length
                        return data
        return self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        if self.stop is not None:
            self.rest += data
            return b""
        if self.carry:
            data = self.carry + data
            self.carry = b""
        size = len(data)
        out: list[bytes] | None = None  # the pieces to pass on, once something is re-framed
        pos = 0
        if self.remaining:
            take = min(self.remaining, size)
            self.remaining -= take
            out = []
            self._stream(out, data[:take], final=self.fin and not self.remaining)
            pos = take
        scrubber = self.scrubber
        clean = True  # usually: then no payload in this chunk holds a secret
        for needle in scrubber.needles:
            if data.find(needle, pos) != -1:
                clean = False
                break
        max_message = self.max_message
        run = pos  # where the frames that pass unchanged began (written out in one piece)
        stop: Stop | None = None
        while pos < size:
            available = size - pos
            if available < 2:
                self.carry = data[pos:]
                break
            first = data[pos]
            second = data[pos + 1]
            opcode = first & 0x0F
            if opcode == OP_CLOSE:
                stop = Stop.CLOSE
                break
            if first & 0x70 or second & 0x80:
                stop = Stop.PROTOCOL
                break
            length = second & 0x7F
            header = 2
            if length >= 126:
                if length == 126:
                    header = 4
                    if available < 4:
                        self.carry = data[pos:]
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                else:
                    header = 10
                    if available < 10:
                        self.carry = data[pos:]
                        break
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            start = pos + header
            end = start + length
            fin = first & 0x80
            if opcode > OP_BINARY:  # a control frame, or a reserved opcode
                if opcode < OP_PING or opcode > OP_PONG or length > MAX_CONTROL_PAYLOAD or not fin:
                    stop = Stop.PROTOCOL
                    break
                if end > size:
                    self.carry = data[pos:]
                    break
                if not clean:
                    body = data[start:end]
                    scrubbed = scrubber.scrub_bytes(body)
                    if scrubbed is not body:
                        if out is None:
                            out = []
                        out.append(data[run:pos])
                        out.append(_server_frame(opcode, True, scrubbed[:MAX_CONTROL_PAYLOAD]))
                        run = end
                pos = end
                continue
            if opcode:  # the first frame of a message
                if self.opcode:
                    stop = Stop.PROTOCOL  # the previous message is not finished
                    break
                message = length
            else:
                if not self.opcode:
                    stop = Stop.PROTOCOL  # a continuation of nothing
                    break
                message = self.message + length
            if message > max_message:
                stop = Stop.TOO_BIG
                break
            if end > size and end - pos <= self.hold_frame:
                self.carry = data[pos:]  # wait for the whole frame: it may then pass as it is
                break
            self.message = message
            if opcode:
                self.opcode = opcode
                self.started = False
            if end <= size:
                if (
                    not self.held
                    and (opcode or self.started)
                    and (clean or not scrubber.occurs(data, start, end))
                    and (fin or not scrubber.holdback(data, start, end))
                ):
                    # The fast path: the frame goes out as it came.
                    self.payload += length
                    if fin:
                        self.opcode = 0
                    self.started = not fin
                    pos = end
                    continue
                if out is None:
                    out = []
                out.append(data[run:pos])
                self._stream(out, data[start:end], final=bool(fin))
                pos = run = end
                continue
            if out is None:
                out = []
            out.append(data[run:pos])
            self.remaining = end - size
            self.fin = bool(fin)
            self._stream(out, data[start:], final=False)
            pos = run = size
        if stop is not None:
            self.stop = stop
            self.rest = data[pos:]
        if out is None:
            if run == 0 and pos == size:
                return data
            return data[run:pos]
        out.append(data[run:pos])
        return b"".join(out)

    def _stream(self, out: list[bytes], segment: bytes, *, final: bool) -> None:
        """Scrub the next ``segment`` of the current message's payload (``final``: its end) and
        frame what of it is certain."""
        if self.held:
            segment = self.held + segment
        if final:
            body = self.scrubber.scrub_bytes(segment)
            self.held = b""
        else:
            body, self.held = self.scrubber.scrub_partial(segment)
            if not body:
                return
        out.append(_server_frame(OP_CONTINUATION if self.started else self.opcode, final, body))
        self.payload += len(body)
        self.started = not final
        if final:
            self.opcode = 0


def _server_frame(opcode: int, fin: bool, payload: bytes) -> bytes:
    """An unmasked frame, as a server sends it."""
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes((first, length))
    elif length < 1 << 16:
        head = bytes((first, 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + length.to_bytes(8, "big")
    return head + payload


def ping_frame(*, masked: bool) -> bytes:
    """An empty ping; ``masked`` for frames a client sends (wardgate to an upstream)."""
    if masked:
        return bytes((0x80 | OP_PING, 0x80)) + os.urandom(4)
    return bytes((0x80 | OP_PING, 0))


@dataclass(frozen=True, slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    """Unmasked."""
    size: int
    """Bytes the whole frame took."""


def parse_frame(data: bytes) -> Frame | None:
    """The first frame of ``data``, or None if ``data`` does not hold all of it yet."""
    parsed = _header_size(data, 0)
    if parsed is None:
        return None
    header, length = parsed
    if len(data) < header + length:
        return None
    payload = data[header : header + length]
    if data[1] & 0x80:
        mask = data[header - 4 : header]
        payload = _unmask(payload, mask)
    return Frame(bool(data[0] & 0x80), data[0] & 0x0F, payload, header + length)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def close_payload(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a close frame's payload (None: no code; 1005 on the wire)."""
    if len(payload) < 2:
        return None, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")


def close_frame(code: int | None, reason: bytes, *, masked: bool) -> bytes:
    """A close frame (without a code when ``code`` is None); ``masked`` for frames a client
    sends (wardgate to an upstream)."""
    payload = b"" if code is None else code.to_bytes(2, "big") + reason[:MAX_REASON_BYTES]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    mask = os.urandom(4)
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + mask + _unmask(payload, mask)


def wire_close_code(code: object) -> int:
    """A close code that may be sent in a close frame (RFC 6455 section 7.4), else 1000."""
    if isinstance(code, int) and (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return code
    return 1000


def close_reason(text: str) -> bytes:
    """``text`` as a close reason: UTF-8, cut at a character boundary to 123 bytes."""
    data = text.encode()
    if len(data) <= MAX_REASON_BYTES:
        return data
    return data[:MAX_REASON_BYTES].decode(errors="ignore").encode()


def relayed_subprotocols(header: str | None) -> list[str]:
    """The subprotocols offered to the upstream: the client's, minus wardgate credentials."""
    return [p for p in offered_subprotocols(header) if not p.startswith(BEARER_SUBPROTOCOL_PREFIX)]


# --- the handshake -----------------------------------------------------------------------------------


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()  # noqa: S324


def request_head(
    target: str, host: str, key: str, protocols: list[str], headers: Iterable[tuple[str, str]]
) -> bytes:
    """The upgrade request wardgate sends an upstream: no extensions, so frames pass as they are."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines.extend(f"{name}: {value}" for name, value in headers)
    # Header values arrive decoded as UTF-8 with surrogate escapes: this gives back their bytes.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class HandshakeRefused(Exception):
    """The upstream's answer is not an acceptable WebSocket handshake (no detail on purpose)."""


def check_response_head(head: bytes, key: str, offered: list[str]) -> str | None:
    """Check an upstream's answer to ``request_head``; return the subprotocol it selected."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[0] != "HTTP/1.1" or status[1] != "101":
        raise HandshakeRefused
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeRefused
        fields[name.strip().lower()] = value.strip()
    if fields.get("upgrade", "").lower() != "websocket":
        raise HandshakeRefused
    if "upgrade" not in {part.strip().lower() for part in fields.get("connection", "").split(",")}:
        raise HandshakeRefused
    if fields.get("sec-websocket-accept") != accept_for(key):
        raise HandshakeRefused
    if fields.get("sec-websocket-extensions"):
        raise HandshakeRefused  # none were offered
    protocol = fields.get("sec-websocket-protocol") or None
    if protocol is not None and protocol not in offered:
        raise HandshakeRefused
    return protocol


def response_head(accept: str, protocol: str | None) -> bytes:
    """The 101 answer wardgate gives the client of a spliced relay."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
