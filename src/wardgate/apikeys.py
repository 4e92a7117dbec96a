"""Opaque secrets: API keys (``wgk_``) and browser session cookies (``wgc_``). Pure, no I/O.

Unlike the signed tokens in ``tokens``, these carry nothing: 32 random bytes
behind a prefix. The store keeps only their SHA-256 (``store.base.token_hash``),
so a leaked database grants nothing, and a lookup by hash needs no constant-time
comparison of the secret itself. The prefix lets secret scanners and the log
redactor recognise them; the fixed shape lets a malformed value be refused
before any store lookup.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

API_KEY_PREFIX: Final = "wgk_"
COOKIE_PREFIX: Final = "wgc_"
SECRET_BYTES: Final = 32
_SHAPE: Final = re.compile(r"wg[kc]_[A-Za-z0-9_-]{43}")


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def new_cookie_value() -> str:
    return COOKIE_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def well_formed(value: str, prefix: str) -> bool:
    """Whether ``value`` has the exact shape of a secret with ``prefix`` (no store lookup)."""
    return value.startswith(prefix) and _SHAPE.fullmatch(value) is not None


def new_id(prefix: str) -> str:
    """A public identifier (``key_...``, ``cs_...``): safe to print, log and type."""
    return prefix + secrets.token_hex(8)
