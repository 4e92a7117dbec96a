"""The scrubber: one-shot and streamed replacement of upstream secrets, under any chunking."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.proxy.scrub import MARKERS, Scrubber

SECRET = "sk-live-4f9a8b7c6d5e"


def reference(secrets: list[str], data: bytes) -> bytes:
    """What scrubbing must produce: one left-to-right pass, longest secret first."""
    ordered = sorted(set(secrets), key=lambda s: (-len(s), s))
    pattern = re.compile(b"|".join(re.escape(s.encode()) for s in ordered))
    return pattern.sub(Scrubber(secrets).marker_bytes, data)


def streamed(scrubber: Scrubber, chunks: list[bytes]) -> bytes:
    stream = scrubber.stream()
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.flush()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, previous = [], 0
    for point in points:
        out.append(data[previous:point])
        previous = point
    out.append(data[previous:])
    return out


# --- one-shot ------------------------------------------------------------------------------------


def test_without_secrets_nothing_changes_and_nothing_is_active() -> None:
    scrubber = Scrubber([])
    assert not scrubber.active
    data = b"anything at all"
    assert scrubber.scrub_bytes(data) is data
    assert scrubber.scrub_text("text") == "text"
    assert streamed(scrubber, [b"a", b"b"]) == b"ab"


def test_bytes_and_text_are_scrubbed() -> None:
    scrubber = Scrubber([SECRET])
    assert scrubber.active
    assert scrubber.scrub_bytes(f"token={SECRET}; again {SECRET}".encode()) == (
        b"token=[redacted]; again [redacted]"
    )
    assert scrubber.scrub_text(f"Bearer {SECRET}") == "Bearer [redacted]"


def test_clean_data_is_returned_as_is() -> None:
    scrubber = Scrubber([SECRET, "another-secret-value"])
    data = b"nothing secret here"
    assert scrubber.scrub_bytes(data) is data


def test_longest_secret_wins_where_two_start_together() -> None:
    scrubber = Scrubber(["abcdefgh", "abcdefghijkl"])
    assert scrubber.scrub_bytes(b"xabcdefghijklx") == b"x[redacted]x"


def test_empty_secrets_are_ignored_and_repr_hides_secrets() -> None:
    scrubber = Scrubber(["", SECRET])
    assert scrubber.secrets() == (SECRET,)
    assert SECRET not in repr(scrubber)
    assert SECRET.encode() not in repr(scrubber.stream()).encode()


def test_utf8_secret_in_text_frame_keeps_valid_utf8() -> None:
    secret = "clé-secrète-ü"
    scrubber = Scrubber([secret])
    out = scrubber.scrub_bytes(f"«{secret}»".encode())
    assert out.decode() == "«[redacted]»"


def test_marker_changes_when_a_secret_could_combine_with_it() -> None:
    assert Scrubber(["abc]def-ghijk"]).marker == "<redacted>"
    assert Scrubber(["redacted"]).marker == "********"
    assert Scrubber(["acted", "x*y#z-12"]).marker == "~~~~~~~~"
    scrubber = Scrubber(["d]x-secret"])
    assert scrubber.marker == "<redacted>"
    assert b"d]x-secret" not in scrubber.scrub_bytes(b"ad]x-secretd]x-secret")


def test_markers_are_distinct_candidates() -> None:
    assert len(set(MARKERS)) == len(MARKERS)


# --- streams -------------------------------------------------------------------------------------


def test_a_secret_split_across_chunks_is_scrubbed() -> None:
    scrubber = Scrubber([SECRET])
    data = f"before {SECRET} after".encode()
    for cut in range(len(data) + 1):
        assert streamed(scrubber, [data[:cut], data[cut:]]) == b"before [redacted] after"


def test_byte_by_byte() -> None:
    scrubber = Scrubber([SECRET])
    data = f"{SECRET}{SECRET}x{SECRET}".encode()
    assert streamed(scrubber, [bytes([b]) for b in data]) == b"[redacted][redacted]x[redacted]"


def test_only_a_possible_secret_start_is_held_back() -> None:
    scrubber = Scrubber([SECRET])
    stream = scrubber.stream()
    assert stream.feed(b"data: hello\n\n") == b"data: hello\n\n"  # nothing held at an event end
    assert stream.feed(b"data: sk-li") == b"data: "
    assert stream.pending == len("sk-li")
    assert stream.feed(b"ve-4f9a8b7c6d5e\n\n") == b"[redacted]\n\n"
    assert stream.feed(b"sk-lie") == b"sk-lie"  # diverged: released at once
    assert stream.flush() == b""


def test_flush_releases_an_unfinished_prefix_unchanged() -> None:
    scrubber = Scrubber([SECRET])
    stream = scrubber.stream()
    assert stream.feed(b"end sk-live") == b"end "
    assert stream.flush() == b"sk-live"


def test_longer_secret_pending_is_not_cut_short_by_a_shorter_match() -> None:
    scrubber = Scrubber(["abcdefgh", "abcdefghijkl"])
    stream = scrubber.stream()
    out = stream.feed(b"xabcdefghij")
    out += stream.feed(b"kl")
    out += stream.flush()
    assert out == b"x[redacted]"


alphabet = st.sampled_from("abc-x\n")


@settings(max_examples=400, deadline=None)
@given(
    secrets=st.lists(
        st.text(alphabet=st.sampled_from("abc-"), min_size=1, max_size=6), min_size=1, max_size=3
    ),
    filler=st.lists(st.text(alphabet=alphabet, max_size=8), min_size=1, max_size=8),
    picks=st.lists(st.integers(min_value=0, max_value=2), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12),
)
def test_any_chunking_equals_the_one_shot_result(
    secrets: list[str], filler: list[str], picks: list[int], cuts: list[int]
) -> None:
    # A stream that holds the secrets (and pieces of them) in between random filler.
    pieces = []
    for index, text in enumerate(filler):
        pieces.append(text)
        if index < len(picks):
            pieces.append(secrets[picks[index] % len(secrets)])
    data = "".join(pieces).encode()
    scrubber = Scrubber(secrets)
    expected = reference(secrets, data)
    assert scrubber.scrub_bytes(data) == expected
    out = streamed(scrubber, split(data, cuts))
    assert out == expected
    for secret in secrets:
        assert secret.encode() not in out


@settings(max_examples=200, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=12).filter(lambda b: b"[" not in b and b"]" not in b),
    prefix=st.binary(max_size=20),
    suffix=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
)
def test_binary_streams(secret: bytes, prefix: bytes, suffix: bytes, cuts: list[int]) -> None:
    text = secret.decode("latin-1")
    scrubber = Scrubber([text])
    # Secrets are str; binary frames are matched on their UTF-8 encoding.
    needle = text.encode()
    data = prefix + needle + suffix + needle
    expected = re.compile(re.escape(needle)).sub(scrubber.marker_bytes, data)
    assert streamed(scrubber, split(data, cuts)) == expected
    assert needle not in expected


# --- in place, for the WebSocket framer ----------------------------------------------------------


def longest_held(secrets: list[str], data: bytes) -> int:
    """The longest suffix of ``data`` that is a proper prefix of a secret, by brute force."""
    encoded = [s.encode() for s in secrets]
    return max(
        (n for n in range(1, len(data) + 1) for s in encoded if len(s) > n and s.startswith(data[-n:])),
        default=0,
    )


@settings(max_examples=400, deadline=None)
@given(
    secrets=st.lists(
        st.text(alphabet=st.sampled_from("abc-"), min_size=1, max_size=6), min_size=1, max_size=4
    ),
    data=st.text(alphabet=st.sampled_from("abc-x"), max_size=30).map(str.encode),
    start=st.integers(min_value=0, max_value=30),
    end=st.integers(min_value=0, max_value=30),
)
def test_occurs_and_holdback_look_at_a_slice_in_place(
    secrets: list[str], data: bytes, start: int, end: int
) -> None:
    scrubber = Scrubber(secrets)
    piece = data[start:end]
    expected = any(s.encode() in piece for s in secrets)
    assert scrubber.occurs(data, start, end) is expected
    assert scrubber.occurs(piece) is expected
    held = longest_held(secrets, piece)
    assert scrubber.holdback(data, start, max(start, min(end, len(data)))) == held
    assert scrubber.holdback(piece) == held
    out, rest = scrubber.scrub_partial(piece)
    assert len(rest) <= held  # at most the possible beginning of a secret is held back
    assert piece.endswith(rest)
    assert out + scrubber.scrub_bytes(rest) == scrubber.scrub_bytes(piece)


def test_occurs_searches_only_secrets_that_hold_no_other() -> None:
    scrubber = Scrubber(["Bearer tok-123456", "tok-123456", "other-secret"])
    assert scrubber.occurs(b"xx tok-123456 yy")
    assert scrubber.occurs(b"other-secret", 0, 12)
    assert not scrubber.occurs(b"other-secret", 1)
    assert not scrubber.occurs(b"Bearer tok-12345")
    assert Scrubber([]).occurs(b"anything") is False
    assert Scrubber([]).holdback(b"anything") == 0
    assert Scrubber([]).scrub_partial(b"anything") == (b"anything", b"")
