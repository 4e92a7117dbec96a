"""Issuing, verifying, rotating and revoking credentials against the store.

``tokens`` decides whether a token is well formed and signed; this module adds
what needs state: single-use pairing nonces and the pairing generation,
refresh-token rotation with reuse detection, and the revocation snapshot that
session tokens are checked against. It is the only place that mints tokens.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from wardgate import apikeys, tokens
from wardgate.errors import InvalidRequest, InvalidToken, TokenExpired, TokenRevoked
from wardgate.keys import KeyRing
from wardgate.roles import DEFAULT_PAIRING_ROLE, Role, Scope, scopes_for
from wardgate.store.base import (
    ApiKey,
    CookieSession,
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
TOUCH_INTERVAL: Final = 60.0
"""Seconds between recorded uses of one API key, and between slides of one cookie's expiry:
authentication does not write to the store on every request."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on the other end of a connection, as far as the gate has verified."""

    kind: str
    """``pairing``, ``session``, ``api_key``, ``cookie`` or ``anonymous`` (local mode without auth)."""
    role: str
    scopes: frozenset[Scope]
    device_id: str | None = None
    claims: TokenClaims | None = field(default=None, repr=False)
    key_id: str | None = None
    """The API key this principal is (``api_key``) or logged in with (``cookie``)."""
    cookie_id: str | None = None
    """The browser session (``cookie``)."""
    family_id: str | None = None
    issued_at: float = 0.0
    """When the credential was issued (cookie sessions: the login), for ``revoke-all``."""
    expires_at: float | None = None
    """When a connection made with this credential must end (API keys with an expiry, the
    cookie session's maximum lifetime); session tokens carry theirs in ``claims``."""

    @property
    def ends_at(self) -> float | None:
        """When a connection made with this credential must end (None: when it is revoked)."""
        if self.kind == "session" and self.claims is not None:
            return float(self.claims.exp)
        return self.expires_at

    @property
    def key(self) -> str:
        """What rate limits and connection caps are keyed on: the device or API key, else the
        pairing nonce. A browser session counts as the device or key it logged in as."""
        if self.device_id is not None:
            return f"device:{self.device_id}"
        if self.key_id is not None:
            return f"key:{self.key_id}"
        if self.claims is not None:
            return f"pairing:{self.claims.jti}"
        return "anonymous"


ANONYMOUS: Final = Principal(kind="anonymous", role=Role.OPERATOR, scopes=scopes_for(Role.OPERATOR))


def require_redeemed(principal: Principal) -> None:
    """Refuse a pairing code where it is not traded for a session (relays, metrics): it is
    single use, and accepted there it would be a reusable bearer token for its whole life."""
    if principal.kind == "pairing":
        raise InvalidToken(
            hint="a pairing code is traded for a session first (initialize, /api/auth/exchange or "
            "/api/auth/login); present the session token, an API key or the browser session"
        )


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """What a successful pairing or refresh hands the client."""

    device_id: str
    session_token: str = field(repr=False)
    session_expires_at: int
    refresh_token: str = field(repr=False)
    refresh_expires_at: int
    role: str
    family_id: str = ""


@dataclass(frozen=True, slots=True)
class Login:
    """A browser login: the cookie value (set once, httpOnly) and the session it stands for."""

    cookie: str = field(repr=False)
    session: CookieSession


class Authority:
    def __init__(
        self,
        *,
        keys: KeyRing,
        store: Store,
        pairing_ttl: int,
        session_ttl: int,
        refresh_ttl: int,
        cookie_idle_ttl: int = 8 * 3600,
        cookie_max_ttl: int = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.store = store
        self.pairing_ttl = pairing_ttl
        self.session_ttl = session_ttl
        self.refresh_ttl = refresh_ttl
        self.cookie_idle_ttl = cookie_idle_ttl
        self.cookie_max_ttl = cookie_max_ttl
        self.clock = clock
        self.revoked = Revocations(revision=-1)
        self._touched: dict[str, float] = {}
        """When each API key's use was last recorded (bounded by the number of keys)."""
        self._max_generation = -1
        """The highest pairing generation this process has seen (see ``reload_revocations``)."""
        self._reloading = asyncio.Lock()
        """One reload at a time: a read answered after a later one must not look like the store
        going back in time."""

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
        self._max_generation = max(self._max_generation, generation)
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
        self._max_generation = max(self._max_generation, claims.gen)
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

    def principal_revoked(self, principal: Principal) -> bool:
        """Whether a live connection's principal has been revoked since it connected."""
        revoked = self.revoked
        if principal.kind == "session" and principal.claims is not None:
            return self.session_revoked(principal.claims)
        if principal.kind == "api_key":
            return principal.key_id in revoked.api_keys
        if principal.kind == "cookie":
            return (
                principal.cookie_id in revoked.cookies
                or (principal.key_id is not None and principal.key_id in revoked.api_keys)
                or revoked.session_revoked(
                    device=principal.device_id,
                    family=principal.family_id,
                    jti="",
                    # ``not_before`` is whole seconds: a login within the second of a revoke-all
                    # counts as before it (fail safe).
                    iat=math.floor(principal.issued_at) - 0.5,
                )
            )
        return False

    async def authenticate(self, token: str) -> Principal:
        """Who presents ``token``: a pairing, session, API key or browser-cookie principal."""
        if token.startswith(apikeys.API_KEY_PREFIX):
            return await self._authenticate_api_key(token)
        if token.startswith(apikeys.COOKIE_PREFIX):
            return await self._authenticate_cookie(token)
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
        raise InvalidToken(hint="present a pairing token, a session token or an API key")

    async def _api_key(self, secret: str) -> ApiKey:
        if not apikeys.well_formed(secret, apikeys.API_KEY_PREFIX):
            raise InvalidToken
        key = await self.store.api_key_by_hash(token_hash(secret))
        if key is None:
            raise InvalidToken
        now = self.clock()
        if key.revoked_at is not None:
            raise TokenRevoked
        if key.expires_at is not None and now >= key.expires_at:
            raise TokenExpired(hint="this API key has expired; create a new one with 'wardgate keys create'")
        if now - self._touched.get(key.id, 0.0) >= TOUCH_INTERVAL:
            self._touched[key.id] = now
            await self.store.touch_api_key(key.id, now=now)
        return key

    async def _authenticate_api_key(self, secret: str) -> Principal:
        key = await self._api_key(secret)
        return Principal(
            kind="api_key",
            role=key.role,
            scopes=scopes_for(key.role),
            key_id=key.id,
            expires_at=key.expires_at,
        )

    async def _authenticate_cookie(self, value: str) -> Principal:
        if not apikeys.well_formed(value, apikeys.COOKIE_PREFIX):
            raise InvalidToken
        session = await self.store.cookie_session_by_hash(token_hash(value))
        if session is None:
            raise InvalidToken(hint="this browser session is unknown; log in again")
        now = self.clock()
        if session.revoked_at is not None:
            raise TokenRevoked(hint="this browser session was logged out or revoked; log in again")
        # The lookup went to the store anyway: make the revocation check as fresh as the row.
        if await self.store.revision() != self.revoked.revision:
            await self.reload_revocations()
        if not session.usable(now):
            raise TokenExpired(hint="this browser session has expired; log in again")
        principal = Principal(
            kind="cookie",
            role=session.role,
            scopes=scopes_for(session.role),
            device_id=session.device_id,
            key_id=session.api_key_id,
            cookie_id=session.id,
            family_id=session.family_id,
            issued_at=session.created_at,
            expires_at=session.max_expires_at,
        )
        if self.principal_revoked(principal):
            raise TokenRevoked(hint="this browser session was revoked; log in again")
        slid = min(now + self.cookie_idle_ttl, session.max_expires_at)
        if slid - session.expires_at >= TOUCH_INTERVAL:
            await self.store.extend_cookie_session(session.id, expires_at=slid)
        return principal

    # --- API keys and browser logins -----------------------------------------------------------

    async def create_api_key(self, name: str, role: str, *, ttl: int | None = None) -> tuple[str, ApiKey]:
        """A new API key: the secret is returned once and only its hash is stored."""
        name = name.strip()[:MAX_NAME_LENGTH]
        if not name:
            raise InvalidRequest(hint="an API key needs a name")
        if ttl is not None and ttl <= 0:
            raise InvalidRequest(hint="an API key's lifetime must be positive")
        if role not in {r.value for r in Role}:
            raise InvalidRequest(hint="the role must be one of: viewer, operator, admin")
        now = self.clock()
        secret = apikeys.new_api_key()
        key = ApiKey(
            id=apikeys.new_id("key_"),
            name=name,
            role=role,
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
        )
        await self.store.create_api_key(key, key_hash=token_hash(secret))
        return secret, key

    async def revoke_api_key(self, key_id: str) -> bool:
        changed = await self.store.revoke_api_key(key_id, now=self.clock())
        await self.reload_revocations()
        return changed

    async def login(self, token: str, *, device_name: str | None, ip: str | None) -> Login:
        """Open a browser session with a pairing token (which registers a device, once) or an
        API key (the session stands for the key and ends with it)."""
        now = self.clock()
        ends = now + self.cookie_max_ttl
        device_id = family_id = key_id = None
        if token.startswith(apikeys.API_KEY_PREFIX):
            key = await self._api_key(token)
            role, key_id = key.role, key.id
            if key.expires_at is not None:
                ends = min(ends, key.expires_at)
        elif tokens.kind_of(token) is TokenKind.PAIRING:
            claims = await self.verify_pairing(token)
            issued = await self.redeem_pairing(
                claims, device_name=device_name or "browser", client_info={"via": "login"}, ip=ip
            )
            role, device_id, family_id = issued.role, issued.device_id, issued.family_id
        else:
            raise InvalidToken(hint="log in with a pairing token or an API key")
        session = CookieSession(
            id=apikeys.new_id("cs_"),
            role=role,
            created_at=now,
            expires_at=min(now + self.cookie_idle_ttl, ends),
            max_expires_at=ends,
            device_id=device_id,
            family_id=family_id,
            api_key_id=key_id,
        )
        cookie = apikeys.new_cookie_value()
        await self.store.create_cookie_session(session, session_hash=token_hash(cookie))
        return Login(cookie, session)

    async def logout(self, principal: Principal) -> bool:
        if principal.cookie_id is None:
            return False
        changed = await self.store.revoke_cookie_session(principal.cookie_id, now=self.clock())
        await self.reload_revocations()
        return changed

    # --- state changes -----------------------------------------------------------------------

    async def reload_revocations(self) -> Revocations:
        async with self._reloading:
            return await self._reload_revocations()

    async def _reload_revocations(self) -> Revocations:
        fresh = await self.store.revocations(self.clock())
        old = self.revoked
        if fresh.revision < old.revision:
            # The store went back in time (a Redis restarted without its data): what this process
            # knew was revoked stays revoked. Forgetting a revocation must never reopen a door;
            # nor may a pairing code whose use was forgotten work again, so every code issued so
            # far is invalidated (the generation moves past any this process has seen).
            generation = await self.store.pairing_generation()
            while generation <= self._max_generation:
                generation = await self.store.bump_pairing_generation()
            fresh = Revocations(
                revision=fresh.revision,
                devices=fresh.devices | old.devices,
                families=fresh.families | old.families,
                tokens=fresh.tokens | old.tokens,
                not_before=max(fresh.not_before, old.not_before),
                api_keys=fresh.api_keys | old.api_keys,
                cookies=fresh.cookies | old.cookies,
            )
        self.revoked = fresh
        return fresh

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
        return IssuedSession(
            device_id, session, session_claims.exp, refresh, refresh_claims.exp, role, family_id
        )

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

    async def revoke_session(self, claims: TokenClaims) -> None:
        await self.store.revoke_token(claims.jti, expires_at=claims.exp)
        await self.reload_revocations()

    async def revoke_device(self, device_id: str) -> bool:
        changed = await self.store.revoke_device(device_id, now=self.clock())
        await self.reload_revocations()
        return changed
