"""Built-in JSON-RPC services. ``install_all`` registers every one on a gateway.

Each service module has ``install(gateway)``: it registers its methods on
``gateway.registry`` and may add ``gateway.shutdown_hooks`` (stop work when the
daemon stops) and ``gateway.disconnect_hooks`` (forget a connection).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wardgate.server.app import Gateway


def install_all(gateway: Gateway) -> None:
    from wardgate.services import admin, agent, files, git, status

    status.install(gateway)
    files.install(gateway)
    git.install(gateway)
    admin.install(gateway)
    agent.install(gateway)
