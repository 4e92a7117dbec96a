"""Roles and the scopes they grant (DESIGN.md, "Roles and scopes").

A token carries a role; each JSON-RPC method declares the one scope it needs;
the registry checks it in one place before any handler runs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Scope(StrEnum):
    STATUS_READ = "status:read"
    SESSIONS_READ = "sessions:read"
    FILES_READ = "files:read"
    GIT_READ = "git:read"
    AGENT_RUN = "agent:run"
    PROXY_USE = "proxy:use"
    """Relays to the configured upstreams (``/proxy/...``)."""
    DEVICES_ADMIN = "devices:admin"
    TOKENS_ADMIN = "tokens:admin"
    AUDIT_READ = "audit:read"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


_VIEWER: Final = frozenset({Scope.STATUS_READ, Scope.SESSIONS_READ, Scope.FILES_READ, Scope.GIT_READ})
_OPERATOR: Final = _VIEWER | {Scope.AGENT_RUN, Scope.PROXY_USE}
_ADMIN: Final = _OPERATOR | {Scope.DEVICES_ADMIN, Scope.TOKENS_ADMIN, Scope.AUDIT_READ}

ROLE_SCOPES: Final[dict[Role, frozenset[Scope]]] = {
    Role.VIEWER: _VIEWER,
    Role.OPERATOR: _OPERATOR,
    Role.ADMIN: _ADMIN,
}

DEFAULT_PAIRING_ROLE: Final = Role.OPERATOR


def scopes_for(role: str | None) -> frozenset[Scope]:
    """The scopes of a role; an unknown or missing role grants nothing."""
    try:
        return ROLE_SCOPES[Role(role)] if role is not None else frozenset()
    except ValueError:
        return frozenset()
