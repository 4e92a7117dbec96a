"""The HTTP API: health; pairing-token exchange, refresh and revoke; browser login and logout.

Every route passes the same address and host checks as a WebSocket; the
state-changing ones also pass the Origin check, so a web page on another site
cannot drive them (CSRF). A request authenticated by the session cookie must
also come from an allowed Origin (the gate's precheck) and, when it changes
state, carry the ``X-CSRF-Token`` that login returned. Errors are seed 000's
JSON bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from wardgate.errors import (
    AuthenticationRequired,
    InvalidRequest,
    InvalidToken,
    TokenExpired,
    TokenRevoked,
    WardgateError,
)
from wardgate.gate.credentials import SESSION_COOKIE, CredentialSource, check_csrf, csrf_token
from wardgate.gate.decide import Precheck, precheck
from wardgate.server.ws import iso8601

if TYPE_CHECKING:
    from wardgate.authority import IssuedSession, Principal
    from wardgate.gate.credentials import Credential
    from wardgate.server.app import Gateway


class ExchangeBody(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    deviceName: str | None = None
    deviceId: str | None = None


class RefreshBody(msgspec.Struct, forbid_unknown_fields=True):
    refreshToken: str


class LoginBody(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    """A pairing token (registers this browser as a device) or an API key."""
    deviceName: str | None = None


def _gateway(request: web.Request) -> Gateway:
    from wardgate.server.app import GATEWAY_KEY

    return request.app[GATEWAY_KEY]


def _ip(check: Precheck) -> str | None:
    return str(check.client_ip) if check.client_ip is not None else None


T = TypeVar("T")


async def _body(request: web.Request, schema: type[T]) -> T:
    try:
        return msgspec.json.decode(await request.read(), type=schema)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidRequest(hint="the body must be a JSON object with the documented fields") from None


def _issued(issued: IssuedSession) -> dict[str, Any]:
    return {
        "sessionToken": issued.session_token,
        "expiresAt": iso8601(issued.session_expires_at),
        "refreshToken": issued.refresh_token,
        "refreshExpiresAt": iso8601(issued.refresh_expires_at),
        "deviceId": issued.device_id,
        "role": issued.role,
    }


def _no_store(response: web.Response) -> web.Response:
    response.headers["Cache-Control"] = "no-store"
    return response


async def health(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    check = precheck(gateway.facts(request), gateway.policy)
    if check.failure is not None:
        return gateway.reject(request, check.failure)
    if not gateway.store_available:
        # A load balancer should send new logins elsewhere; established connections carry on.
        return web.json_response({"status": "unavailable"}, status=503)
    return web.json_response({"status": "ok"})


async def exchange(request: web.Request) -> web.Response:
    """POST /api/auth/exchange: a pairing token for a device session and refresh token."""
    gateway = _gateway(request)
    ip, check = gateway.client_address(request), None
    try:
        check = await gateway.guard(request)
        ip = _ip(check)
        body = await _body(request, ExchangeBody)
        claims = await gateway.authority.verify_pairing(body.token)
        issued = await gateway.authority.redeem_pairing(
            claims, device_name=body.deviceName, client_info={"deviceId": body.deviceId}, ip=ip
        )
    except WardgateError as exc:
        await gateway.auth_failed(check, exc)
        gateway.audit("auth.failed", reason=exc.reason, ip=ip, via="exchange")
        return gateway.reject(request, exc, ip)
    gateway.audit("pairing.redeemed", device=issued.device_id, ip=ip, via="exchange")
    return _no_store(web.json_response(_issued(issued)))


async def refresh(request: web.Request) -> web.Response:
    """POST /api/auth/refresh: rotate a refresh token (reuse revokes the device)."""
    gateway = _gateway(request)
    ip, check = gateway.client_address(request), None
    try:
        check = await gateway.guard(request)
        ip = _ip(check)
        body = await _body(request, RefreshBody)
        issued = await gateway.authority.refresh(body.refreshToken)
    except WardgateError as exc:
        await gateway.auth_failed(check, exc)
        gateway.audit("auth.failed", reason=exc.reason, ip=ip, via="refresh")
        if isinstance(exc, TokenRevoked):
            # Reuse detection revoked a device: close its live sockets now, not at the next poll.
            await gateway.enforce_revocations()
        return gateway.reject(request, exc, ip)
    gateway.audit("token.refreshed", device=issued.device_id, ip=ip)
    return _no_store(web.json_response(_issued(issued)))


async def revoke(request: web.Request) -> web.Response:
    """POST /api/auth/revoke with a bearer session token: log that device out."""
    gateway = _gateway(request)
    ip, check = gateway.client_address(request), None
    try:
        check = await gateway.guard(request)
        ip = _ip(check)
        if check.credential is None:
            raise AuthenticationRequired
        claims = gateway.authority.verify_session(check.credential.token)
    except WardgateError as exc:
        await gateway.auth_failed(check, exc)
        return gateway.reject(request, exc, ip)
    if claims.sub is not None:
        await gateway.revoke_device(claims.sub, by="self")
    return _no_store(web.json_response({"revoked": claims.sub is not None}))


def _cookie_header(gateway: Gateway, value: str, max_age: int) -> str:
    settings = gateway.config.security.cookie
    parts = [f"{SESSION_COOKIE}={value}", f"Path={settings.path}", f"Max-Age={max_age}", "HttpOnly"]
    parts.append("SameSite=Strict")
    if gateway.config.cookie_secure:
        parts.append("Secure")
    return "; ".join(parts)


async def login(request: web.Request) -> web.Response:
    """POST /api/auth/login: a pairing token or an API key for an httpOnly session cookie."""
    gateway = _gateway(request)
    ip, check = gateway.client_address(request), None
    try:
        check = await gateway.guard(request)
        ip = _ip(check)
        body = await _body(request, LoginBody)
        done = await gateway.authority.login(body.token, device_name=body.deviceName, ip=ip)
    except WardgateError as exc:
        await gateway.auth_failed(check, exc)
        gateway.audit("auth.failed", reason=exc.reason, ip=ip, via="login")
        return gateway.reject(request, exc, ip)
    session = done.session
    gateway.audit(
        "auth.login",
        ip=ip,
        session=session.id,
        device=session.device_id,
        key=session.api_key_id,
        via="api_key" if session.api_key_id else "pairing",
    )
    response = web.json_response(
        {
            "csrfToken": csrf_token(done.cookie),
            "role": session.role,
            "deviceId": session.device_id,
            "expiresAt": iso8601(session.expires_at),
            "endsAt": iso8601(session.max_expires_at),
        }
    )
    response.headers["Set-Cookie"] = _cookie_header(
        gateway, done.cookie, max(1, int(session.max_expires_at - session.created_at))
    )
    return _no_store(response)


async def _cookie_principal(
    request: web.Request, gateway: Gateway
) -> tuple[Credential, Principal, str | None]:
    check = await gateway.guard(request)
    credential = check.credential
    if credential is None:
        raise AuthenticationRequired(hint="no browser session: log in first")
    if credential.source is not CredentialSource.COOKIE:
        raise InvalidToken(hint="this endpoint is for browser sessions (the wardgate_session cookie)")
    principal = await gateway.authority.authenticate(credential.token)
    return credential, principal, _ip(check)


def _failed_check(gateway: Gateway, request: web.Request) -> Precheck | None:
    """The precheck to count a failed cookie authentication against (None: refused earlier)."""
    check = precheck(gateway.facts(request), gateway.policy)
    return check if check.failure is None else None


async def logout(request: web.Request) -> web.Response:
    """POST /api/auth/logout: end this browser session (and close its live connections)."""
    gateway = _gateway(request)
    ip = gateway.client_address(request)
    try:
        credential, principal, ip = await _cookie_principal(request, gateway)
        check_csrf(request.method, request.headers, credential)
    except WardgateError as exc:
        await gateway.auth_failed(_failed_check(gateway, request), exc)
        response = gateway.reject(request, exc, ip)
        if isinstance(exc, (InvalidToken, TokenRevoked, TokenExpired)):
            response.headers["Set-Cookie"] = _cookie_header(gateway, "", 0)
        return response
    await gateway.authority.logout(principal)
    await gateway.enforce_revocations()
    gateway.audit("auth.logout", ip=ip, session=principal.cookie_id, device=principal.device_id)
    response = web.json_response({"loggedOut": True})
    response.headers["Set-Cookie"] = _cookie_header(gateway, "", 0)
    return _no_store(response)


async def session_info(request: web.Request) -> web.Response:
    """GET /api/auth/session: who this browser session is, and its CSRF token (after a reload)."""
    gateway = _gateway(request)
    ip = gateway.client_address(request)
    try:
        credential, principal, ip = await _cookie_principal(request, gateway)
    except WardgateError as exc:
        await gateway.auth_failed(_failed_check(gateway, request), exc)
        return gateway.reject(request, exc, ip)
    return _no_store(
        web.json_response(
            {
                "csrfToken": csrf_token(credential.token),
                "role": principal.role,
                "deviceId": principal.device_id,
                "keyId": principal.key_id,
            }
        )
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_post("/api/auth/exchange", exchange)
    app.router.add_post("/api/auth/refresh", refresh)
    app.router.add_post("/api/auth/revoke", revoke)
    app.router.add_post("/api/auth/login", login)
    app.router.add_post("/api/auth/logout", logout)
    app.router.add_get("/api/auth/session", session_info)
