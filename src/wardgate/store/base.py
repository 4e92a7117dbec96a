"""One store interface for every backend (SQLite now, Redis for several instances).

The store holds only what must outlive a process: devices, refresh-token
families (token hashes, never tokens), API keys and browser cookie sessions
(hashes, never the secrets), consumed pairing nonces, revocations and a few
counters. Session tokens are self-verifying and never stored. Agent runs (their record
and their output lines, bounded) are kept too, so a client can catch up after a restart.

Every operation that changes credentials is one atomic step in the backend
(one SQLite transaction, one Redis script), so two instances or two concurrent
requests can never both redeem one pairing token or both rotate one refresh
token. Every change that can invalidate a live connection bumps ``revision``,
which daemons poll to notice revocations made elsewhere (the CLI, another
instance) within a fraction of a second.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


def token_hash(token: str) -> str:
    """What the store keeps instead of a long-lived token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    name: str
    role: str
    created_at: float
    client_info: str = ""
    """JSON text the client sent (clientInfo, its own device id); display only."""
    last_seen: float | None = None
    last_ip: str | None = None
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class Family:
    """A refresh-token family: the chain of refresh tokens one pairing started."""

    id: str
    device_id: str
    created_at: float
    expires_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class NewRefresh:
    """A refresh token to record: its hash, family and expiry."""

    token_hash: str
    family_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A long-lived ``wgk_`` key: only its hash is stored, with a name and a role."""

    id: str
    name: str
    role: str
    created_at: float
    expires_at: float | None = None
    """None: until revoked."""
    last_used_at: float | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class CookieSession:
    """A browser login (``wardgate_session`` cookie): only the cookie value's hash is stored.

    It stands for the device a pairing token registered, or for the API key it was opened
    with, and dies with either."""

    id: str
    role: str
    created_at: float
    expires_at: float
    """Sliding: pushed forward on use, never past ``max_expires_at``."""
    max_expires_at: float
    device_id: str | None = None
    family_id: str | None = None
    api_key_id: str | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and now < self.expires_at


class RedeemOutcome(StrEnum):
    REDEEMED = "redeemed"
    ALREADY_USED = "already_used"
    STALE_GENERATION = "stale_generation"


class RotateOutcome(StrEnum):
    ROTATED = "rotated"
    REUSED = "reused"
    """An already-used refresh token came back: the device is now revoked."""
    UNKNOWN = "unknown"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class RotateResult:
    outcome: RotateOutcome
    device_id: str | None = None
    family_id: str | None = None


@dataclass(frozen=True, slots=True)
class Revocations:
    """A snapshot of everything that invalidates otherwise valid session tokens."""

    revision: int
    devices: frozenset[str] = field(default_factory=frozenset)
    families: frozenset[str] = field(default_factory=frozenset)
    tokens: frozenset[str] = field(default_factory=frozenset)
    """Revoked token ids (``jti``) not yet expired."""
    not_before: float = 0.0
    """Sessions issued before this time are revoked (``wardgate token revoke-all``)."""
    api_keys: frozenset[str] = field(default_factory=frozenset)
    """Revoked (or expired) API key ids."""
    cookies: frozenset[str] = field(default_factory=frozenset)
    """Revoked cookie session ids not yet expired."""

    def session_revoked(self, *, device: str | None, family: str | None, jti: str, iat: float) -> bool:
        return (
            iat < self.not_before
            or jti in self.tokens
            or (device is not None and device in self.devices)
            or (family is not None and family in self.families)
        )


@dataclass(frozen=True, slots=True)
class AgentSessionRecord:
    """One agent run as the store keeps it (the output lines are kept apart)."""

    id: str
    agent_type: str
    status: str
    started_at: float
    device_id: str | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    last_seq: int = 0
    """Sequence number of the last output line produced (0: none yet)."""
    command: str = ""
    """The agent program's name (``argv[0]``'s last component), never a path."""
    prompt: str | None = None
    """Only kept when ``security.audit.log_prompts`` is on."""


@dataclass(frozen=True, slots=True)
class AgentOutputLine:
    seq: int
    stream: str
    """``stdout`` or ``stderr``."""
    line: str


class Store(abc.ABC):
    """The persistent state of wardgate. All methods are coroutines; all writes are atomic."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # --- revocation state ------------------------------------------------------------

    @abc.abstractmethod
    async def revision(self) -> int:
        """A counter bumped by every change that can invalidate a live connection."""

    @abc.abstractmethod
    async def revocations(self, now: float) -> Revocations: ...

    # --- pairing -------------------------------------------------------------------------

    @abc.abstractmethod
    async def pairing_generation(self) -> int: ...

    @abc.abstractmethod
    async def bump_pairing_generation(self) -> int:
        """Invalidate every outstanding pairing token (``wardgate pair --refresh``)."""

    @abc.abstractmethod
    async def nonce_consumed(self, jti: str) -> bool: ...

    @abc.abstractmethod
    async def redeem_pairing(
        self,
        *,
        jti: str,
        generation: int,
        nonce_expires_at: float,
        device: Device,
        family: Family,
        refresh: NewRefresh,
    ) -> RedeemOutcome:
        """Atomically consume a pairing nonce and register the device with its first refresh token."""

    # --- devices ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_device(self, device_id: str) -> Device | None: ...

    @abc.abstractmethod
    async def list_devices(self) -> list[Device]: ...

    @abc.abstractmethod
    async def touch_device(self, device_id: str, *, ip: str | None, now: float) -> None: ...

    @abc.abstractmethod
    async def revoke_device(self, device_id: str, *, now: float) -> bool:
        """Revoke a device and all its refresh families. False if unknown or already revoked."""

    # --- refresh tokens --------------------------------------------------------------------

    @abc.abstractmethod
    async def rotate_refresh(self, old_hash: str, new: NewRefresh, *, now: float) -> RotateResult:
        """Use a refresh token once: replace it with ``new``, or detect reuse and revoke the device."""

    @abc.abstractmethod
    async def list_families(self, *, include_revoked: bool = False) -> list[Family]: ...

    @abc.abstractmethod
    async def revoke_family(self, family_id: str, *, now: float) -> bool: ...

    @abc.abstractmethod
    async def revoke_all(self, *, now: float) -> int:
        """Revoke every family and every session issued so far; returns the families revoked."""

    # --- single tokens ---------------------------------------------------------------------

    @abc.abstractmethod
    async def revoke_token(self, jti: str, *, expires_at: float) -> None:
        """Revoke one session token by id until it would have expired anyway."""

    # --- API keys --------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey, *, key_hash: str) -> None: ...

    @abc.abstractmethod
    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key (revoked or not) whose secret hashes to ``key_hash``."""

    @abc.abstractmethod
    async def list_api_keys(self, *, include_revoked: bool = False) -> list[ApiKey]: ...

    @abc.abstractmethod
    async def touch_api_key(self, key_id: str, *, now: float) -> None: ...

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, *, now: float) -> bool:
        """Revoke a key and every cookie session opened with it. False if unknown or already revoked."""

    # --- browser cookie sessions ---------------------------------------------------------------

    @abc.abstractmethod
    async def create_cookie_session(self, session: CookieSession, *, session_hash: str) -> None: ...

    @abc.abstractmethod
    async def cookie_session_by_hash(self, session_hash: str) -> CookieSession | None:
        """The session (revoked or not) whose cookie value hashes to ``session_hash``."""

    @abc.abstractmethod
    async def extend_cookie_session(self, session_id: str, *, expires_at: float) -> None:
        """Slide the expiry forward (never backwards, never past ``max_expires_at``)."""

    @abc.abstractmethod
    async def revoke_cookie_session(self, session_id: str, *, now: float) -> bool: ...

    @abc.abstractmethod
    async def prune(self, *, now: float) -> None:
        """Drop records that can no longer matter (expired nonces, revocations, used tokens)."""

    # --- agent sessions ------------------------------------------------------------------------

    @abc.abstractmethod
    async def save_agent_session(self, session: AgentSessionRecord) -> None:
        """Insert or update one session record (``last_seq`` never goes backwards)."""

    @abc.abstractmethod
    async def get_agent_session(self, session_id: str) -> AgentSessionRecord | None: ...

    @abc.abstractmethod
    async def list_agent_sessions(self, *, limit: int) -> list[AgentSessionRecord]:
        """The most recent sessions first."""

    @abc.abstractmethod
    async def append_agent_output(
        self, session_id: str, lines: Sequence[AgentOutputLine], *, keep_last: int | None = None
    ) -> None:
        """Append a batch of lines in one atomic step (and raise the session's ``last_seq``).

        With ``keep_last``, lines older than the session's last ``keep_last`` are dropped."""

    @abc.abstractmethod
    async def agent_output(self, session_id: str, *, after_seq: int, limit: int) -> list[AgentOutputLine]:
        """Up to ``limit`` stored lines with ``seq > after_seq``, in order."""

    @abc.abstractmethod
    async def prune_agent_sessions(self, *, keep: int) -> int:
        """Drop all but the ``keep`` most recent sessions and their output; returns how many went."""
