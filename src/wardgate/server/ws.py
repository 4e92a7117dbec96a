"""One authenticated WebSocket connection: JSON-RPC lifecycle, dispatch and timers.

The gate has already run (see ``server.app``): by the time a ``Connection``
exists, the request passed the address, host and origin checks and its
credential was verified. This module only moves messages and applies the
lifecycle (``rpc.lifecycle``) and the method registry (``rpc.registry``).

Timers, not polling, end a connection: the ``initialize`` deadline (close
4408), the session expiry (``auth/expired`` then 4401) and revocation
(``auth/revoked`` then 4401, triggered by the gateway when it learns of one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
from aiohttp import WSMsgType, web

from wardgate import __version__
from wardgate.authority import Principal
from wardgate.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INIT_TIMEOUT,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_RATE_LIMITED,
    CLOSE_SESSION_EXPIRED,
    AuthError,
    InternalError,
    InvalidParams,
    InvalidToken,
    RateLimited,
    TokenRevoked,
    WardgateError,
)
from wardgate.roles import scopes_for
from wardgate.rpc import jsonrpc
from wardgate.rpc.lifecycle import Event, Lifecycle, State
from wardgate.rpc.registry import convert_params
from wardgate.tokens import TokenClaims

if TYPE_CHECKING:
    from wardgate.server.app import Gateway

log = logging.getLogger("wardgate.ws")

PROTOCOL_VERSION: Final = "2025-06-18"


@functools.lru_cache(maxsize=4096)
def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AuthParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    token: str | None = None
    deviceId: str | None = None
    deviceName: str | None = None


class InitializeParams(msgspec.Struct, omit_defaults=True):
    protocolVersion: str = ""
    clientInfo: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    rootPath: str | None = None
    auth: AuthParams | None = None


class RefreshParams(msgspec.Struct, forbid_unknown_fields=True):
    sessionToken: str


# Close reasons are short fixed strings (<= 123 bytes), never user input.
REASON_INIT_TIMEOUT: Final = "initialize timeout"
REASON_EXPIRED: Final = "session expired"
REASON_REVOKED: Final = "session revoked"
REVOKED_IN_BATCH: Final = "auth/revoke earlier in this batch logged this device out"
REASON_LOGGED_OUT: Final = "logged out"
REASON_SHUTDOWN: Final = "shutdown"
REASON_SLOW_CONSUMER: Final = "send queue full"
REASON_IDLE: Final = "idle timeout"
REASON_RATE_LIMITED: Final = "rate limited"
MAX_REFUSED_IN_A_ROW: Final = 50
"""Messages refused for rate in a row before the connection is closed with 4429."""
CLOSE_HANDSHAKE_TIMEOUT: Final = 5.0
FLUSH_TIMEOUT: Final = 1.0
"""Seconds a closing connection may spend delivering what it still has queued."""


class Connection:
    """A live WebSocket: who it is, where it is in the lifecycle, and its timers."""

    def __init__(
        self,
        gateway: Gateway,
        ws: web.WebSocketResponse,
        *,
        conn_id: str,
        principal: Principal,
        client_ip: str | None,
        token: str | None,
        abort: Callable[[], None] = lambda: None,
    ) -> None:
        self.gateway = gateway
        self._abort = abort
        self.ws = ws
        self.id = conn_id
        self.principal = principal
        self.client_ip = client_ip
        self._transport_token = token
        self.lifecycle = Lifecycle()
        self.opened_at = time.time()
        self.counted_as = principal.key
        """The key this connection counts under for per-principal caps (fixed at connect)."""
        self.last_activity = time.monotonic()
        self._refused_in_a_row = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closing = False
        self._tasks: set[asyncio.Future[None]] = set()
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        """Runs only while something is queued: an idle connection holds no task and no event."""
        self._closed: asyncio.Event | None = None
        self._overflowed = False
        self._close_after_reply: tuple[int, str] | None = None
        """Set by a method whose answer ends the connection: sent first, then closed."""
        self._logging_out = False
        """``auth/revoke`` revoked this connection's own device: the answer, then close 1000."""
        self._revoke_deferred = False
        """A revocation scan found this connection revoked while it was logging out."""

    # --- identity ----------------------------------------------------------------------------

    @property
    def scopes(self) -> frozenset[Any]:
        return self.principal.scopes

    @property
    def session_claims(self) -> TokenClaims | None:
        return self.principal.claims if self.principal.kind == "session" else None

    @property
    def device_id(self) -> str | None:
        return self.principal.device_id

    # --- timers ------------------------------------------------------------------------------

    def _set_timer(self, name: str, at: float, action: Callable[[], Awaitable[None]]) -> None:
        self._cancel_timer(name)
        loop = asyncio.get_running_loop()
        delay = max(0.0, at - time.time())
        self._timers[name] = loop.call_later(delay, self._spawn, action)

    def _spawn(self, action: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.ensure_future(action())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel_timer(self, name: str) -> None:
        handle = self._timers.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _schedule_expiry(self) -> None:
        at = self.principal.ends_at
        if at is not None:
            self._set_timer("expiry", at, self.expire)

    # --- ending ------------------------------------------------------------------------------

    async def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close once: deliver what is queued (briefly), then send the close frame."""
        if self._closing:
            return
        self._closing = True
        self._closed = closed = asyncio.Event()
        for name in list(self._timers):
            self._cancel_timer(name)
        self.lifecycle.apply(Event.CLOSE)
        if flush:
            await self._flush(FLUSH_TIMEOUT)
        self._stop_writer()
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), CLOSE_HANDSHAKE_TIMEOUT)
        except TimeoutError:
            # A peer that does not read cannot take our close frame: drop the TCP connection.
            self._abort()
        finally:
            closed.set()

    async def _end_session(self, notification: str, reason: str) -> None:
        if self._closing:
            return
        self.post(jsonrpc.encode_notification(notification, {"reason": reason.replace(" ", "_")}))
        await self.close(CLOSE_SESSION_EXPIRED, reason)

    async def expire(self) -> None:
        self.gateway.audit("session.expired", device=self.device_id, ip=self.client_ip)
        await self._end_session("auth/expired", REASON_EXPIRED)

    async def revoke(self) -> None:
        if self._logging_out:
            # Its own auth/revoke: a revocation scan must not pre-empt the answer (kept in mind
            # in case the logout fails after all).
            self._revoke_deferred = True
            return
        self.gateway.audit("session.closed_revoked", device=self.device_id, ip=self.client_ip)
        await self._end_session("auth/revoked", REASON_REVOKED)

    async def _idle_check(self) -> None:
        idle = self.gateway.config.limits.idle_timeout
        quiet = time.monotonic() - self.last_activity
        if quiet >= idle:
            self.gateway.metrics.disconnects.labels("idle").inc()
            await self.close(CLOSE_GOING_AWAY, REASON_IDLE)
        else:
            self._set_timer("idle", time.time() + idle - quiet, self._idle_check)

    async def _init_timeout(self) -> None:
        if self.lifecycle.state is State.AWAIT_INIT:
            await self.close(CLOSE_INIT_TIMEOUT, REASON_INIT_TIMEOUT)

    # --- sending -----------------------------------------------------------------------------

    def post(self, data: bytes) -> bool:
        """Queue a text frame without waiting. A peer that stops reading fills its bounded
        queue and is disconnected, so it can neither block the sender nor grow memory."""
        if self._closing or self._overflowed:
            return False
        limits = self.gateway.config.limits
        if (
            len(self._outbox) >= limits.send_queue_messages
            or self._outbox_bytes + len(data) > limits.send_queue_bytes
        ):
            log.warning("send queue full: disconnecting a slow consumer")
            self._overflowed = True
            self._spawn(self._slow_consumer)
            return False
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())
        return True

    def notify(self, method: str, params: Any = None) -> bool:
        """Queue a JSON-RPC notification; False if the connection is closing or was too slow."""
        return self.post(jsonrpc.encode_notification(method, params))

    async def _slow_consumer(self) -> None:
        self.gateway.metrics.disconnects.labels("slow_consumer").inc()
        self.gateway.audit("connection.slow_consumer", conn=self.id, device=self.device_id, ip=self.client_ip)
        await self.close(CLOSE_POLICY_VIOLATION, REASON_SLOW_CONSUMER, flush=False)

    async def _write_loop(self) -> None:
        """Send what is queued, in order, then end (``post`` starts a new one when needed)."""
        outbox = self._outbox
        messages_out = self.gateway.metrics.messages_out
        try:
            while outbox:
                data = outbox[0]
                await self.ws.send_frame(data, WSMsgType.TEXT)
                outbox.popleft()
                self._outbox_bytes -= len(data)
                messages_out.inc()
        except (ConnectionError, RuntimeError):
            # The peer went away mid-send; the receive loop ends the connection.
            outbox.clear()
            self._outbox_bytes = 0
        finally:
            self._writer = None

    async def _flush(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until everything queued has been handed to the socket."""
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), timeout)

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

    # --- receiving ---------------------------------------------------------------------------

    async def run(self) -> None:
        limits = self.gateway.config.limits
        self._set_timer("init", time.time() + limits.init_timeout, self._init_timeout)
        if limits.idle_timeout > 0:
            self._set_timer("idle", time.time() + limits.idle_timeout, self._idle_check)
        metrics = self.gateway.metrics
        try:
            async for message in self.ws:
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.last_activity = time.monotonic()
                    metrics.messages_in.inc()
                    if not await self._within_rate():
                        if self._close_after_reply is not None:
                            await self.close(*self._close_after_reply)
                        continue
                    reply = await self.handle(message.data)
                    if reply is not None:
                        self.post(reply)
                    # Drop references before waiting for the next message: an idle connection
                    # should not pin its last request and reply in memory.
                    del reply, message
                    if self._close_after_reply is not None:
                        await self.close(*self._close_after_reply)
                elif message.type is WSMsgType.ERROR:
                    break
        finally:
            self.lifecycle.apply(Event.CLOSE)
            for name in list(self._timers):
                self._cancel_timer(name)
            self._stop_writer()
            if self._closed is not None:
                # Another task is closing (a revocation, a timer): let its close handshake
                # finish before the handler returns and aiohttp drops the TCP connection.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), CLOSE_HANDSHAKE_TIMEOUT)

    async def _within_rate(self) -> bool:
        """The per-principal message limit, summed over all of the principal's connections.

        Over the limit, the message is answered with a rate_limited error (requests only) and
        dropped; a client that keeps sending regardless is closed with 4429.
        """
        decision = await self.gateway.limits.take_message(self.principal.key)
        if decision.allowed:
            self._refused_in_a_row = 0
            return True
        self.gateway.metrics.rate_limited.labels("messages").inc()
        self._refused_in_a_row += 1
        if self._refused_in_a_row > MAX_REFUSED_IN_A_ROW:
            self.gateway.metrics.disconnects.labels("rate_limited").inc()
            self._close_after_reply = (CLOSE_RATE_LIMITED, REASON_RATE_LIMITED)
            return False
        error = RateLimited(retry_after=decision.retry_after)
        error.data["retryAfter"] = round(decision.retry_after, 3)
        self.post(jsonrpc.encode_error_from(None, error))
        return False

    async def handle(self, data: bytes | str) -> bytes | None:
        """Answer one WebSocket message (a request, a notification or a batch)."""
        claims = self.session_claims
        if claims is not None and claims.exp <= time.time():
            await self.expire()
            return None
        incoming = jsonrpc.parse_message(data)
        replies: list[bytes] = []
        for item in incoming.items:
            if isinstance(item, jsonrpc.ErrorReply):
                replies.append(item.encode())
                continue
            if self._logging_out:
                # auth/revoke earlier in this batch: nothing after it runs on the revoked device.
                if not item.is_notification:
                    replies.append(jsonrpc.encode_error_from(item.id, TokenRevoked(hint=REVOKED_IN_BATCH)))
                continue
            reply = await self.dispatch(item)
            if reply is not None and not item.is_notification:
                replies.append(reply)
        if incoming.is_batch:
            return jsonrpc.encode_batch(replies)
        return replies[0] if replies else None

    async def dispatch(self, request: jsonrpc.Request) -> bytes | None:
        try:
            result = await self._call(request)
        except WardgateError as exc:
            if isinstance(exc, AuthError) and request.method == "initialize":
                # Authentication failed during initialize: answer, then end the connection.
                self._close_after_reply = (exc.close_code, exc.reason.replace("_", " "))
            return jsonrpc.encode_error_from(request.id, exc)
        except Exception:
            log.exception("method %s failed", request.method)
            return jsonrpc.encode_error_from(request.id, InternalError())
        return jsonrpc.encode_result(request.id, result)

    async def _call(self, request: jsonrpc.Request) -> Any:
        method = request.method
        if method == "initialize":
            if not self.lifecycle.allows(Event.INITIALIZE):
                self.lifecycle.apply(Event.INITIALIZE)  # raises the refusal for this state
            result = await self._initialize(convert_params(InitializeParams, request.params))
            self.lifecycle.apply(Event.INITIALIZE)
            self._cancel_timer("init")
            self._schedule_expiry()
            return result
        if method == "initialized":
            self.lifecycle.apply(Event.INITIALIZED)
            return None
        if method == "shutdown":
            self.lifecycle.apply(Event.SHUTDOWN)
            self._close_after_reply = (CLOSE_NORMAL, REASON_SHUTDOWN)
            return None
        self.lifecycle.apply(Event.CALL)
        if method == "auth/refresh":
            return await self._auth_refresh(convert_params(RefreshParams, request.params))
        if method == "auth/revoke":
            return await self._auth_revoke()
        registry = self.gateway.registry
        if registry.get(method) is None:
            return await registry.call(self, method, request.params)  # raises MethodNotFound
        started = time.perf_counter()
        try:
            return await registry.call(self, method, request.params)
        finally:
            self.gateway.metrics.method_seconds.labels(method).observe(time.perf_counter() - started)

    # --- lifecycle methods --------------------------------------------------------------------

    async def _initialize(self, params: InitializeParams) -> dict[str, Any]:
        gateway = self.gateway
        auth = params.auth or AuthParams()
        if params.rootPath is not None and not gateway.is_workspace_root(params.rootPath):
            raise InvalidParams(hint="rootPath does not match this server's workspace")
        if auth.token is not None:
            if self._transport_token is None:
                # Local mode without transport auth: a token given here is still verified.
                self.principal = await gateway.authority.authenticate(auth.token)
                self._transport_token = auth.token
            elif not hmac.compare_digest(auth.token.encode(), self._transport_token.encode()):
                raise InvalidToken(hint="auth.token must be the token the connection was opened with")
        session: dict[str, Any] | None = None
        if self.principal.kind == "pairing" and self.principal.claims is not None:
            issued = await gateway.authority.redeem_pairing(
                self.principal.claims,
                device_name=auth.deviceName,
                client_info={"clientInfo": params.clientInfo or {}, "deviceId": auth.deviceId},
                ip=self.client_ip,
            )
            session_claims = gateway.authority.verify_session(issued.session_token)
            self.principal = Principal(
                kind="session",
                role=issued.role,
                scopes=scopes_for(issued.role),
                device_id=issued.device_id,
                claims=session_claims,
            )
            gateway.audit("pairing.redeemed", device=issued.device_id, ip=self.client_ip, via="initialize")
            session = {
                "token": issued.session_token,
                "expiresAt": iso8601(issued.session_expires_at),
                "autoRefresh": gateway.config.security.token.auto_refresh,
                "refreshToken": issued.refresh_token,
                "refreshExpiresAt": iso8601(issued.refresh_expires_at),
                "deviceId": issued.device_id,
            }
        elif self.session_claims is not None:
            session = {
                "expiresAt": iso8601(self.session_claims.exp),
                "autoRefresh": gateway.config.security.token.auto_refresh,
                "deviceId": self.device_id,
            }
        result: dict[str, Any] = {
            "protocolVersion": PROTOCOL_VERSION,
            "serverInfo": {"name": "wardgate", "version": __version__},
            "capabilities": {
                "methods": [spec.name for spec in gateway.registry],
                "events": ["auth/expired", "auth/revoked"],
            },
            "clientId": self.id,
            "role": self.principal.role,
        }
        if session is not None:
            result["session"] = session
        return result

    async def _auth_refresh(self, params: RefreshParams) -> dict[str, Any]:
        current = self.session_claims
        if current is None:
            raise InvalidToken(hint="this connection has no session to refresh")
        authority = self.gateway.authority
        presented = authority.verify_session(params.sessionToken)
        if presented.jti != current.jti:
            raise InvalidToken(hint="sessionToken is not this connection's current session")
        token, claims = authority.issue_session(current.sub or "", current.role or "", current.fam)
        # The connection moves to the new session before the old one is revoked: a revocation
        # scan running meanwhile (pub/sub, reconciliation) must not find it on the old one.
        previous = self.principal
        self.principal = Principal(
            kind="session",
            role=previous.role,
            scopes=previous.scopes,
            device_id=self.device_id,
            claims=claims,
        )
        self._schedule_expiry()
        try:
            await authority.revoke_session(current)
        except BaseException:
            # The client never gets the new token: the connection stays on the one it holds
            # (closed by the next scan if its revocation was written after all).
            self.principal = previous
            self._schedule_expiry()
            raise
        self.gateway.audit("session.refreshed", device=self.device_id, ip=self.client_ip)
        return {"sessionToken": token, "expiresAt": iso8601(claims.exp)}

    async def _auth_revoke(self) -> dict[str, Any]:
        device = self.device_id
        # Decided before the revocation is published, which wakes the revocation scans.
        self._logging_out = True
        self._close_after_reply = (CLOSE_NORMAL, REASON_LOGGED_OUT)
        if device is not None:
            try:
                await self.gateway.revoke_device(device, by="self", exclude=self)
            except BaseException:
                self._logging_out = False  # not logged out: the error is the answer
                self._close_after_reply = None
                if self._revoke_deferred or self.gateway.authority.principal_revoked(self.principal):
                    self._spawn(self.revoke)  # written after all: the scan's verdict stands
                raise
        return {"revoked": device is not None}


def workspace_matches(root: Path, given: str) -> bool:
    try:
        return Path(given).expanduser().resolve(strict=False) == root
    except (OSError, ValueError, RuntimeError):
        return False
