"""``status/get``: what the server is, the workspace's git state, the agent, who is connected.

No secrets and no paths outside the workspace: the workspace is reported by name only.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from wardgate import __version__
from wardgate.roles import Scope
from wardgate.rpc.registry import NoParams, Registry
from wardgate.services.git import git_summary

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection


def idle_agent() -> dict[str, Any]:
    """What ``agent`` says when no agent service is installed (the shape of ``summary()``)."""
    return {"state": "idle", "running": [], "sessions": 0}


GIT_SUMMARY_TTL = 2.0
"""Seconds a git summary is reused: clients poll status/get, and each summary runs git."""


class _GitSummaryCache:
    """One git run per TTL however many clients ask; concurrent askers share it."""

    def __init__(self) -> None:
        self._at = -GIT_SUMMARY_TTL
        self._value: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def get(self, gateway: Gateway) -> dict[str, Any] | None:
        async with self._lock:
            if time.monotonic() - self._at >= GIT_SUMMARY_TTL:
                self._value = await git_summary(gateway.workspace, gateway.config.workspace.deny)
                self._at = time.monotonic()
            return self._value


def install(gateway: Gateway) -> None:
    cache = _GitSummaryCache()
    register(gateway.registry, cache)


def register(registry: Registry[Connection], git_cache: _GitSummaryCache) -> None:
    @registry.method("status/get", scope=Scope.STATUS_READ)
    async def status_get(conn: Connection, params: NoParams) -> dict[str, Any]:
        """Server version and mode, workspace name, git branch, agent state, clients, caller."""
        gateway = conn.gateway
        agents = gateway.agents
        return {
            "server": {
                "name": "wardgate",
                "version": __version__,
                "mode": gateway.config.security.mode.value,
            },
            "workspace": gateway.workspace.name,
            "git": await git_cache.get(gateway),
            "agent": agents.summary() if agents is not None else idle_agent(),
            "clients": len(gateway.connections),
            "uptime": round(time.time() - gateway.started_at, 3),
            "you": {"clientId": conn.id, "deviceId": conn.device_id, "role": conn.principal.role},
        }
