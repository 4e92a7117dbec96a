"""Where a handshake may carry a credential, and which one counts.

In order (DESIGN.md, "Credentials"): ``Authorization: Bearer``, the
``Sec-WebSocket-Protocol`` header (``wardgate.bearer.<token>`` offered beside
``wardgate.v1``, since browsers cannot set headers on a WebSocket), the session
cookie, ``X-API-Key``, and only when enabled the ``?token=``/``?apiKey=`` query
parameters. The first one present is the one verified; a credential in a place
that is switched off is refused, never silently ignored (seed 003, finding 2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from wardgate.errors import AuthenticationRequired, CsrfFailed, InvalidToken

SUBPROTOCOL: Final = "wardgate.v1"
BEARER_SUBPROTOCOL_PREFIX: Final = "wardgate.bearer."
SESSION_COOKIE: Final = "wardgate_session"
QUERY_PARAMETERS: Final = ("token", "apiKey")
CSRF_HEADER: Final = "X-CSRF-Token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


class CredentialSource(StrEnum):
    AUTHORIZATION = "authorization"
    SUBPROTOCOL = "subprotocol"
    COOKIE = "cookie"
    API_KEY_HEADER = "x-api-key"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class Credential:
    token: str = field(repr=False)
    source: CredentialSource


def offered_subprotocols(header: str | None) -> list[str]:
    if not header:
        return []
    return [part.strip() for part in header.split(",") if part.strip()]


def _cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def extract_credential(
    headers: Mapping[str, str],
    query: Mapping[str, str],
    *,
    allow_query: bool,
) -> Credential | None:
    """The credential a request carries, or None. ``headers`` must be case-insensitive."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken(hint="the Authorization header must be 'Bearer <token>'")
        return Credential(token.strip(), CredentialSource.AUTHORIZATION)
    for offered in offered_subprotocols(headers.get("Sec-WebSocket-Protocol")):
        if offered.startswith(BEARER_SUBPROTOCOL_PREFIX):
            return Credential(offered[len(BEARER_SUBPROTOCOL_PREFIX) :], CredentialSource.SUBPROTOCOL)
    cookie = _cookie_value(headers.get("Cookie"), SESSION_COOKIE)
    if cookie:
        return Credential(cookie, CredentialSource.COOKIE)
    api_key = headers.get("X-API-Key")
    if api_key is not None:
        return Credential(api_key.strip(), CredentialSource.API_KEY_HEADER)
    for name in QUERY_PARAMETERS:
        value = query.get(name)
        if value is not None:
            if not allow_query:
                raise AuthenticationRequired(
                    hint="query-string credentials are disabled (security.allow_query_token); "
                    "send the token in the Authorization header or the wardgate.bearer subprotocol"
                )
            return Credential(value, CredentialSource.QUERY)
    return None


def csrf_token(cookie_value: str) -> str:
    """The CSRF token that goes with a session cookie: derived from the cookie's secret value,
    so only someone who was handed the login response knows it (a cross-site page that makes the
    browser send the cookie never sees the cookie's value)."""
    mac = hmac.digest(cookie_value.encode(), b"wardgate-csrf-v1", hashlib.sha256)
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def check_csrf(method: str, headers: Mapping[str, str], credential: Credential | None) -> None:
    """A state-changing request authenticated by the cookie must carry the CSRF token
    (the allowed-Origin requirement for cookies is applied by the gate's precheck)."""
    if credential is None or credential.source is not CredentialSource.COOKIE or method in SAFE_METHODS:
        return
    given = headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(given.encode(), csrf_token(credential.token).encode()):
        raise CsrfFailed
