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
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from aiohttp import web

from wardgate import __version__
from wardgate.authority import ANONYMOUS, Authority, Principal, require_redeemed
from wardgate.config import Config, RejectStyle, is_loopback_host
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
from wardgate.gate.credentials import BEARER_SUBPROTOCOL_PREFIX, SUBPROTOCOL, Credential, offered_subprotocols
from wardgate.gate.decide import GatePolicy, HandshakeFacts, Precheck, precheck
from wardgate.gate.network import client_address
from wardgate.keys import (
    KeyRing,
    ensure_data_dir,
    env_key_ring,
    load_key_ring,
    new_key_ring,
    ring_from_json,
    ring_to_json,
)
from wardgate.limits import Limits, LocalLimits, RedisLimits, Slot
from wardgate.logs import connection_id
from wardgate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wardgate.metrics import Metrics
from wardgate.roles import Scope
from wardgate.rpc.registry import Registry, openrpc_document
from wardgate.server import api
from wardgate.server.ws import Connection, workspace_matches
from wardgate.store.base import Store
from wardgate.store.redis import RedisStore
from wardgate.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from wardgate.audit import AuditLog
    from wardgate.services.agent import AgentManager

log = logging.getLogger("wardgate.server")

CLOSE_POLICY_VIOLATION: Final = 1008
FULL_RELOAD_INTERVAL: Final = 30.0
"""Seconds between unconditional reloads of the revocation snapshot."""
PRUNE_INTERVAL: Final = 3600.0
"""Seconds between removals of records that can no longer matter (expired nonces, tokens)."""


class Live(Protocol):
    """An open connection the gateway tracks: a JSON-RPC socket or a relay. Revocation,
    caps and shutdown treat both alike."""

    id: str
    principal: Principal
    client_ip: str | None
    counted_as: str
    """The key this connection counts under for per-principal caps (fixed at connect)."""

    @property
    def device_id(self) -> str | None: ...

    async def revoke(self) -> None:
        """Tell the client its credential was revoked (where the protocol can) and close 4401."""

    async def expire(self) -> None:
        """The credential reached its end (``Principal.ends_at``): close 4401."""

    async def close(self, code: int, reason: str) -> None: ...


class Gateway:
    """The daemon's runtime state: config, credentials, store, live connections."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        keys: KeyRing,
        workspace: Path,
        limits: Limits | None = None,
    ) -> None:
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
            cookie_idle_ttl=config.security.cookie.idle_ttl,
            cookie_max_ttl=config.security.cookie.max_ttl,
        )
        self.policy = GatePolicy.from_config(config)
        self.registry: Registry[Connection] = Registry()
        self.connections: dict[str, Live] = {}
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        """Relays' ends (their credential's expiry), by connection id."""
        self.started_at = time.time()
        self.audit_log = open_audit_log(config)
        self._watchers: list[asyncio.Task[None]] = []
        self.store_available = True
        """False while the store cannot be reached (logged once per outage)."""
        self._tasks: set[asyncio.Future[None]] = set()
        self.metrics = Metrics()
        self.limits: Limits = limits if limits is not None else LocalLimits(config.limits)
        self._leased: set[str] = set()
        """Lease ids taken by ``admit`` (one per connection id) and not yet released."""
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
        await self.limits.start()
        self._watchers = [asyncio.create_task(self._watch_revocations())]
        if isinstance(self.store, RedisStore):
            self._watchers.append(asyncio.create_task(self._listen_revocations(self.store)))

    async def stop(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for hook in self.shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        for conn in list(self.connections.values()):
            await conn.close(CLOSE_GOING_AWAY, "server shutting down")
        for expiry in self._expiries.values():
            expiry.cancel()
        self._expiries.clear()
        await self.limits.stop()
        await self.store.close()

    async def _watch_revocations(self) -> None:
        """Notice revocations made by other processes (the CLI, other instances): poll the
        store's revision. With Redis, pub/sub delivers them sooner and this is the
        reconciliation that a lost message cannot defeat."""
        interval = self.config.store.poll_interval
        last_full = last_prune = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                # A full reload now and then also catches what expires without a revision bump
                # (an API key reaching its expiry while a connection uses it).
                due = time.monotonic() - last_full >= FULL_RELOAD_INTERVAL or not self.store_available
                if due or await self.store.revision() != self.authority.revoked.revision:
                    last_full = time.monotonic()
                    await self.refresh_revocations()
                if time.monotonic() - last_prune >= PRUNE_INTERVAL:
                    last_prune = time.monotonic()
                    await self.store.prune(now=time.time())
                self._store_is(available=True)
            except StoreUnavailable:
                self._store_is(available=False)
            except Exception:
                log.exception("revocation watcher failed")

    async def _listen_revocations(self, store: RedisStore) -> None:
        """Revocations from every instance, as they happen (Redis pub/sub)."""
        while True:
            try:
                async with store.watch_revisions() as feed:
                    await self.refresh_revocations()  # nothing is missed between polls and here
                    while True:
                        if await feed.next() != self.authority.revoked.revision:
                            await self.refresh_revocations()
            except StoreUnavailable:
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("revocation listener failed")
                await asyncio.sleep(1.0)

    async def refresh_revocations(self) -> None:
        await self.authority.reload_revocations()
        await self.enforce_revocations()

    def _store_is(self, *, available: bool) -> None:
        if available == self.store_available:
            return
        self.store_available = available
        if available:
            log.warning("store available again: new authentications are accepted")
        else:
            log.error(
                "store unavailable: new authentications are refused (503 store_unavailable); "
                "established connections continue until their session ends"
            )

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
            if self.authority.principal_revoked(conn.principal):
                self._spawn(conn.revoke())

    async def revoke_device(self, device_id: str, *, by: str, exclude: Live | None = None) -> bool:
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
        headers = request.headers
        # Every X-Forwarded-For line counts: a proxy may append its own line after the client's
        # (HAProxy's option forwardfor), and reading only the first would believe the client.
        forwarded = headers.getall("X-Forwarded-For", None)
        protos = headers.getall("X-Forwarded-Proto", None)
        return HandshakeFacts(
            peer=request.remote,
            host=headers.get("Host"),
            origin=headers.get("Origin"),
            forwarded_for=", ".join(forwarded) if forwarded else None,
            headers=headers,
            query=request.query,
            scheme=request.scheme,
            forwarded_proto=protos[-1].rsplit(",", 1)[-1] if protos else None,
        )

    def client_address(self, request: web.Request) -> str | None:
        """The client's address as the gate sees it (through trusted proxies), for logs."""
        facts = self.facts(request)
        address = client_address(facts.peer, facts.forwarded_for, self.policy.trusted_proxies).address
        return str(address) if address is not None else request.remote

    async def guard(self, request: web.Request, *, bucket: str = "handshakes") -> Precheck:
        """The checks every request passes: address, host, origin, lockout and request rate
        (``bucket``: see ``Limits.hit_address``; one call to ``Limits.admit_address``)."""
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
        if not self.store_available:
            # Fail closed: without the store, a revocation made elsewhere could go unseen.
            raise StoreUnavailable(hint="the credential store cannot be reached; try again shortly")
        locked, decision = await self.limits.admit_address(str(check.client_ip), bucket)
        if locked > 0:
            self.metrics.rate_limited.labels("auth_failures").inc()
            raise RateLimited(retry_after=locked, hint="too many failed authentications from this address")
        if not decision.allowed:
            self.metrics.rate_limited.labels(bucket).inc()
            raise RateLimited(retry_after=decision.retry_after)
        return check

    async def auth_failed(self, check: Precheck | None, error: WardgateError) -> None:
        """Count a failed authentication against the client address (growing lockout)."""
        if isinstance(error, AuthError) and check is not None:
            self.metrics.auth_failures.labels(error.reason).inc()
            with contextlib.suppress(StoreUnavailable):
                await self.limits.record_failure(str(check.client_ip))

    async def admit(
        self,
        request: web.Request,
        *,
        lease: str,
        slots: Callable[[Principal], Sequence[Slot]] = lambda _: (),
        bucket: str = "handshakes",
    ) -> tuple[Precheck, Principal, Credential | None]:
        """Run the whole gate on an upgrade request; raise the first refusal.

        On success the connection holds a lease named ``lease`` (its connection id) under
        every cap it counts against: global, per address, per principal and ``slots`` (say, per
        upstream and user). ``unregister`` gives it back; a handler that fails before
        ``register`` must call ``release``.
        """
        check = await self.guard(request, bucket=bucket)
        credential = check.credential
        if credential is None:
            if self.config.require_auth:
                raise AuthenticationRequired
            principal = ANONYMOUS
        else:
            try:
                principal = await self.authority.authenticate(credential.token)
            except WardgateError as exc:
                await self.auth_failed(check, exc)
                raise
        limits = self.config.limits
        caps = [
            Slot("all", limits.max_connections, "the server's connection limit is reached"),
            Slot(
                f"ip:{check.client_ip}",
                limits.max_connections_per_ip,
                "too many connections from this address",
            ),
            Slot(
                f"principal:{principal.key}",
                limits.max_connections_per_principal,
                "too many connections for this device or key",
            ),
            *slots(principal),
        ]
        full = await self.limits.acquire(lease, caps)
        if full is not None:
            raise TooManyConnections(hint=full.hint)
        self._leased.add(lease)
        return check, principal, credential

    async def release(self, lease: str) -> None:
        """Give back a connection's lease (idempotent)."""
        if lease in self._leased:
            self._leased.discard(lease)
            await self.limits.release(lease)

    def register(self, conn: Live) -> None:
        self.connections[conn.id] = conn
        self.metrics.connections_open.inc()
        self.metrics.accepted.inc()
        # A revocation enforced between authentication and now did not see this connection.
        if self.authority.principal_revoked(conn.principal):
            self._spawn(conn.revoke())
        # A relay ends with its credential; a JSON-RPC socket keeps its own timer, since
        # ``auth/refresh`` moves it to a new session.
        ends_at = conn.principal.ends_at
        if ends_at is not None and not isinstance(conn, Connection):
            delay = max(0.0, ends_at - time.time())
            earlier = self._expiries.pop(conn.id, None)
            if earlier is not None:
                earlier.cancel()
            self._expiries[conn.id] = asyncio.get_running_loop().call_later(
                delay, lambda: self._spawn(conn.expire())
            )

    def unregister(self, conn: Live) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        expiry = self._expiries.pop(conn.id, None)
        if expiry is not None:
            expiry.cancel()
        self._spawn(self.release(conn.id))
        self.metrics.connections_open.dec()
        if not isinstance(conn, Connection):
            return
        for hook in self.disconnect_hooks:
            try:
                hook(conn)
            except Exception:
                log.exception("disconnect hook failed")

    def reject(
        self, request: web.Request, error: WardgateError, client_ip: str | None = None
    ) -> web.Response:
        """Refuse with the HTTP status and JSON body. ``client_ip`` defaults to the address the
        gate sees (worked out here, so that handlers need not on their accepting path)."""
        client_ip = client_ip or self.client_address(request)
        log.info("refused %s %s: %s", request.method, request.path, error.reason, extra={"ip": client_ip})
        self.metrics.rejected(error.reason)
        self.audit("connection.rejected", reason=error.reason, ip=client_ip, path=request.path)
        headers: dict[str, str] = {}
        if error.http_status == 401:
            headers["WWW-Authenticate"] = f'Bearer realm="wardgate", error="{error.reason}"'
        if isinstance(error, RateLimited):
            headers["Retry-After"] = str(max(1, round(error.retry_after)))
        return web.json_response(error.body(), status=error.http_status, headers=headers)

    async def refuse(
        self, request: web.Request, error: WardgateError, client_ip: str | None = None
    ) -> web.StreamResponse:
        """Refuse a request: HTTP status and JSON body, or with ``security.reject_style: close``
        an accepted upgrade closed at once with 1008 and the reason (authentication and
        permission refusals of WebSocket upgrades only)."""
        client_ip = client_ip or self.client_address(request)
        if (
            self.config.security.reject_style is RejectStyle.CLOSE
            and error.http_status in (401, 403)
            and request.headers.get("Upgrade", "").lower() == "websocket"
        ):
            ws = web.WebSocketResponse(protocols=_selectable(request), timeout=2.0)
            if ws.can_prepare(request).ok:
                log.info("refused %s (closing): %s", request.path, error.reason, extra={"ip": client_ip})
                self.metrics.rejected(error.reason)
                self.audit("connection.rejected", reason=error.reason, ip=client_ip, path=request.path)
                await ws.prepare(request)
                await ws.close(code=CLOSE_POLICY_VIOLATION, message=error.reason.encode())
                return ws
        return self.reject(request, error, client_ip)


def _selectable(request: web.Request) -> tuple[str, ...]:
    """Subprotocols the refusal may select so a browser completes the handshake (it fails one
    that selects none of those it offered): never a ``wardgate.bearer.`` credential."""
    offered = offered_subprotocols(request.headers.get("Sec-WebSocket-Protocol"))
    if SUBPROTOCOL in offered:
        return (SUBPROTOCOL,)
    return tuple(p for p in offered if not p.startswith(BEARER_SUBPROTOCOL_PREFIX))[:1]


GATEWAY_KEY: Final = web.AppKey("gateway", Gateway)


async def websocket_endpoint(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    conn_id = "c_" + secrets.token_hex(6)
    connection_id.set(conn_id)
    try:
        check, principal, credential = await gateway.admit(request, lease=conn_id)
    except WardgateError as exc:
        return await gateway.refuse(request, exc)
    try:
        return await _serve_rpc(request, gateway, conn_id, check, principal, credential)
    finally:
        await gateway.release(conn_id)


async def _serve_rpc(
    request: web.Request,
    gateway: Gateway,
    conn_id: str,
    check: Precheck,
    principal: Principal,
    credential: Credential | None,
) -> web.StreamResponse:
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
        return gateway.reject(request, check.failure)
    if not (peer is not None and is_loopback_host(peer) and "X-Forwarded-For" not in request.headers):
        try:
            check = await gateway.guard(request)
            if check.credential is None:
                raise AuthenticationRequired
            principal = await gateway.authority.authenticate(check.credential.token)
            require_redeemed(principal)
            if Scope.AUDIT_READ not in principal.scopes:
                raise PermissionDenied(hint="metrics need an admin credential")
        except WardgateError as exc:
            return gateway.reject(request, exc)
    return web.Response(body=gateway.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/ws", websocket_endpoint)
    api.add_routes(app)
    app.router.add_get("/api/rpc/discover", discover)
    app.router.add_get("/metrics", metrics_endpoint)
    from wardgate.proxy.routes import add_routes as add_proxy_routes

    add_proxy_routes(app)

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
        return gateway.reject(request, check.failure)
    return web.json_response(openrpc_document(gateway.registry, title="wardgate", version=__version__))


def open_audit_log(config: Config) -> AuditLog | None:
    if not config.audit_enabled:
        return None
    from wardgate.audit import AuditLog

    audit = config.security.audit
    return AuditLog(config.audit_path, max_bytes=audit.max_bytes, backups=audit.backups)


def open_store(config: Config) -> Store:
    """The configured store (not yet open). The CLI uses the same one as the daemon."""
    if config.store.backend == "redis":
        return RedisStore(config.store.url, prefix=config.store.prefix, password=redis_password(config))
    return SqliteStore(config.store_path)


def redis_password(config: Config) -> str | None:
    """``store.password`` resolved (``${ENV}`` or ``@file``), and registered with the log
    redaction so that it can never be printed."""
    if not config.store.password:
        return None
    from wardgate.logs import add_secrets
    from wardgate.proxy.upstream import resolve_value

    password, _ = resolve_value("store.password", config.store.password, os.environ)
    add_secrets([password])
    return password


async def load_keys(config: Config, store: Store) -> KeyRing:
    """The signing key ring: ``WARDGATE_SIGNING_KEYS``; else, on Redis, the ring all instances
    share there (the first creates it); else the data directory's key file."""
    ring = env_key_ring()
    if ring is not None:
        return ring
    if isinstance(store, RedisStore):
        await store.open()
        shared = await store.shared_key_ring(ring_to_json(new_key_ring()).decode())
        return ring_from_json(shared, "the key ring in Redis")
    return load_key_ring(config.home)


async def create_gateway(config: Config) -> Gateway:
    ensure_data_dir(config.home)
    store = open_store(config)
    keys = await load_keys(config, store)
    workspace = Path(config.workspace.root).expanduser().resolve()  # noqa: ASYNC240 - once, at start
    limits: Limits | None = None
    if isinstance(store, RedisStore):
        instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        limits = RedisLimits(store, config.limits, instance=instance, lease_ttl=config.store.lease_ttl)
    return Gateway(config, store=store, keys=keys, workspace=workspace, limits=limits)
