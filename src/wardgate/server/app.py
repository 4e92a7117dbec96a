"""aiohttp wiring: the gate in front of every request, the WebSocket endpoint, the HTTP API.

The decisions live in ``gate`` (pure) and ``authority``; this module gathers
the facts of a request, asks them, and moves bytes. A refused request gets its
HTTP status and a JSON body (seed 000's ``{"error", "message"}``) BEFORE any
upgrade, so no WebSocket is ever allocated for it.
"""

from __future__ import annotations

import asyncio
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
from wardgate.config import Config
from wardgate.errors import (
    CLOSE_GOING_AWAY,
    AuthenticationRequired,
    InvalidToken,
    RateLimited,
    StoreUnavailable,
    WardgateError,
)
from wardgate.gate.credentials import SUBPROTOCOL, Credential
from wardgate.gate.decide import GatePolicy, HandshakeFacts, Precheck, precheck
from wardgate.keys import KeyRing, ensure_data_dir, load_key_ring
from wardgate.logs import connection_id
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
        self.audit_log = (
            AuditLog(
                config.audit_path,
                max_bytes=config.security.audit.max_bytes,
                backups=config.security.audit.backups,
            )
            if config.audit_enabled
            else None
        )
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
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

    def connection_authenticated(self, conn: Connection) -> None:
        """Called when a pairing connection becomes a device session."""

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

    async def admit(
        self, request: web.Request, *, websocket: bool
    ) -> tuple[Precheck, Principal, Credential | None]:
        """Run the gate on a request; raise the first refusal as a ``WardgateError``."""
        check = precheck(self.facts(request), self.policy)
        if check.failure is not None:
            raise check.failure
        credential = check.credential
        if credential is None:
            if self.config.require_auth:
                raise AuthenticationRequired
            return check, ANONYMOUS, None
        principal = await self.authority.authenticate(credential.token)
        return check, principal, credential

    def reject(self, request: web.Request, error: WardgateError, client_ip: str | None) -> web.Response:
        log.info("refused %s %s: %s", request.method, request.path, error.reason, extra={"ip": client_ip})
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
        check, principal, credential = await gateway.admit(request, websocket=True)
    except WardgateError as exc:
        return gateway.reject(request, exc, client_ip)
    client_ip = str(check.client_ip) if check.client_ip is not None else None
    limits = gateway.config.limits
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        max_msg_size=limits.max_message_bytes,
        heartbeat=limits.heartbeat,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return gateway.reject(request, InvalidToken(hint="not a WebSocket upgrade"), client_ip)
    await ws.prepare(request)
    conn = Connection(
        gateway,
        ws,
        conn_id=conn_id,
        principal=principal,
        client_ip=client_ip,
        token=credential.token if credential else None,
    )
    gateway.connections[conn_id] = conn
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
        gateway.connections.pop(conn_id, None)
        for hook in gateway.disconnect_hooks:
            try:
                hook(conn)
            except Exception:
                log.exception("disconnect hook failed")
        gateway.audit("connection.closed", conn=conn_id, device=conn.device_id, code=ws.close_code)
    return ws


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/ws", websocket_endpoint)
    api.add_routes(app)
    app.router.add_get("/api/rpc/discover", discover)

    async def on_startup(_: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_cleanup)
    return app


async def discover(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
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
