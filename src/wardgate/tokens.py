"""Signed wardgate tokens: pure issuing and verification, no I/O.

Wire form (DESIGN.md, "Credentials")::

    <prefix><base64url(payload)>.<base64url(HMAC-SHA256(key[kid], prefix + base64url(payload)))>

The MAC covers the prefix, so a token of one kind can never pass as another,
and it covers the payload exactly as sent (the base64url text, not the decoded
bytes), so a token has exactly one valid spelling. The payload names the key
(``kid``) that signed it, so keys rotate without logging anyone out.

Verification fails closed: a token that is malformed, too long, signed with an
unknown key, signed with the wrong key, of the wrong kind, for another server
or of an unknown version is ``InvalidToken``; a valid one past its expiry is
``TokenExpired``. Comparisons are constant time (``hmac.compare_digest``).
Nothing here ever puts a token, or part of one, into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

import msgspec

from wardgate.errors import InvalidToken, TokenExpired

TOKEN_VERSION: Final = 1
MAX_TOKEN_LENGTH: Final = 1024
"""Longer strings are refused before any decoding."""


class TokenKind(StrEnum):
    """The kinds of signed token; the value is the payload's ``typ``."""

    PAIRING = "pairing"
    SESSION = "session"
    REFRESH = "refresh"

    @property
    def prefix(self) -> str:
        return _PREFIXES[self]


_PREFIXES: Final = {
    TokenKind.PAIRING: "wgp_",
    TokenKind.SESSION: "wgs_",
    TokenKind.REFRESH: "wgr_",
}
_KIND_BY_PREFIX: Final = {prefix: kind for kind, prefix in _PREFIXES.items()}

# 32-byte MAC = 43 base64url characters without padding; the last one carries 4 bits and 2 zero
# bits, so only 16 characters are canonical there. Refusing the others makes the MAC's spelling
# unique, so comparing the decoded bytes cannot admit a second spelling of one token.
_TOKEN_SHAPE: Final = re.compile(r"wg[psr]_[A-Za-z0-9_-]{8,900}\.[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


class TokenClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The signed payload. Short field names keep tokens short."""

    v: int
    kid: str
    typ: TokenKind
    sid: str
    """Server id: a token is only good for the server (or cluster) that issued it."""
    iat: int
    exp: int
    jti: str
    """Unique token id: the single-use nonce of a pairing token, the revocation handle of others."""
    sub: str | None = None
    """Subject: the device id."""
    fam: str | None = None
    """Refresh-token family (sessions derived from it carry it too)."""
    role: str | None = None
    gen: int = 0
    """Pairing generation: ``wardgate pair --refresh`` bumps it and older pairing tokens die."""


_encode_claims = msgspec.json.Encoder().encode
_decode_claims = msgspec.json.Decoder(TokenClaims).decode


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(key: bytes, signed_part: str) -> str:
    return _b64encode(hmac.digest(key, signed_part.encode("ascii"), "sha256"))


_BLOCK: Final = 64  # SHA-256 block size (RFC 2104)


@functools.lru_cache(maxsize=64)
def _hmac_pads(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256's inner and outer hash states after the padded key, computed once per key."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return (
        hashlib.sha256(bytes(b ^ 0x36 for b in key)),
        hashlib.sha256(bytes(b ^ 0x5C for b in key)),
    )


def _mac_bytes(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256(key, message), equal to ``hmac.digest`` but reusing the keyed pad states."""
    inner_pad, outer_pad = _hmac_pads(key)
    inner = inner_pad.copy()
    inner.update(message)
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return bytes(outer.digest())


def _b64decode_bytes(data: bytes) -> bytes:
    return binascii.a2b_base64(data.translate(_FROM_URLSAFE) + b"==")


def new_token_id() -> str:
    """A fresh random identifier (128 bits) for ``jti``, device and family ids."""
    return secrets.token_urlsafe(16)


def kind_of(token: str) -> TokenKind | None:
    """The kind a token claims by its prefix (unverified), or None if it has no known prefix."""
    return _KIND_BY_PREFIX.get(token[:4])


def sign(claims: TokenClaims, key: bytes) -> str:
    """Serialize and sign ``claims`` with ``key`` (the key ``claims.kid`` names)."""
    prefix = claims.typ.prefix
    payload = _b64encode(_encode_claims(claims))
    return f"{prefix}{payload}.{_mac(key, prefix + payload)}"


def verify(
    token: str,
    kind: TokenKind,
    keys: Mapping[str, bytes],
    *,
    server_id: str,
    now: float,
) -> TokenClaims:
    """Verify ``token`` as a token of ``kind`` and return its claims.

    Raises ``InvalidToken`` for anything but a well-formed token of this kind,
    signed by one of ``keys`` for ``server_id``; ``TokenExpired`` if it is
    otherwise valid but ``exp <= now``.
    """
    if len(token) > MAX_TOKEN_LENGTH or _TOKEN_SHAPE.fullmatch(token) is None:
        raise InvalidToken
    if not token.startswith(kind.prefix):
        raise InvalidToken(hint=f"expected a {kind.value} token")
    raw = token.encode("ascii")
    dot = raw.rindex(b".")
    try:
        claims = _decode_claims(_b64decode_bytes(raw[4:dot]))
        mac = _b64decode_bytes(raw[dot + 1 :])
    except (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError):
        raise InvalidToken from None
    key = keys.get(claims.kid)
    if key is None:
        raise InvalidToken
    # The MAC covers the prefix and the payload exactly as sent: ``raw[:dot]``.
    if not hmac.compare_digest(_mac_bytes(key, raw[:dot]), mac):
        raise InvalidToken
    # Signed from here on: the checks below are about meaning, not integrity.
    if claims.typ is not kind or claims.v != TOKEN_VERSION or claims.sid != server_id:
        raise InvalidToken
    if claims.exp <= now:
        raise TokenExpired
    return claims
