"""``status/get``: what the server is and who is connected (no secrets, no paths outside)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from wardgate import __version__
from wardgate.roles import Scope
from wardgate.rpc.registry import NoParams, Registry

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection


def install(gateway: Gateway) -> None:
    register(gateway.registry)


def register(registry: Registry[Connection]) -> None:
    @registry.method("status/get", scope=Scope.STATUS_READ)
    async def status_get(conn: Connection, params: NoParams) -> dict[str, Any]:
        """Server version, mode, workspace name, connected clients and the caller's identity."""
        gateway = conn.gateway
        return {
            "server": {
                "name": "wardgate",
                "version": __version__,
                "mode": gateway.config.security.mode.value,
            },
            "workspace": gateway.workspace.name,
            "clients": len(gateway.connections),
            "uptime": round(time.time() - gateway.started_at, 3),
            "you": {"clientId": conn.id, "deviceId": conn.device_id, "role": conn.principal.role},
        }
