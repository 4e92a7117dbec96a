"""What the relays share in one gateway: upstreams, the upstream client session, caps, live relays."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiohttp

from wardgate.authority import Principal
from wardgate.errors import CLOSE_GOING_AWAY
from wardgate.gate.credentials import Credential
from wardgate.proxy.paths import RelayPath
from wardgate.proxy.upstream import Upstream

if TYPE_CHECKING:
    from wardgate.server.app import Gateway

log = logging.getLogger("wardgate.proxy")

REASON_SHUTDOWN: Final = "server shutting down"


class Relay(Protocol):
    """A live WebSocket or SSE relay (and a ``server.app.Live``)."""

    id: str

    async def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Admitted:
    """A relay request that passed the gate and the upstream's allowlists."""

    upstream: Upstream
    path: RelayPath
    query: str = field(repr=False)
    """The client's raw query string minus wardgate's credential parameters."""
    principal: Principal
    credential: Credential | None = field(repr=False)
    client_ip: str | None
    conn_id: str
    started: float = field(default_factory=time.monotonic)

    def audit_fields(self) -> dict[str, Any]:
        """Who and where, for audit events (never a header value or the query string)."""
        return {
            "upstream": self.upstream.name,
            "path": self.path.decoded,
            "device": self.principal.device_id,
            "key": self.principal.key_id,
            "credential": self.principal.kind,
            "ip": self.client_ip,
            "conn": self.conn_id,
        }


class ProxyState:
    """The relays' shared state, one per gateway (``app[PROXY_KEY]``)."""

    def __init__(self, gateway: Gateway, upstreams: dict[str, Upstream]) -> None:
        self.gateway = gateway
        self.upstreams = upstreams
        self.relays: dict[str, Relay] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self.closing = False

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings for https upstreams the WebSocket relay connects to itself: the
        system's trust store, host names checked (created once; it is costly)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def session(self) -> aiohttp.ClientSession:
        """The one client session for every upstream connection (created on first use).

        No cookie jar (an upstream's cookies must never reach another user's request), no
        proxy from the environment, no automatic ``User-Agent``, no connection limit (the
        per-user caps bound the relays), and bodies as the upstream sent them unless a relay
        asks for decompression.
        """
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def close(self) -> None:
        """Shutdown: close every live relay (1001), then the client session."""
        self.closing = True
        relays = list(self.relays.values())
        if relays:
            await asyncio.gather(
                *(relay.close(CLOSE_GOING_AWAY, REASON_SHUTDOWN) for relay in relays), return_exceptions=True
            )
        if self._session is not None:
            await self._session.close()
            self._session = None
