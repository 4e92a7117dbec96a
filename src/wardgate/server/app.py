"""aiohttp wiring: the gate in front of every request, the WebSocket endpoint, the HTTP API.

The decisions live in ``gate`` (pure) and ``authority``; this module gathers
the facts of a request, asks them, and moves bytes. A refused request gets its
HTTP status and a JSON body (seed 000's ``{"error", "message"}``) BEFORE any
upgrade, so no WebSocket is ever allocated for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from wardgate import __version__
from wardgate.authority import ANONYMOUS, Authority, Principal
from wardgate.config import Config, is_loopback_host
from wardgate.errors import (
    CLOSE_GOING_AWAY,
    AuthenticationRequired,
    AuthError,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    StoreUnavailable,
    TooManyConnections,
    WardgateError,
)
from wardgate.gate.credentials import SUBPROTOCOL, Credential
from wardgate.gate.decide import GatePolicy, HandshakeFacts, Precheck, precheck
from wardgate.keys import KeyRing, ensure_data_dir, load_key_ring
from wardgate.logs import connection_id
from wardgate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wardgate.metrics import Metrics
from wardgate.ratelimit import FailureLockout, SlidingWindowLimiter
from wardgate.roles import Scope
from wardgate.rpc.registry import Registry, openrpc_document
from wardgate.server import api
from wardgate.server.ws import Connection, workspace_matches
from wardgate.store.base import Store
from wardgate.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from wardgate.audit import AuditLog
    from wardgate.services.agent import AgentManager

log = logging.getLogger("wardgate.server")


class Gateway:
    """The daemon's runtime state: config, credentials, store, live connections."""

    def __init__(self, config: Config, *, store: Store, keys: KeyRing, workspace: Path) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.workspace = workspace
        self.authority = Authority(
            keys=keys,
            store=store,
            pairing_ttl=config.pairing_expiry,
            session_ttl=config.security.token.session_expiry,
            refresh_ttl=config.refresh_expiry,
        )
        self.policy = GatePolicy.from_config(config)
        self.registry: Registry[Connection] = Registry()
        self.connections: dict[str, Connection] = {}
        self.started_at = time.time()
        self.audit_log = open_audit_log(config)
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.metrics = Metrics()
        limits = config.limits
        self.handshake_limiter = SlidingWindowLimiter(limits.handshakes_per_ip, limits.handshake_window)
        self.auth_lockout = FailureLockout(
            limits.auth_failures_per_ip,
            limits.auth_failure_window,
            limits.auth_lockout,
            limits.auth_lockout_max,
        )
        self.message_limiter = SlidingWindowLimiter(limits.messages_per_principal, limits.message_window)
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._per_principal: collections.Counter[str] = collections.Counter()
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        """Run when the daemon stops, before connections close (services stop their work here)."""
        self.disconnect_hooks: list[Callable[[Connection], None]] = []
        """Run when a connection ends (services drop its subscriptions here)."""
        self.agents: AgentManager | None = None
        """Set by ``services.agent.install``."""
        from wardgate.services import install_all

        install_all(self)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        await self.store.prune(now=time.time())
        await self.authority.reload_revocations()
        self._watcher = asyncio.create_task(self._watch_revocations())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for hook in self.shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        for conn in list(self.connections.values()):
            await conn.close(CLOSE_GOING_AWAY, "server shutting down")
        await self.store.close()

    async def _watch_revocations(self) -> None:
        """Notice revocations made by other processes (the CLI, other instances)."""
        interval = self.config.store.poll_interval
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.store.revision() != self.authority.revoked.revision:
                    await self.authority.reload_revocations()
                    await self.enforce_revocations()
            except StoreUnavailable:
                log.warning("store unavailable while checking revocations")
            except Exception:
                log.exception("revocation watcher failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def enforce_revocations(self) -> None:
        """Close every live connection whose session is now revoked.

        The closes run in the background: a close waits for the peer's close frame, and the
        request that caused the revocation must not wait for that.
        """
        for conn in list(self.connections.values()):
            claims = conn.session_claims
            if claims is not None and self.authority.session_revoked(claims):
                self._spawn(conn.revoke())

    async def revoke_device(self, device_id: str, *, by: str, exclude: Connection | None = None) -> bool:
        changed = await self.authority.revoke_device(device_id)
        self.audit("device.revoked", device=device_id, by=by)
        for conn in list(self.connections.values()):
            if conn is not exclude and conn.device_id == device_id:
                self._spawn(conn.revoke())
        return changed

    # --- bookkeeping -------------------------------------------------------------------------

    def audit(self, event: str, **fields: Any) -> None:
        if self.audit_log is not None:
            try:
                self.audit_log.append(event, **{k: v for k, v in fields.items() if v is not None})
            except OSError:
                log.exception("cannot write the audit log")

    def is_workspace_root(self, path: str) -> bool:
        return workspace_matches(self.workspace, path)

    # --- the gate ----------------------------------------------------------------------------

    def facts(self, request: web.Request) -> HandshakeFacts:
        return HandshakeFacts(
            peer=request.remote,
            host=request.headers.get("Host"),
            origin=request.headers.get("Origin"),
            forwarded_for=request.headers.get("X-Forwarded-For"),
            headers=request.headers,
            query=request.query,
            scheme=request.scheme,
        )

    def guard(self, request: web.Request) -> Precheck:
        """The checks every request passes: address, host, origin, lockout and request rate."""
        if log.isEnabledFor(logging.DEBUG):
            # Credentials in headers and query strings are removed by the logging redaction layer.
            log.debug("request %s %s headers=%s", request.method, request.path_qs, dict(request.headers))
        check = precheck(self.facts(request), self.policy)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "gate: %s",
                "; ".join(f"{v.check}={'pass' if v.allowed else 'refuse'}" for v in check.verdicts),
            )
        if check.failure is not None:
            raise check.failure
        ip_key = str(check.client_ip)
        locked = self.auth_lockout.locked_for(ip_key)
        if locked > 0:
            self.metrics.rate_limited.labels("auth_failures").inc()
            raise RateLimited(retry_after=locked, hint="too many failed authentications from this address")
        decision = self.handshake_limiter.hit(ip_key)
        if not decision.allowed:
            self.metrics.rate_limited.labels("handshakes").inc()
            raise RateLimited(retry_after=decision.retry_after)
        return check

    def auth_failed(self, check: Precheck | None, error: WardgateError) -> None:
        """Count a failed authentication against the client address (growing lockout)."""
        if isinstance(error, AuthError) and check is not None:
            self.metrics.auth_failures.labels(error.reason).inc()
            self.auth_lockout.record_failure(str(check.client_ip))

    async def admit(self, request: web.Request) -> tuple[Precheck, Principal, Credential | None]:
        """Run the whole gate on an upgrade request; raise the first refusal."""
        check = self.guard(request)
        credential = check.credential
        if credential is None:
            if self.config.require_auth:
                raise AuthenticationRequired
            principal = ANONYMOUS
        else:
            try:
                principal = await self.authority.authenticate(credential.token)
            except WardgateError as exc:
                self.auth_failed(check, exc)
                raise
        self.check_capacity(str(check.client_ip), principal.key)
        return check, principal, credential

    def check_capacity(self, ip: str, principal_key: str) -> None:
        limits = self.config.limits
        if len(self.connections) >= limits.max_connections:
            raise TooManyConnections(hint="the server's connection limit is reached")
        if self._per_ip[ip] >= limits.max_connections_per_ip:
            raise TooManyConnections(hint="too many connections from this address")
        if self._per_principal[principal_key] >= limits.max_connections_per_principal:
            raise TooManyConnections(hint="too many connections for this device")

    def register(self, conn: Connection) -> None:
        self.connections[conn.id] = conn
        self._per_ip[conn.client_ip or "-"] += 1
        self._per_principal[conn.counted_as] += 1
        self.metrics.connections_open.inc()
        self.metrics.accepted.inc()

    def unregister(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        for counter, key in ((self._per_ip, conn.client_ip or "-"), (self._per_principal, conn.counted_as)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        self.metrics.connections_open.dec()
        for hook in self.disconnect_hooks:
            try:
                hook(conn)
            except Exception:
                log.exception("disconnect hook failed")

    def reject(self, request: web.Request, error: WardgateError, client_ip: str | None) -> web.Response:
        log.info("refused %s %s: %s", request.method, request.path, error.reason, extra={"ip": client_ip})
        self.metrics.rejected(error.reason)
        self.audit("connection.rejected", reason=error.reason, ip=client_ip, path=request.path)
        headers: dict[str, str] = {}
        if error.http_status == 401:
            headers["WWW-Authenticate"] = f'Bearer realm="wardgate", error="{error.reason}"'
        if isinstance(error, RateLimited):
            headers["Retry-After"] = str(max(1, round(error.retry_after)))
        return web.json_response(error.body(), status=error.http_status, headers=headers)


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)


async def websocket_endpoint(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    conn_id = "c_" + secrets.token_hex(6)
    connection_id.set(conn_id)
    client_ip: str | None = request.remote
    try:
        check, principal, credential = await gateway.admit(request)
    except WardgateError as exc:
        return gateway.reject(request, exc, client_ip)
    client_ip = str(check.client_ip) if check.client_ip is not None else None
    limits = gateway.config.limits
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        max_msg_size=limits.max_message_bytes,
        heartbeat=limits.heartbeat,
        compress=limits.compression,
    )
    if not ws.can_prepare(request).ok:
        return gateway.reject(request, InvalidRequest(hint="expected a WebSocket upgrade"), client_ip)
    await ws.prepare(request)
    conn = Connection(
        gateway,
        ws,
        conn_id=conn_id,
        principal=principal,
        client_ip=client_ip,
        token=credential.token if credential else None,
        abort=_aborter(request),
    )
    gateway.register(conn)
    gateway.audit(
        "connection.accepted",
        ip=client_ip,
        device=principal.device_id,
        credential=principal.kind,
        conn=conn_id,
    )
    log.info("connection accepted", extra={"ip": client_ip, "principal": principal.kind})
    try:
        await conn.run()
    finally:
        gateway.unregister(conn)
        gateway.audit("connection.closed", conn=conn_id, device=conn.device_id, code=ws.close_code)
    return ws


def _aborter(request: web.Request) -> Callable[[], None]:
    def abort() -> None:
        if request.transport is not None:
            request.transport.abort()

    return abort


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus metrics: only from a loopback peer, or with an admin credential."""
    gateway = request.app[GATEWAY_KEY]
    peer = request.remote
    # Address and Host checks apply to loopback too: a DNS-rebinding page must not read metrics.
    check = precheck(gateway.facts(request), gateway.policy)
    if check.failure is not None:
        return gateway.reject(request, check.failure, peer)
    if not (peer is not None and is_loopback_host(peer) and "X-Forwarded-For" not in request.headers):
        try:
            check = gateway.guard(request)
            if check.credential is None:
                raise AuthenticationRequired
            principal = await gateway.authority.authenticate(check.credential.token)
            if Scope.AUDIT_READ not in principal.scopes:
                raise PermissionDenied(hint="metrics need an admin credential")
        except WardgateError as exc:
            return gateway.reject(request, exc, peer)
    return web.Response(body=gateway.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/ws", websocket_endpoint)
    api.add_routes(app)
    app.router.add_get("/api/rpc/discover", discover)
    app.router.add_get("/metrics", metrics_endpoint)

    async def on_startup(_: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_cleanup)
    return app


async def discover(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    check = precheck(gateway.facts(request), gateway.policy)
    if check.failure is not None:
        return gateway.reject(request, check.failure, request.remote)
    return web.json_response(openrpc_document(gateway.registry, title="wardgate", version=__version__))


def open_audit_log(config: Config) -> AuditLog | None:
    if not config.audit_enabled:
        return None
    from wardgate.audit import AuditLog

    audit = config.security.audit
    return AuditLog(config.audit_path, max_bytes=audit.max_bytes, backups=audit.backups)


def open_store(config: Config) -> Store:
    if config.store.backend == "sqlite":
        return SqliteStore(config.store_path)
    raise StoreUnavailable(hint=f"store backend {config.store.backend!r} is not available")


def create_gateway(config: Config) -> Gateway:
    ensure_data_dir(config.home)
    keys = load_key_ring(config.home)
    workspace = Path(config.workspace.root).expanduser().resolve()
    return Gateway(config, store=open_store(config), keys=keys, workspace=workspace)
