"""Relayed paths and query strings: parsed, refused or passed on, as pure functions.

The ``<path>`` of ``/proxy/<name>/<kind>/<path>`` is taken from the request target exactly as
the client sent it (still percent-encoded), checked segment by segment, and forwarded as sent:

* a segment that decodes to ``.`` or ``..`` (also ``%2e%2e``, and ``..;x`` which some servers
  read as ``..``), or that decodes to something holding ``/``, ``\\``, ``%`` (double
  encoding), NUL or another control character, or that is not valid UTF-8, is refused: such a
  path means different things to different servers, so it is never passed on;
* an empty segment (``a//b``) is refused; a trailing ``/`` is kept;
* only the characters RFC 3986 allows in a path segment (``pchar``) may appear undecoded.

The decoded path (always starting with ``/``) is what ``allow_paths`` globs are matched
against: ``*`` matches within one segment, ``?`` one character of a segment, and a whole
segment ``**`` any number of segments (including none), so ``/api/**`` allows ``/api``,
``/api/`` and everything below it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, unquote_plus

from wardgate.errors import InvalidRequest

QUERY_CREDENTIALS: Final = frozenset({"token", "apiKey"})
"""Query parameters that carry a wardgate credential; never passed to an upstream."""

_SEGMENT_CHARS: Final = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*")
_FORBIDDEN_DECODED: Final = re.compile(r"[/\\%\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class RelayPath:
    decoded: str
    """The path as the allowlist sees it: ``/`` plus the decoded segments."""
    raw: str
    """The path as forwarded: ``/`` plus the segments exactly as the client encoded them."""


def _refuse(hint: str) -> InvalidRequest:
    return InvalidRequest(hint=hint)


def parse_relay_path(raw: str) -> RelayPath:
    """Check the part of the request path after ``/proxy/<name>/<kind>/`` (still encoded)."""
    if raw == "":
        return RelayPath("/", "/")
    segments = raw.split("/")
    decoded: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "":
            if index == last:  # a trailing slash
                decoded.append("")
                continue
            raise _refuse("empty path segments ('//') are not relayed")
        if _SEGMENT_CHARS.fullmatch(segment) is None:
            raise _refuse("the path holds characters that must be percent-encoded")
        try:
            text = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise _refuse("the path is not valid UTF-8 once decoded") from None
        if _FORBIDDEN_DECODED.search(text) is not None:
            raise _refuse("encoded slashes, backslashes, percent signs or control characters are not relayed")
        if text.split(";", 1)[0] in (".", ".."):
            raise _refuse("'.' and '..' path segments are not relayed")
        decoded.append(text)
    return RelayPath("/" + "/".join(decoded), "/" + raw)


def filter_query(raw_query: str) -> str:
    """The raw query string without wardgate's credential parameters (``token``, ``apiKey``)."""
    if not raw_query:
        return ""
    kept = [
        part
        for part in raw_query.split("&")
        if part and unquote_plus(part.split("=", 1)[0]) not in QUERY_CREDENTIALS
    ]
    return "&".join(kept)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regular expression for one ``allow_paths`` pattern (see the module docstring)."""
    if not pattern.startswith("/"):
        raise ValueError("a path pattern must start with '/'")
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            parts.append("(?:/[^/]*)*")
            continue
        body = "".join(
            "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char) for char in segment
        )
        parts.append("/" + body)
    return re.compile("".join(parts))


class PathPolicy:
    """``allow_paths``: a relayed path must match one of the patterns."""

    __slots__ = ("_patterns",)

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = tuple(compile_glob(p) for p in patterns)

    def allows(self, path: str) -> bool:
        return any(p.fullmatch(path) is not None for p in self._patterns)
