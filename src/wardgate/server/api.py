"""The HTTP API: health, and the pairing-token exchange, refresh and revoke endpoints.

Every route passes the same address and host checks as a WebSocket; the
state-changing ones also pass the Origin check, so a web page on another site
cannot drive them (CSRF). Errors are seed 000's JSON bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from aiohttp import web

from wardgate.errors import AuthenticationRequired, InvalidRequest, TokenRevoked, WardgateError
from wardgate.gate.decide import Precheck, precheck
from wardgate.server.ws import iso8601

if TYPE_CHECKING:
    from wardgate.authority import IssuedSession
    from wardgate.server.app import Gateway


class ExchangeBody(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    deviceName: str | None = None
    deviceId: str | None = None


class RefreshBody(msgspec.Struct, forbid_unknown_fields=True):
    refreshToken: str


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
        return gateway.reject(request, check.failure, request.remote)
    return web.json_response({"status": "ok"})


async def exchange(request: web.Request) -> web.Response:
    """POST /api/auth/exchange: a pairing token for a device session and refresh token."""
    gateway = _gateway(request)
    ip, check = request.remote, None
    try:
        check = gateway.guard(request)
        ip = _ip(check)
        body = await _body(request, ExchangeBody)
        claims = await gateway.authority.verify_pairing(body.token)
        issued = await gateway.authority.redeem_pairing(
            claims, device_name=body.deviceName, client_info={"deviceId": body.deviceId}, ip=ip
        )
    except WardgateError as exc:
        gateway.auth_failed(check, exc)
        gateway.audit("auth.failed", reason=exc.reason, ip=ip, via="exchange")
        return gateway.reject(request, exc, ip)
    gateway.audit("pairing.redeemed", device=issued.device_id, ip=ip, via="exchange")
    return _no_store(web.json_response(_issued(issued)))


async def refresh(request: web.Request) -> web.Response:
    """POST /api/auth/refresh: rotate a refresh token (reuse revokes the device)."""
    gateway = _gateway(request)
    ip, check = request.remote, None
    try:
        check = gateway.guard(request)
        ip = _ip(check)
        body = await _body(request, RefreshBody)
        issued = await gateway.authority.refresh(body.refreshToken)
    except WardgateError as exc:
        gateway.auth_failed(check, exc)
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
    ip, check = request.remote, None
    try:
        check = gateway.guard(request)
        ip = _ip(check)
        if check.credential is None:
            raise AuthenticationRequired
        claims = gateway.authority.verify_session(check.credential.token)
    except WardgateError as exc:
        gateway.auth_failed(check, exc)
        return gateway.reject(request, exc, ip)
    if claims.sub is not None:
        await gateway.revoke_device(claims.sub, by="self")
    return _no_store(web.json_response({"revoked": claims.sub is not None}))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_post("/api/auth/exchange", exchange)
    app.router.add_post("/api/auth/refresh", refresh)
    app.router.add_post("/api/auth/revoke", revoke)
