"""``devices/list`` and ``devices/revoke``: device administration over JSON-RPC (admin only).

Both need the ``devices:admin`` scope, which only the admin role grants; the registry
checks it before these handlers run, so an operator or viewer gets -32004.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from wardgate.roles import Scope
from wardgate.rpc.registry import NoParams, Registry
from wardgate.store.base import Device

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection


class DeviceRevokeParams(msgspec.Struct, forbid_unknown_fields=True):
    device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    """The id ``devices/list`` shows (``dev_...``)."""


def describe_device(device: Device, *, connections: int, current: bool) -> dict[str, Any]:
    """A device as clients see it: no token, no hash, nothing secret (the CLI's JSON shape)."""
    return {
        "id": device.id,
        "name": device.name,
        "role": device.role,
        "created": device.created_at,
        "lastSeen": device.last_seen,
        "lastIp": device.last_ip,
        "revoked": device.revoked_at is not None,
        "connections": connections,
        "current": current,
    }


def install(gateway: Gateway) -> None:
    register(gateway.registry)


def register(registry: Registry[Connection]) -> None:
    @registry.method("devices/list", scope=Scope.DEVICES_ADMIN)
    async def devices_list(conn: Connection, params: NoParams) -> list[dict[str, Any]]:
        """Paired devices: id, name, role, pairing time, last seen, status, live connections."""
        gateway = conn.gateway
        live: dict[str, int] = {}
        for other in gateway.connections.values():
            if other.device_id is not None:
                live[other.device_id] = live.get(other.device_id, 0) + 1
        return [
            describe_device(device, connections=live.get(device.id, 0), current=device.id == conn.device_id)
            for device in await gateway.store.list_devices()
        ]

    @registry.method("devices/revoke", scope=Scope.DEVICES_ADMIN, params=DeviceRevokeParams)
    async def devices_revoke(conn: Connection, params: DeviceRevokeParams) -> dict[str, Any]:
        """Revoke a device: its tokens stop working and its live connections close (4401)."""
        gateway = conn.gateway
        revoked = await gateway.revoke_device(params.device_id, by=conn.device_id or "rpc")
        return {"deviceId": params.device_id, "revoked": revoked}
