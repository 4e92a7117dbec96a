"""Issuing, verifying, rotating and revoking credentials against the store.

``tokens`` decides whether a token is well formed and signed; this module adds
what needs state: single-use pairing nonces and the pairing generation,
refresh-token rotation with reuse detection, and the revocation snapshot that
session tokens are checked against. It is the only place that mints tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from wardgate import tokens
from wardgate.errors import InvalidToken, TokenRevoked
from wardgate.keys import KeyRing
from wardgate.roles import DEFAULT_PAIRING_ROLE, Role, Scope, scopes_for
from wardgate.store.base import (
    Device,
    Family,
    NewRefresh,
    RedeemOutcome,
    Revocations,
    RotateOutcome,
    Store,
    token_hash,
)
from wardgate.tokens import TokenClaims, TokenKind

MAX_NAME_LENGTH: Final = 100


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection, as far as the gate has verified."""

    kind: str
    """``pairing``, ``session`` or ``anonymous`` (local mode without auth)."""
    role: str
    scopes: frozenset[Scope]
    device_id: str | None = None
    claims: TokenClaims | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """What rate limits and connection caps are keyed on: the device, or the pairing nonce."""
        if self.device_id is not None:
            return f"device:{self.device_id}"
        if self.claims is not None:
            return f"pairing:{self.claims.jti}"
        return "anonymous"


ANONYMOUS: Final = Principal(kind="anonymous", role=Role.OPERATOR, scopes=scopes_for(Role.OPERATOR))


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """What a successful pairing or refresh hands the client."""

    device_id: str
    session_token: str = field(repr=False)
    session_expires_at: int
    refresh_token: str = field(repr=False)
    refresh_expires_at: int
    role: str


class Authority:
    def __init__(
        self,
        *,
        keys: KeyRing,
        store: Store,
        pairing_ttl: int,
        session_ttl: int,
        refresh_ttl: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.store = store
        self.pairing_ttl = pairing_ttl
        self.session_ttl = session_ttl
        self.refresh_ttl = refresh_ttl
        self.clock = clock
        self.revoked = Revocations(revision=-1)

    # --- issuing -------------------------------------------------------------------------

    def _claims(self, kind: TokenKind, ttl: int, now: float, **extra: object) -> TokenClaims:
        iat = int(now)
        return TokenClaims(
            v=tokens.TOKEN_VERSION,
            kid=self.keys.active_kid,
            typ=kind,
            sid=self.keys.server_id,
            iat=iat,
            exp=iat + ttl,
            jti=tokens.new_token_id(),
            **extra,  # type: ignore[arg-type]
        )

    def _sign(self, claims: TokenClaims) -> str:
        return tokens.sign(claims, self.keys.active_key)

    async def issue_pairing(
        self, role: str = DEFAULT_PAIRING_ROLE, *, ttl: int | None = None
    ) -> tuple[str, TokenClaims]:
        role = Role(role).value
        generation = await self.store.pairing_generation()
        claims = self._claims(
            TokenKind.PAIRING, ttl or self.pairing_ttl, self.clock(), role=role, gen=generation
        )
        return self._sign(claims), claims

    def issue_session(self, device_id: str, role: str, family_id: str | None) -> tuple[str, TokenClaims]:
        claims = self._claims(
            TokenKind.SESSION, self.session_ttl, self.clock(), sub=device_id, fam=family_id, role=role
        )
        return self._sign(claims), claims

    def _issue_refresh(self, device_id: str, family_id: str, now: float) -> tuple[str, TokenClaims]:
        claims = self._claims(TokenKind.REFRESH, self.refresh_ttl, now, sub=device_id, fam=family_id)
        return self._sign(claims), claims

    # --- verifying ------------------------------------------------------------------------

    def _verify(self, token: str, kind: TokenKind) -> TokenClaims:
        return tokens.verify(token, kind, self.keys.keys, server_id=self.keys.server_id, now=self.clock())

    async def verify_pairing(self, token: str) -> TokenClaims:
        claims = self._verify(token, TokenKind.PAIRING)
        if claims.gen != await self.store.pairing_generation():
            raise InvalidToken(hint="this pairing code was replaced; run 'wardgate pair' again")
        if await self.store.nonce_consumed(claims.jti):
            raise InvalidToken(hint="this pairing code was already used; run 'wardgate pair' again")
        return claims

    def verify_session(self, token: str) -> TokenClaims:
        """Verify a session token against the signature, expiry and the revocation snapshot."""
        claims = self._verify(token, TokenKind.SESSION)
        if self.session_revoked(claims):
            raise TokenRevoked
        return claims

    def session_revoked(self, claims: TokenClaims) -> bool:
        return self.revoked.session_revoked(
            device=claims.sub, family=claims.fam, jti=claims.jti, iat=claims.iat
        )

    async def authenticate(self, token: str) -> Principal:
        """Who presents ``token`` at a connection: a pairing or a session principal."""
        kind = tokens.kind_of(token)
        if kind is TokenKind.PAIRING:
            claims = await self.verify_pairing(token)
            role = claims.role or DEFAULT_PAIRING_ROLE
            return Principal(kind="pairing", role=role, scopes=scopes_for(role), claims=claims)
        if kind is TokenKind.SESSION:
            claims = self.verify_session(token)
            role = claims.role or ""
            return Principal(
                kind="session", role=role, scopes=scopes_for(role), device_id=claims.sub, claims=claims
            )
        # A refresh token (or anything else) is not a connection credential.
        raise InvalidToken(hint="present a pairing or session token")

    # --- state changes -----------------------------------------------------------------------

    async def reload_revocations(self) -> Revocations:
        self.revoked = await self.store.revocations(self.clock())
        return self.revoked

    async def redeem_pairing(
        self,
        claims: TokenClaims,
        *,
        device_name: str | None,
        client_info: dict[str, object] | None = None,
        ip: str | None = None,
    ) -> IssuedSession:
        """Consume a verified pairing token once and register a new device."""
        now = self.clock()
        device_id = "dev_" + tokens.new_token_id()
        family_id = "fam_" + tokens.new_token_id()
        role = claims.role or DEFAULT_PAIRING_ROLE
        refresh, refresh_claims = self._issue_refresh(device_id, family_id, now)
        name = (device_name or "unnamed device").strip()[:MAX_NAME_LENGTH] or "unnamed device"
        outcome = await self.store.redeem_pairing(
            jti=claims.jti,
            generation=claims.gen,
            nonce_expires_at=claims.exp,
            device=Device(
                id=device_id,
                name=name,
                role=role,
                created_at=now,
                client_info=json.dumps(client_info or {}, separators=(",", ":"))[:2000],
                last_seen=now,
                last_ip=ip,
            ),
            family=Family(id=family_id, device_id=device_id, created_at=now, expires_at=refresh_claims.exp),
            refresh=NewRefresh(token_hash(refresh), family_id, refresh_claims.exp),
        )
        if outcome is not RedeemOutcome.REDEEMED:
            raise InvalidToken(
                hint="this pairing code was already used or replaced; run 'wardgate pair' again"
            )
        session, session_claims = self.issue_session(device_id, role, family_id)
        return IssuedSession(device_id, session, session_claims.exp, refresh, refresh_claims.exp, role)

    async def refresh(self, refresh_token: str) -> IssuedSession:
        """Rotate a refresh token: the old one dies; a second use of it revokes the device."""
        claims = self._verify(refresh_token, TokenKind.REFRESH)
        if claims.sub is None or claims.fam is None:
            raise InvalidToken
        now = self.clock()
        device = await self.store.get_device(claims.sub)
        if device is None:
            raise InvalidToken
        new_token, new_claims = self._issue_refresh(claims.sub, claims.fam, now)
        result = await self.store.rotate_refresh(
            token_hash(refresh_token), NewRefresh(token_hash(new_token), claims.fam, new_claims.exp), now=now
        )
        if result.outcome is RotateOutcome.REUSED:
            await self.reload_revocations()
            raise TokenRevoked(hint="this refresh token was already used; the device has been revoked")
        if result.outcome is RotateOutcome.REVOKED:
            raise TokenRevoked
        if result.outcome is not RotateOutcome.ROTATED:
            raise InvalidToken
        session, session_claims = self.issue_session(claims.sub, device.role, claims.fam)
        return IssuedSession(claims.sub, session, session_claims.exp, new_token, new_claims.exp, device.role)

    async def refresh_session(self, current: TokenClaims) -> tuple[str, TokenClaims]:
        """Replace a live session token with a new one; the old one stops working."""
        token, claims = self.issue_session(current.sub or "", current.role or "", current.fam)
        await self.revoke_session(current)
        return token, claims

    async def revoke_session(self, claims: TokenClaims) -> None:
        await self.store.revoke_token(claims.jti, expires_at=claims.exp)
        await self.reload_revocations()

    async def revoke_device(self, device_id: str) -> bool:
        changed = await self.store.revoke_device(device_id, now=self.clock())
        await self.reload_revocations()
        return changed
