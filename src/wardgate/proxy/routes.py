"""The ``/proxy/<name>/{ws,sse,http}/<path>`` routes and the checks every relay request passes.

In order: the gate (``Gateway.admit``: address, host, origin, rate, credential, and the caps:
global, per address, per principal and, for WebSocket and SSE relays, per upstream and
principal, ``upstreams.<name>.max_connections_per_user``), the ``proxy:use`` scope, the
upstream's name (404 for an unknown one, after authentication so that names cannot be
probed), the path (400 for traversal tricks, 403 outside ``allow_paths``), the method (405
with ``Allow``), and for the http relay the CSRF header of cookie sessions. Every refusal goes
through ``Gateway.refuse``: an HTTP status and JSON body, or with
``security.reject_style: close`` an upgrade closed with 1008.

Each request holds the lease ``admit`` took under its connection id until it ends: a live
relay gives it back when it closes (``Gateway.unregister``), anything else when answered.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from wardgate.authority import Principal, require_redeemed
from wardgate.errors import MethodNotAllowed, PathRefused, PermissionDenied, UpstreamNotFound, WardgateError
from wardgate.gate.credentials import check_csrf
from wardgate.limits import Slot
from wardgate.logs import add_secrets, connection_id
from wardgate.proxy.http import relay_http
from wardgate.proxy.paths import filter_query, parse_relay_path
from wardgate.proxy.sse import relay_sse
from wardgate.proxy.state import Admitted, ProxyState
from wardgate.proxy.upstream import NAME, resolve_upstreams, secrets_for_logs
from wardgate.proxy.websocket import relay_websocket
from wardgate.roles import Scope
from wardgate.server.app import GATEWAY_KEY

log = logging.getLogger("wardgate.proxy")

PROXY_KEY: Final = web.AppKey("proxy", ProxyState)
STREAM_METHODS: Final = frozenset({"GET"})
"""The WebSocket and SSE relays accept GET only."""

Relay = Callable[[ProxyState, Admitted, web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application) -> None:
    """Resolve the upstreams' header secrets (ConfigError on failure) and register the relays."""
    gateway = app[GATEWAY_KEY]
    upstreams = resolve_upstreams(gateway.config.upstreams)
    add_secrets(secrets_for_logs(upstreams))
    state = ProxyState(gateway, upstreams)
    app[PROXY_KEY] = state
    gateway.shutdown_hooks.append(state.close)
    app.router.add_route("*", "/proxy/{name}/ws/{path:.*}", _endpoint("ws", relay_websocket))
    app.router.add_route("*", "/proxy/{name}/sse/{path:.*}", _endpoint("sse", relay_sse))
    app.router.add_route("*", "/proxy/{name}/http/{path:.*}", _endpoint("http", relay_http))


def _endpoint(kind: str, relay: Relay) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        state = request.app[PROXY_KEY]
        gateway = state.gateway
        conn_id = "p_" + secrets.token_hex(6)
        connection_id.set(conn_id)
        client_ip: str | None = None  # the refusal works it out when the gate did not
        name = request.match_info["name"]
        upstream = state.upstreams.get(name) if NAME.fullmatch(name) else None

        def upstream_slot(principal: Principal) -> tuple[Slot, ...]:
            if upstream is None or kind == "http":
                return ()
            return (
                Slot(
                    f"upstream:{upstream.name}:{principal.key}",
                    upstream.settings.max_connections_per_user,
                    "too many relays to this upstream for this device or key",
                ),
            )

        try:
            check, principal, credential = await gateway.admit(
                request,
                lease=conn_id,
                slots=upstream_slot,
                bucket="requests" if kind == "http" else "handshakes",
            )
            client_ip = str(check.client_ip) if check.client_ip is not None else None
            require_redeemed(principal)
            if Scope.PROXY_USE not in principal.scopes:
                raise PermissionDenied(hint="this credential may not use the relays (scope proxy:use)")
            if upstream is None:
                raise UpstreamNotFound
            path = parse_relay_path(_raw_relay_path(request.rel_url.raw_path))
            if not upstream.paths.allows(path.decoded):
                raise PathRefused(hint="the path is not in this upstream's allow_paths")
            if kind == "http":
                if request.method not in upstream.methods:
                    raise MethodNotAllowed(hint=f"allowed: {upstream.allow}")
                check_csrf(request.method, request.headers, credential)
            elif request.method not in STREAM_METHODS:
                raise MethodNotAllowed(hint="allowed: GET")
            admitted = Admitted(
                upstream=upstream,
                path=path,
                query=filter_query(request.rel_url.raw_query_string),
                principal=principal,
                credential=credential,
                client_ip=client_ip,
                conn_id=conn_id,
            )
            return await relay(state, admitted, request)
        except WardgateError as exc:
            response = await gateway.refuse(request, exc, client_ip)
            if isinstance(exc, MethodNotAllowed) and isinstance(response, web.Response):
                response.headers["Allow"] = upstream.allow if kind == "http" and upstream else "GET"
            return response
        finally:
            # The lease ``admit`` took (caps): a live relay gave it back when it ended; a refusal
            # or an http request gives it back here (idempotent).
            await gateway.release(conn_id)

    endpoint.__name__ = f"proxy_{kind}_endpoint"
    return endpoint


def _raw_relay_path(raw_path: str) -> str:
    """The still-encoded part after ``/proxy/<name>/<kind>/`` of the request path."""
    parts = raw_path.split("/", 4)
    return parts[4] if len(parts) == 5 else ""
