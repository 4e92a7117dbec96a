"""The relay's frame readers, close frames and handshake heads (RFC 6455).

The readers are checked against a model: random streams of frames (every length encoding,
masked and not, fragmented messages, control frames in between), cut into chunks at random,
must come out as the model says: for ``FrameWalker`` byte for byte, stopping exactly where
it must; for ``ScrubbingFramer`` as exactly the scrubbed messages, whatever the
fragmentation, chunking or position of the secrets.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.proxy.frames import (
    HOLD_FRAME_BYTES,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameWalker,
    HandshakeRefused,
    ScrubbingFramer,
    Stop,
    accept_for,
    check_response_head,
    close_frame,
    close_payload,
    close_reason,
    parse_frame,
    ping_frame,
    relayed_subprotocols,
    request_head,
    response_head,
    wire_close_code,
)
from wardgate.proxy.scrub import Scrubber


def encode(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = False, width: int = 0, rsv: int = 0
) -> bytes:
    """A frame; ``width`` forces the 16-bit (2) or 64-bit (8) length form."""
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if width == 8 or length > 0xFFFF:
        head += bytes([mask_bit | 127]) + length.to_bytes(8, "big")
    elif width == 2 or length >= 126:
        head += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | length])
    if masked:
        key = os.urandom(4)
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (no empty chunks)."""
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@dataclass
class Spec:
    opcode: int
    length: int
    masked: bool
    width: int
    fin: bool = True


frame_specs = st.lists(
    st.builds(
        Spec,
        opcode=st.sampled_from([0x0, 0x1, 0x2, 0x9, 0xA]),
        length=st.integers(min_value=0, max_value=300),
        masked=st.booleans(),
        width=st.sampled_from([0, 0, 2, 8]),
        fin=st.booleans(),
    ),
    max_size=8,
)


def walk(walker: FrameWalker, pieces: list[bytes]) -> bytes:
    """Feed ``pieces``; return what the walker passed on (it stops passing at a stop)."""
    return b"".join(walker.feed(piece) for piece in pieces)


# --- FrameWalker -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    specs=frame_specs,
    cap=st.integers(min_value=0, max_value=700),
    close=st.booleans(),
    cuts=st.lists(st.integers(0, 3000), max_size=15),
)
def test_walker_passes_everything_up_to_exactly_where_it_stops(
    specs: list[Spec], cap: int, close: bool, cuts: list[int]
) -> None:
    stream = bytearray()
    expected: tuple[Stop, int] | None = None
    message = 0
    payload = 0
    for spec in specs:
        frame = encode(spec.opcode, os.urandom(spec.length), masked=spec.masked, width=spec.width)
        if expected is None and spec.opcode < 8:
            message = spec.length if spec.opcode else message + spec.length
            if message > cap:
                expected = (Stop.TOO_BIG, len(stream))
            else:
                payload += spec.length
        stream += frame
    if close:
        if expected is None:
            expected = (Stop.CLOSE, len(stream))
        stream += encode(OP_CLOSE, b"\x03\xe8bye", masked=True)
    walker = FrameWalker(cap)
    passed = walk(walker, chunks(bytes(stream), cuts))
    if expected is None:
        assert passed == bytes(stream)
        assert walker.stop is None
        assert walker.at_boundary
        assert walker.payload == payload
        return
    kind, position = expected
    assert walker.stop is kind
    assert passed == bytes(stream[:position])  # never a part of the frame it stopped at
    assert walker.rest == bytes(stream[position:])
    assert walker.at_boundary
    assert walker.payload == payload


@given(specs=frame_specs, cut=st.integers(min_value=0, max_value=3000))
def test_an_incomplete_header_is_held_back_and_at_boundary_is_exact(specs: list[Spec], cut: int) -> None:
    stream = bytearray()
    headers: list[tuple[int, int]] = []
    """(start, end) of every frame header."""
    for spec in specs:
        frame = encode(spec.opcode, b"x" * spec.length, masked=spec.masked, width=spec.width)
        headers.append((len(stream), len(stream) + len(frame) - spec.length))
        stream += frame
    cut = min(cut, len(stream))
    walker = FrameWalker()
    passed = walker.feed(bytes(stream[:cut]))
    inside = [start for start, end in headers if start < cut < end]
    if inside:  # what went out ends where that header starts; the header waits
        assert len(passed) == inside[0]
        assert walker.carry == bytes(stream[inside[0] : cut])
    else:
        assert passed == bytes(stream[:cut])
    frame_starts = {start for start, _ in headers} | {len(stream)}
    # At a boundary: after whole frames, or before a header held back whole.
    assert walker.at_boundary is (cut in frame_starts or bool(inside))
    assert walker.feed(bytes(stream[cut:])) == bytes(stream[len(passed) :])
    assert walker.at_boundary


def test_fragments_count_toward_one_message() -> None:
    walker = FrameWalker(10)
    stream = encode(0x1, b"12345", fin=False) + encode(0x9, b"ping") + encode(0x0, b"67890", fin=False)
    assert walker.feed(stream) == stream
    over = encode(0x0, b"!", fin=True)
    assert walker.feed(over) == b""
    assert walker.stop is Stop.TOO_BIG
    assert walker.rest == over
    assert walker.feed(b"more") == b""  # after a stop: kept, never passed
    assert walker.rest == over + b"more"
    fresh = FrameWalker(10)
    both = encode(0x1, b"1234567890") + encode(0x2, b"0123456789")
    assert fresh.feed(both) == both
    assert fresh.stop is None  # a new message starts its own count
    assert fresh.payload == 20


def test_an_oversized_frame_whose_header_is_split_is_not_passed_at_all() -> None:
    walker = FrameWalker(100)
    frame = encode(0x2, b"x" * 200)  # a 4-byte header: 0x82 0x7e + 16-bit length
    assert walker.feed(frame[:2]) == b""  # held back until the length is known
    assert walker.at_boundary
    assert walker.feed(frame[2:]) == b""
    assert walker.stop is Stop.TOO_BIG
    assert walker.rest == frame


@dataclass
class Message:
    opcode: int
    fragments: list[int]
    """Payload lengths of its frames."""
    pings_after: list[bool]
    """Whether a ping follows each fragment."""


messages_strategy = st.lists(
    st.builds(
        Message,
        opcode=st.sampled_from([OP_TEXT, OP_BINARY]),
        fragments=st.lists(st.integers(0, 150), min_size=1, max_size=4),
        pings_after=st.lists(st.booleans(), min_size=4, max_size=4),
    ),
    max_size=6,
)


def client_stream(messages: list[Message]) -> tuple[bytes, list[int]]:
    """Masked frames of ``messages``, and where each message's first frame starts."""
    stream = bytearray()
    starts = []
    for message in messages:
        starts.append(len(stream))
        for index, length in enumerate(message.fragments):
            last = index == len(message.fragments) - 1
            opcode = message.opcode if index == 0 else OP_CONTINUATION
            stream += encode(opcode, os.urandom(length), fin=last, masked=True, width=length % 3 * 4 // 2)
            if message.pings_after[index]:
                stream += encode(OP_PING, b"p", masked=True)
    return bytes(stream), starts


@settings(max_examples=300, deadline=None)
@given(messages=messages_strategy, cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_the_hook_is_asked_once_per_message_at_its_first_frame(
    messages: list[Message], cuts: list[int]
) -> None:
    stream, starts = client_stream(messages)
    asked = 0

    def hook() -> bool:
        nonlocal asked
        asked += 1
        return asked % 2 == 0  # every other message is held (its decision pending), then admitted

    walker = FrameWalker(10**6, hook)
    passed = bytearray()
    holds = []
    for piece in chunks(stream, cuts):
        passed += walker.feed(piece)
        while walker.stop is Stop.HOLD:
            holds.append(len(passed))
            assert walker.rest == stream[len(passed) : len(passed) + len(walker.rest)]
            passed += walker.resume()
    assert bytes(passed) == stream
    assert asked == len(messages)  # a held message is not asked about again
    assert holds == starts[0::2]  # exactly at the first frames of the 1st, 3rd, ... messages
    assert walker.payload == sum(sum(m.fragments) for m in messages)


@given(messages=messages_strategy.filter(lambda m: len(m) >= 2), refused=st.integers(0, 5))
def test_a_refused_message_stops_the_walk_at_its_first_frame(messages: list[Message], refused: int) -> None:
    refused %= len(messages)
    stream, starts = client_stream(messages)
    calls = 0

    def hook() -> bool:
        nonlocal calls
        calls += 1
        return calls <= refused

    walker = FrameWalker(10**6, hook)
    passed = walker.feed(stream)
    assert walker.stop is Stop.HOLD
    assert passed == stream[: starts[refused]]
    assert walker.rest == stream[starts[refused] :]


@given(specs=frame_specs, cap=st.integers(0, 200), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_a_following_walker_finds_the_close_frame_after_any_stop(
    specs: list[Spec], cap: int, cuts: list[int]
) -> None:
    stream = b"".join(encode(s.opcode, b"y" * s.length, masked=s.masked, width=s.width) for s in specs)
    close = encode(OP_CLOSE, b"\x03\xe8", masked=True)
    pieces = chunks(stream + close + b"after", cuts)
    walker = FrameWalker(cap, lambda: False)
    fed = 0
    while fed < len(pieces) and walker.stop is None:
        walker.feed(pieces[fed])
        fed += 1
    discard = FrameWalker.following(walker)
    if walker.stop is not None:
        discard.feed(walker.rest)
    for piece in pieces[fed:]:
        discard.feed(piece)
    assert discard.stop is Stop.CLOSE
    assert discard.rest.startswith(close)


# --- ScrubbingFramer -------------------------------------------------------------------------------


def server_frames(stream: bytes) -> list[tuple[bool, int, bytes]]:
    """Parse a stream as a client does, insisting on what a server must send: unmasked frames,
    no RSV bits, whole frames only."""
    frames = []
    pos = 0
    while pos < len(stream):
        assert stream[pos] & 0x70 == 0, "RSV bits set"
        assert len(stream) - pos < 2 or stream[pos + 1] & 0x80 == 0, "a masked frame from the server"
        frame = parse_frame(stream[pos:])
        assert frame is not None, "a partial frame"
        frames.append((frame.fin, frame.opcode, frame.payload))
        pos += frame.size
    return frames


def reassemble(
    frames: list[tuple[bool, int, bytes]],
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(complete data messages, control frames) as a client assembles them (RFC 6455 5.4)."""
    messages: list[tuple[int, bytes]] = []
    controls: list[tuple[int, bytes]] = []
    current: tuple[int, bytes] | None = None
    for fin, opcode, payload in frames:
        if opcode >= 8:
            assert fin
            assert len(payload) <= 125
            controls.append((opcode, payload))
            continue
        if opcode == OP_CONTINUATION:
            assert current is not None, "a continuation of nothing"
            current = (current[0], current[1] + payload)
        else:
            assert current is None, "a new message inside another"
            current = (opcode, payload)
        if fin:
            messages.append(current)
            current = None
    return messages, controls


@dataclass
class Sent:
    opcode: int
    payload: bytes
    cuts: list[int]
    """Where its payload is cut into fragments."""
    pings: list[bytes]
    """Control payloads sent between its fragments (ping, pong alternately)."""


SECRETS = ["abcab", "bca-x", "Bearer abcab"]
"""Overlapping secrets: every suffix/prefix interplay the holdback must get right."""


def sent_messages(alphabet: str) -> st.SearchStrategy[list[Sent]]:
    pieces = st.lists(st.sampled_from([*alphabet, *SECRETS]), max_size=12).map("".join)
    return st.lists(
        st.builds(
            Sent,
            opcode=st.sampled_from([OP_TEXT, OP_BINARY]),
            payload=pieces.map(str.encode),
            cuts=st.lists(st.integers(0, 60), max_size=4),
            pings=st.lists(pieces.map(lambda s: s.encode()[:125]), max_size=2),
        ),
        max_size=6,
    )


def upstream_stream(messages: list[Sent], widths: list[int]) -> tuple[bytes, list[tuple[int, int]]]:
    """Server frames for ``messages``; per data frame, where it starts and its message's size
    once it is added (for the cap)."""
    stream = bytearray()
    data_frames: list[tuple[int, int]] = []
    width = iter(widths * 100 or [0] * 1000)
    for message in messages:
        parts = chunks(message.payload, message.cuts) or [b""]
        size = 0
        for index, part in enumerate(parts):
            size += len(part)
            data_frames.append((len(stream), size))
            opcode = message.opcode if index == 0 else OP_CONTINUATION
            stream += encode(opcode, part, fin=index == len(parts) - 1, width=next(width))
            if index < len(message.pings):
                control = OP_PING if index % 2 == 0 else OP_PONG
                stream += encode(control, message.pings[index])
    return bytes(stream), data_frames


def frame_all(framer: ScrubbingFramer, pieces: list[bytes]) -> bytes:
    out = bytearray()
    for piece in pieces:
        out += framer.feed(piece)
        server_frames(bytes(out))  # whole frames only, after every chunk
    return bytes(out)


@settings(max_examples=500, deadline=None)
@given(
    messages=sent_messages("ab-xyz"),
    widths=st.lists(st.sampled_from([0, 2, 8]), max_size=4),
    cuts=st.lists(st.integers(0, 800), max_size=16),
    hold_frame=st.sampled_from([0, 20, HOLD_FRAME_BYTES]),
)
def test_the_client_receives_exactly_the_scrubbed_messages(
    messages: list[Sent], widths: list[int], cuts: list[int], hold_frame: int
) -> None:
    scrubber = Scrubber(SECRETS)
    stream, _ = upstream_stream(messages, widths)
    framer = ScrubbingFramer(scrubber, 10**6, hold_frame=hold_frame)
    out = frame_all(framer, chunks(stream, cuts))
    assert framer.stop is None
    received, controls = reassemble(server_frames(out))
    assert received == [(m.opcode, scrubber.scrub_bytes(m.payload)) for m in messages]
    expected_controls = []
    for message in messages:
        parts = chunks(message.payload, message.cuts) or [b""]
        for index, ping in enumerate(message.pings[: len(parts)]):
            expected_controls.append(
                (OP_PING if index % 2 == 0 else OP_PONG, scrubber.scrub_bytes(ping)[:125])
            )
    assert controls == expected_controls
    for secret in SECRETS:
        assert secret.encode() not in b"".join(p for _, p in received + controls)
    assert framer.payload == sum(len(p) for _, p in received)
    assert framer.at_boundary


@settings(max_examples=300, deadline=None)
@given(
    messages=sent_messages("xyz-"),
    widths=st.lists(st.sampled_from([0, 2, 8]), max_size=4),
    cuts=st.lists(st.integers(0, 800), max_size=16),
)
def test_frames_without_secrets_pass_byte_for_byte(
    messages: list[Sent], widths: list[int], cuts: list[int]
) -> None:
    # No "a", "b" or "B": nothing can even begin a secret, so every frame passes as it came.
    messages = [
        Sent(m.opcode, m.payload.replace(b"a", b"x").replace(b"b", b"y").replace(b"B", b"z"), m.cuts, [])
        for m in messages
    ]
    stream, _ = upstream_stream(messages, widths)
    framer = ScrubbingFramer(Scrubber(SECRETS), 10**6)
    assert frame_all(framer, chunks(stream, cuts)) == stream


@settings(max_examples=300, deadline=None)
@given(
    messages=sent_messages("ab-xyz"),
    cap=st.integers(0, 80),
    cuts=st.lists(st.integers(0, 800), max_size=16),
)
def test_the_cap_is_exact_on_what_the_upstream_sent(messages: list[Sent], cap: int, cuts: list[int]) -> None:
    scrubber = Scrubber(SECRETS)
    stream, data_frames = upstream_stream(messages, [])
    over = next((start for start, size in data_frames if size > cap), None)
    framer = ScrubbingFramer(scrubber, cap)
    out = frame_all(framer, chunks(stream, cuts))
    received, _ = reassemble(server_frames(out))
    if over is None:
        assert framer.stop is None
        assert received == [(m.opcode, scrubber.scrub_bytes(m.payload)) for m in messages]
        return
    assert framer.stop is Stop.TOO_BIG
    assert framer.rest == stream[over:]
    before = sum(1 for start, _ in data_frames if start < over)
    complete = 0
    for message in messages:  # the messages whose every frame came before the stop
        before -= len(chunks(message.payload, message.cuts) or [b""])
        if before < 0:
            break
        complete += 1
    assert received == [(m.opcode, scrubber.scrub_bytes(m.payload)) for m in messages[:complete]]


def test_a_secret_at_every_offset_under_every_fragmentation_and_chunking() -> None:
    secret = b"s3cr3t-t0ken"
    scrubber = Scrubber([secret.decode()])
    body = b"0123456789abcdef"
    for offset in range(len(body) + 1):
        payload = body[:offset] + secret + body[offset:]
        expected = body[:offset] + b"[redacted]" + body[offset:]
        for cut in range(len(payload) + 1):
            fragments = [payload[:cut], payload[cut:]]
            stream = encode(OP_TEXT, fragments[0], fin=False) + encode(OP_CONTINUATION, fragments[1])
            for chunk_at in range(0, len(stream) + 1, 3):
                framer = ScrubbingFramer(scrubber, 1000, hold_frame=8)
                out = frame_all(framer, [stream[:chunk_at], stream[chunk_at:]])
                assert reassemble(server_frames(out)) == ([(OP_TEXT, expected)], [])


def test_a_large_frame_streams_as_fragments_with_only_a_possible_secret_held() -> None:
    secret = "0123456789-secret"
    scrubber = Scrubber([secret])
    payload = b"x" * 30_000 + secret.encode() + b"y" * 30_000
    stream = encode(OP_BINARY, payload)
    framer = ScrubbingFramer(scrubber, 10**6)
    first = framer.feed(stream[:20_000])
    frames = server_frames(first)
    assert frames == [(False, OP_BINARY, payload[: 20_000 - 4])]  # streamed at once, not held
    out = first + framer.feed(stream[20_000:30_010]) + framer.feed(stream[30_010:])
    assert reassemble(server_frames(out)) == (
        [(OP_BINARY, payload.replace(secret.encode(), b"[redacted]"))],
        [],
    )


def test_a_chunk_of_one_whole_frame_takes_the_short_way_with_every_check() -> None:
    scrubber = Scrubber(["a-secret-value"])
    framer = ScrubbingFramer(scrubber, 10)
    clean = encode(OP_TEXT, b"0123456789")
    assert framer.feed(clean) is clean  # the very object: nothing copied
    assert framer.payload == 10
    holding = encode(OP_BINARY, b"a-secret-value")
    framer = ScrubbingFramer(scrubber, 100)
    assert reassemble(server_frames(framer.feed(holding))) == ([(OP_BINARY, b"[redacted]")], [])
    over = encode(OP_TEXT, b"01234567890")
    framer = ScrubbingFramer(scrubber, 10)
    assert framer.feed(over) == b""
    assert framer.stop is Stop.TOO_BIG


def test_a_clean_small_frame_split_by_the_network_is_held_whole_then_passed_as_it_came() -> None:
    framer = ScrubbingFramer(Scrubber(["a-secret-value"]), 1000)
    frame = encode(OP_TEXT, b"hello there")
    assert framer.feed(frame[:5]) == b""
    assert framer.feed(frame[5:]) == frame


@pytest.mark.parametrize(
    "frame",
    [
        encode(OP_TEXT, b"masked", masked=True),
        encode(OP_TEXT, b"compressed", rsv=0x40),
        encode(0x3, b"reserved"),
        encode(0xB, b"reserved control"),
        encode(OP_PING, b"fragmented", fin=False),
        encode(OP_PING, b"x" * 126),
        encode(OP_CONTINUATION, b"of nothing"),
    ],
)
def test_frames_no_server_may_send_stop_the_framer(frame: bytes) -> None:
    framer = ScrubbingFramer(Scrubber(["a-secret-value"]), 1000)
    before = encode(OP_TEXT, b"fine")
    assert framer.feed(before + frame) == before
    assert framer.stop is Stop.PROTOCOL
    assert framer.rest == frame


def test_a_new_message_inside_an_unfinished_one_stops_the_framer() -> None:
    framer = ScrubbingFramer(Scrubber(["a-secret-value"]), 1000)
    first = encode(OP_TEXT, b"part", fin=False)
    assert framer.feed(first + encode(OP_BINARY, b"new")) == first
    assert framer.stop is Stop.PROTOCOL


def test_the_framer_stops_at_a_close_frame_and_keeps_it() -> None:
    framer = ScrubbingFramer(Scrubber(["a-secret-value"]), 1000)
    data = encode(OP_TEXT, b"bye a-secret-value")
    close = close_frame(1000, b"a-secret-value", masked=False)
    out = framer.feed(data + close[:3])
    assert reassemble(server_frames(out)) == ([(OP_TEXT, b"bye [redacted]")], [])
    assert framer.stop is Stop.CLOSE
    framer.feed(close[3:])
    assert framer.rest == close  # the relay scrubs its reason when it passes it on


def test_a_control_frame_holding_a_secret_is_scrubbed_and_stays_within_125_bytes() -> None:
    scrubber = Scrubber(["tiny"])  # shorter than the marker: scrubbing makes it longer
    framer = ScrubbingFramer(scrubber, 1000)
    out = framer.feed(encode(OP_PING, b"tiny" * 31))
    ((fin, opcode, payload),) = server_frames(out)
    assert (fin, opcode) == (True, OP_PING)
    assert payload == (b"[redacted]" * 31)[:125]


@given(masked=st.booleans())
def test_ping_frames(masked: bool) -> None:
    frame = ping_frame(masked=masked)
    parsed = parse_frame(frame)
    assert parsed is not None
    assert (parsed.fin, parsed.opcode, parsed.payload, parsed.size) == (True, OP_PING, b"", len(frame))
    assert bool(frame[1] & 0x80) is masked


def test_a_following_walker_goes_on_where_a_framer_streaming_a_frame_is() -> None:
    framer = ScrubbingFramer(Scrubber(["a-secret-value"]), 10**6)
    big = encode(OP_BINARY, b"z" * 40_000)
    framer.feed(big[:25_000])
    walker = FrameWalker.following(framer)
    assert walker.feed(big[25_000:] + encode(OP_CLOSE, b"")) == big[25_000:]
    assert walker.stop is Stop.CLOSE


# --- close frames and the handshake ------------------------------------------------------------------


def test_close_frames_roundtrip_masked_and_not() -> None:
    for masked in (False, True):
        frame = close_frame(4001, b"bye now", masked=masked)
        parsed = parse_frame(frame + b"trailing")
        assert parsed is not None
        assert (parsed.fin, parsed.opcode, parsed.size) == (True, 8, len(frame))
        assert close_payload(parsed.payload) == (4001, "bye now")
        assert parse_frame(frame[:-1]) is None
    assert close_payload(b"") == (None, "")
    assert parse_frame(b"\x88") is None
    assert close_frame(None, b"ignored", masked=False) == b"\x88\x00"
    empty = parse_frame(close_frame(None, b"", masked=True))
    assert empty is not None
    assert close_payload(empty.payload) == (None, "")


def test_close_helpers() -> None:
    assert [wire_close_code(c) for c in (1000, 1005, 1006, 1015, 999, 4429, 5000, None)] == [
        1000,
        1000,
        1000,
        1000,
        1000,
        4429,
        1000,
        1000,
    ]
    assert close_reason("é" * 100) == ("é" * 61).encode()  # cut at a character boundary
    assert len(close_reason("x" * 500)) == 123
    assert relayed_subprotocols("wardgate.bearer.wgs_x, chat ,,wardgate.v1") == ["chat", "wardgate.v1"]
    assert relayed_subprotocols(None) == []


# --- handshake ----------------------------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def test_accept_matches_rfc_6455_example() -> None:
    assert accept_for(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_request_and_response_heads() -> None:
    head = request_head(
        "/base/x?a=1", "up:81", KEY, ["chat"], [("Authorization", "Bearer s"), ("X-Ü", "\udcff")]
    )
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /base/x?a=1 HTTP/1.1"
    assert b"Host: up:81" in lines
    assert b"Sec-WebSocket-Protocol: chat" in lines
    assert b"Sec-WebSocket-Extensions" not in head
    assert b"X-\xc3\x9c: \xff" in lines  # header bytes given back as received
    assert head.endswith(b"\r\n\r\n")
    assert response_head("abc", None) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: abc\r\n\r\n"
    )
    assert b"Sec-WebSocket-Protocol: chat\r\n" in response_head("abc", "chat")


def good_head(**extra: str) -> bytes:
    fields = {
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Accept": accept_for(KEY),
        **extra,
    }
    return (
        "HTTP/1.1 101 Switching Protocols\r\n" + "\r\n".join(f"{k}: {v}" for k, v in fields.items())
    ).encode()


def test_a_good_answer_and_its_subprotocol() -> None:
    assert check_response_head(good_head(), KEY, []) is None
    assert check_response_head(good_head(**{"Sec-WebSocket-Protocol": "chat"}), KEY, ["x", "chat"]) == "chat"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0",
        b"HTTP/1.1 200 OK",
        b"garbage",
        good_head(Upgrade="h2c"),
        good_head(Connection="close"),
        good_head(**{"Sec-WebSocket-Accept": "wrong"}),
        good_head(**{"Sec-WebSocket-Extensions": "permessage-deflate"}),
        good_head(**{"Sec-WebSocket-Protocol": "not-offered"}),
        good_head() + b"\r\nno colon here",
    ],
)
def test_bad_answers_are_refused(head: bytes) -> None:
    with pytest.raises(HandshakeRefused):
        check_response_head(head, KEY, ["chat"])
