"""Removing upstream credentials from what an upstream sends back (DESIGN.md, "Gateway proxy").

wardgate injects credentials into requests to an upstream; an upstream that reflects them
(an echo service, a debug page, an error message quoting the request) must not hand them to
the client. A :class:`Scrubber` replaces every occurrence of every secret with a fixed marker:

* :meth:`Scrubber.scrub_bytes` / :meth:`Scrubber.scrub_text` for whole units (a WebSocket
  message, a close reason, a header value);
* :meth:`Scrubber.stream` for byte streams (HTTP bodies, SSE) that arrive in chunks, where a
  secret may be split across chunk boundaries;
* :meth:`Scrubber.occurs`, :meth:`Scrubber.holdback` and :meth:`Scrubber.scrub_partial`, the
  pieces the WebSocket relay scrubs frames with (``frames.ScrubbingFramer``): they look at a
  slice of a received chunk without copying it, so that a frame holding no secret passes as
  it arrived.

Semantics: the result of scrubbing equals ``pattern.sub(marker, data)`` where ``pattern`` is the
alternation of the secrets, longest first (so at any position the longest secret that matches
wins), scanned left to right. The stream scrubber produces exactly that result for the
concatenation of its input, however the input is chunked, holding back only the shortest tail
that could still become the start of a secret (the longest suffix that is a proper prefix of
one). Secrets never contain line breaks (they are header values), so a line-oriented stream
such as SSE is never held back at an event boundary.

Scrubbing is defence in depth against accidental reflection, not against an upstream that
means to leak: such an upstream holds the credential and could encode it. Pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

MARKERS: Final = ("[redacted]", "<redacted>", "(redacted)", "{redacted}", "#redacted#")
"""Replacement candidates; the first that no secret can combine with is used (see ``_marker``)."""
FALLBACK_CHARACTERS: Final = "*#~^=_.!:+" + "".join(chr(c) for c in range(0x21, 0x7F))


def _marker(secrets: Iterable[str]) -> str:
    """A marker that can never form a secret together with its surroundings.

    An occurrence of a secret in the output that overlaps a marker either lies inside the
    marker or contains one of the marker's delimiters; so a marker whose delimiters appear in
    no secret and that contains no secret keeps scrubbed output free of every secret. When no
    candidate fits, the marker is a run of one character that no secret contains.
    """
    secrets = list(secrets)
    for marker in MARKERS:
        delimiters = {marker[0], marker[-1]}
        if not any(d in s for s in secrets for d in delimiters) and not any(s in marker for s in secrets):
            return marker
    used = set("".join(secrets))
    for char in FALLBACK_CHARACTERS:
        if char not in used:
            return char * 8
    return MARKERS[0]  # every printable character occurs in some secret: nothing is safe


class Scrubber:
    """Replaces a fixed set of secrets wherever they occur. Its ``repr`` shows no secret."""

    __slots__ = (
        "_bytes_pattern",
        "_first",
        "_secrets",
        "_text_pattern",
        "_texts",
        "marker",
        "marker_bytes",
        "needles",
    )

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = sorted({s for s in secrets if s}, key=lambda s: (-len(s), s))
        self._texts = tuple(unique)
        self.marker = _marker(unique)
        self.marker_bytes = self.marker.encode()
        self._secrets: tuple[bytes, ...] = tuple(s.encode() for s in unique)
        self._first: bytes | None = self._secrets[0] if len(self._secrets) == 1 else None
        self.needles: tuple[bytes, ...] = tuple(
            s for s in self._secrets if not any(t != s and t in s for t in self._secrets)
        )
        """What ``occurs`` searches: whether any secret occurs is whether one that holds no
        other secret occurs (usually one search, for the token, instead of one per form)."""
        self._text_pattern = re.compile("|".join(re.escape(s) for s in unique)) if unique else None
        self._bytes_pattern = (
            re.compile(b"|".join(re.escape(s) for s in self._secrets)) if self._secrets else None
        )

    def __repr__(self) -> str:
        return f"Scrubber({len(self._secrets)} secrets)"

    def secrets(self) -> tuple[str, ...]:
        """The secrets, longest first (for the log redaction layer; never for output)."""
        return self._texts

    @property
    def active(self) -> bool:
        """Whether there is anything to scrub (callers skip scrubbing entirely when not)."""
        return self._bytes_pattern is not None

    def scrub_bytes(self, data: bytes) -> bytes:
        """``data`` with every secret replaced (returns ``data`` itself when it holds none)."""
        pattern = self._bytes_pattern
        if pattern is None:
            return data
        first = self._first
        if first is not None:
            if first not in data:
                return data
        elif pattern.search(data) is None:
            return data
        return pattern.sub(self.marker_bytes, data)

    def scrub_text(self, text: str) -> str:
        """``text`` with every secret replaced."""
        pattern = self._text_pattern
        if pattern is None:
            return text
        return pattern.sub(self.marker, text)

    def stream(self) -> StreamScrubber:
        """A scrubber for one chunked byte stream."""
        return StreamScrubber(self)

    def occurs(self, data: bytes, start: int = 0, end: int | None = None) -> bool:
        """Whether a secret occurs in ``data[start:end]`` (searched in place, nothing copied)."""
        if end is None:
            end = len(data)
        for needle in self.needles:  # noqa: SIM110 (a loop: no generator on the hot path)
            if data.find(needle, start, end) != -1:
                return True
        return False

    def holdback(self, data: bytes, start: int = 0, end: int | None = None) -> int:
        """The length of the longest suffix of ``data[start:end]`` that is a proper prefix of a
        secret: what a stream must hold back until it knows whether a secret follows."""
        if end is None:
            end = len(data)
        longest = 0
        for secret in self._secrets:
            first = max(start, end - len(secret) + 1)
            if end - first <= longest:
                continue
            lead = secret[0]
            index = data.find(lead, first, end)
            while index != -1 and end - index > longest:
                if secret.startswith(data[index:end]):
                    longest = end - index
                    break
                index = data.find(lead, index + 1, end)
        return longest

    def scrub_partial(self, buffer: bytes) -> tuple[bytes, bytes]:
        """Scrub what of ``buffer`` is final, as the beginning of a longer stream: return it and
        the tail to hold back (``holdback``) and put in front of what comes next."""
        pattern = self._bytes_pattern
        if pattern is None:
            return buffer, b""
        safe_end = len(buffer) - self.holdback(buffer)
        match = pattern.search(buffer)
        if match is None or match.start() >= safe_end:
            if safe_end == len(buffer):
                return buffer, b""
            return buffer[:safe_end], buffer[safe_end:]
        parts: list[bytes] = []
        position = 0
        while match is not None and match.start() < safe_end:
            parts.append(buffer[position : match.start()])
            parts.append(self.marker_bytes)
            position = match.end()
            match = pattern.search(buffer, position)
        end = max(position, safe_end)
        parts.append(buffer[position:end])
        return b"".join(parts), buffer[end:]


class StreamScrubber:
    """Scrubs one byte stream fed in chunks; see the module docstring for the guarantee."""

    __slots__ = ("_pending", "_scrubber")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._pending = b""

    def __repr__(self) -> str:
        return f"StreamScrubber(holding {len(self._pending)} bytes)"

    @property
    def pending(self) -> int:
        """Bytes held back, waiting to see whether they start a secret."""
        return len(self._pending)

    def feed(self, chunk: bytes) -> bytes:
        """Scrub ``chunk``; return what can be passed on now (possibly empty)."""
        if not self._scrubber.active:
            return chunk
        buffer = self._pending + chunk if self._pending else chunk
        out, self._pending = self._scrubber.scrub_partial(buffer)
        return out

    def flush(self) -> bytes:
        """The end of the stream: scrub and return whatever is still held back."""
        rest, self._pending = self._pending, b""
        return self._scrubber.scrub_bytes(rest) if rest else b""
