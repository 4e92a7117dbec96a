"""The embedded store: one SQLite file in the data directory.

WAL mode, so the daemon and the CLI read and write the same file at once;
every change is one ``BEGIN IMMEDIATE`` transaction, so check-then-write steps
(redeeming a pairing nonce, rotating a refresh token) are atomic across
processes. Statements are short and indexed; they run on the event loop's
thread, which costs less than a hop to a worker thread for such small work.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import Final

from wardgate.errors import StoreUnavailable
from wardgate.store.base import (
    AgentOutputLine,
    AgentSessionRecord,
    ApiKey,
    CookieSession,
    Device,
    Family,
    NewRefresh,
    RedeemOutcome,
    Revocations,
    RotateOutcome,
    RotateResult,
    Store,
)

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, created_at REAL NOT NULL,
    client_info TEXT NOT NULL DEFAULT '', last_seen REAL, last_ip TEXT, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS families (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id),
    created_at REAL NOT NULL, expires_at REAL NOT NULL, last_used_at REAL, revoked_at REAL
);
CREATE INDEX IF NOT EXISTS families_device ON families(device_id);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash TEXT PRIMARY KEY, family_id TEXT NOT NULL REFERENCES families(id),
    used_at REAL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_family ON refresh_tokens(family_id);
CREATE TABLE IF NOT EXISTS consumed_nonces (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL, role TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL, last_used_at REAL, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS cookie_sessions (
    id TEXT PRIMARY KEY, session_hash TEXT NOT NULL UNIQUE, role TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, max_expires_at REAL NOT NULL,
    device_id TEXT, family_id TEXT, api_key_id TEXT, revoked_at REAL
);
CREATE INDEX IF NOT EXISTS cookie_sessions_key ON cookie_sessions(api_key_id);
CREATE TABLE IF NOT EXISTS agent_sessions (
    id TEXT PRIMARY KEY, agent_type TEXT NOT NULL, status TEXT NOT NULL, started_at REAL NOT NULL,
    device_id TEXT, ended_at REAL, exit_code INTEGER, last_seq INTEGER NOT NULL DEFAULT 0,
    command TEXT NOT NULL DEFAULT '', prompt TEXT
);
CREATE INDEX IF NOT EXISTS agent_sessions_started ON agent_sessions(started_at);
CREATE TABLE IF NOT EXISTS agent_output (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, stream TEXT NOT NULL, line TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""
_INSERT_REFRESH: Final = (
    "INSERT INTO refresh_tokens(token_hash, family_id, used_at, expires_at) VALUES (?, ?, NULL, ?)"
)


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            with _transaction(db):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?), ('revision', 0), "
                    "('pairing_generation', 0), ('not_before', 0)",
                    (SCHEMA_VERSION,),
                )
        except sqlite3.Error:
            raise StoreUnavailable(hint="cannot open the SQLite store") from None
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable(hint="the store is not open")
        return self._db

    def _meta(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str = "revision", *, to: int | None = None) -> int:
        if to is None:
            self.db.execute("UPDATE meta SET value = value + 1 WHERE key = ?", (key,))
        else:
            self.db.execute("UPDATE meta SET value = ? WHERE key = ?", (to, key))
        return self._meta(key)

    # --- revocation state ------------------------------------------------------------------

    async def revision(self) -> int:
        return self._meta("revision")

    async def revocations(self, now: float) -> Revocations:
        db = self.db
        with _transaction(db, immediate=False):
            revision = self._meta("revision")
            devices = frozenset(
                r[0] for r in db.execute("SELECT id FROM devices WHERE revoked_at IS NOT NULL")
            )
            families = frozenset(
                r[0]
                for r in db.execute(
                    "SELECT id FROM families WHERE revoked_at IS NOT NULL AND expires_at > ?", (now,)
                )
            )
            tokens = frozenset(
                r[0] for r in db.execute("SELECT jti FROM revoked_tokens WHERE expires_at > ?", (now,))
            )
            not_before = float(self._meta("not_before"))
            api_keys = frozenset(
                r[0]
                for r in db.execute(
                    "SELECT id FROM api_keys WHERE revoked_at IS NOT NULL OR expires_at <= ?", (now,)
                )
            )
            cookies = frozenset(
                r[0]
                for r in db.execute(
                    "SELECT id FROM cookie_sessions WHERE revoked_at IS NOT NULL AND max_expires_at > ?",
                    (now,),
                )
            )
        return Revocations(revision, devices, families, tokens, not_before, api_keys, cookies)

    # --- pairing -----------------------------------------------------------------------------

    async def pairing_generation(self) -> int:
        return self._meta("pairing_generation")

    async def bump_pairing_generation(self) -> int:
        with _transaction(self.db):
            return self._bump("pairing_generation")

    async def nonce_consumed(self, jti: str) -> bool:
        row = self.db.execute("SELECT 1 FROM consumed_nonces WHERE jti = ?", (jti,)).fetchone()
        return row is not None

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
        db = self.db
        with _transaction(db):
            if generation != self._meta("pairing_generation"):
                return RedeemOutcome.STALE_GENERATION
            cur = db.execute(
                "INSERT OR IGNORE INTO consumed_nonces(jti, expires_at) VALUES (?, ?)",
                (jti, nonce_expires_at),
            )
            if cur.rowcount != 1:
                return RedeemOutcome.ALREADY_USED
            db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?)", astuple(device))
            db.execute("INSERT INTO families VALUES (?, ?, ?, ?, ?, ?)", astuple(family))
            db.execute(_INSERT_REFRESH, (refresh.token_hash, refresh.family_id, refresh.expires_at))
        return RedeemOutcome.REDEEMED

    # --- devices -------------------------------------------------------------------------------

    async def get_device(self, device_id: str) -> Device | None:
        row = self.db.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return Device(*row) if row else None

    async def list_devices(self) -> list[Device]:
        return [Device(*row) for row in self.db.execute("SELECT * FROM devices ORDER BY created_at")]

    async def touch_device(self, device_id: str, *, ip: str | None, now: float) -> None:
        with _transaction(self.db):
            self.db.execute(
                "UPDATE devices SET last_seen = ?, last_ip = ? WHERE id = ?", (now, ip, device_id)
            )

    def _revoke_device(self, device_id: str, now: float) -> bool:
        cur = self.db.execute(
            "UPDATE devices SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, device_id)
        )
        self.db.execute(
            "UPDATE families SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL", (now, device_id)
        )
        self._bump()
        return cur.rowcount == 1

    async def revoke_device(self, device_id: str, *, now: float) -> bool:
        with _transaction(self.db):
            return self._revoke_device(device_id, now)

    # --- refresh tokens --------------------------------------------------------------------------

    async def rotate_refresh(self, old_hash: str, new: NewRefresh, *, now: float) -> RotateResult:
        db = self.db
        with _transaction(db):
            row = db.execute(
                "SELECT t.used_at, t.expires_at, f.id, f.device_id, f.revoked_at, d.revoked_at "
                "FROM refresh_tokens t JOIN families f ON f.id = t.family_id "
                "JOIN devices d ON d.id = f.device_id WHERE t.token_hash = ?",
                (old_hash,),
            ).fetchone()
            if row is None:
                return RotateResult(RotateOutcome.UNKNOWN)
            used_at, expires_at, family_id, device_id, family_revoked, device_revoked = row
            if family_revoked is not None or device_revoked is not None:
                return RotateResult(RotateOutcome.REVOKED, device_id, family_id)
            if used_at is not None:
                # Reuse of a rotated refresh token: someone holds a stolen copy. Revoke the device.
                self._revoke_device(device_id, now)
                return RotateResult(RotateOutcome.REUSED, device_id, family_id)
            if expires_at <= now:
                return RotateResult(RotateOutcome.UNKNOWN, device_id, family_id)
            db.execute("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?", (now, old_hash))
            db.execute(_INSERT_REFRESH, (new.token_hash, family_id, new.expires_at))
            db.execute(
                "UPDATE families SET last_used_at = ?, expires_at = ? WHERE id = ?",
                (now, new.expires_at, family_id),
            )
        return RotateResult(RotateOutcome.ROTATED, device_id, family_id)

    async def list_families(self, *, include_revoked: bool = False) -> list[Family]:
        query = "SELECT * FROM families"
        if not include_revoked:
            query += " WHERE revoked_at IS NULL"
        return [Family(*row) for row in self.db.execute(query + " ORDER BY created_at")]

    async def revoke_family(self, family_id: str, *, now: float) -> bool:
        with _transaction(self.db):
            cur = self.db.execute(
                "UPDATE families SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, family_id)
            )
            self._bump()
            return cur.rowcount == 1

    async def revoke_all(self, *, now: float) -> int:
        with _transaction(self.db):
            cur = self.db.execute("UPDATE families SET revoked_at = ? WHERE revoked_at IS NULL", (now,))
            self._bump("not_before", to=int(now))
            self._bump("pairing_generation")
            self._bump()
            return cur.rowcount

    async def revoke_token(self, jti: str, *, expires_at: float) -> None:
        with _transaction(self.db):
            self.db.execute(
                "INSERT OR REPLACE INTO revoked_tokens(jti, expires_at) VALUES (?, ?)", (jti, expires_at)
            )
            self._bump()

    # --- API keys ------------------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey, *, key_hash: str) -> None:
        with _transaction(self.db):
            self.db.execute(
                _INSERT_API_KEY,
                (*astuple(key), key_hash),
            )

    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = self.db.execute(_SELECT_API_KEYS + " WHERE key_hash = ?", (key_hash,)).fetchone()
        return ApiKey(*row) if row else None

    async def list_api_keys(self, *, include_revoked: bool = False) -> list[ApiKey]:
        query = _SELECT_API_KEYS
        if not include_revoked:
            query += " WHERE revoked_at IS NULL"
        return [ApiKey(*row) for row in self.db.execute(query + " ORDER BY created_at, id")]

    async def touch_api_key(self, key_id: str, *, now: float) -> None:
        with _transaction(self.db):
            self.db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))

    async def revoke_api_key(self, key_id: str, *, now: float) -> bool:
        with _transaction(self.db):
            cur = self.db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
            )
            self.db.execute(
                "UPDATE cookie_sessions SET revoked_at = ? WHERE api_key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            self._bump()
            return cur.rowcount == 1

    # --- browser cookie sessions -------------------------------------------------------------

    async def create_cookie_session(self, session: CookieSession, *, session_hash: str) -> None:
        with _transaction(self.db):
            self.db.execute(
                _INSERT_COOKIE,
                (*astuple(session), session_hash),
            )

    async def cookie_session_by_hash(self, session_hash: str) -> CookieSession | None:
        row = self.db.execute(_SELECT_COOKIES + " WHERE session_hash = ?", (session_hash,)).fetchone()
        return CookieSession(*row) if row else None

    async def extend_cookie_session(self, session_id: str, *, expires_at: float) -> None:
        with _transaction(self.db):
            self.db.execute(
                "UPDATE cookie_sessions SET expires_at = MAX(expires_at, MIN(?, max_expires_at)) "
                "WHERE id = ? AND revoked_at IS NULL",
                (expires_at, session_id),
            )

    async def revoke_cookie_session(self, session_id: str, *, now: float) -> bool:
        with _transaction(self.db):
            cur = self.db.execute(
                "UPDATE cookie_sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, session_id),
            )
            self._bump()
            return cur.rowcount == 1

    async def prune(self, *, now: float) -> None:
        with _transaction(self.db):
            self.db.execute("DELETE FROM cookie_sessions WHERE max_expires_at <= ?", (now,))
            self.db.execute("DELETE FROM consumed_nonces WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM revoked_tokens WHERE expires_at <= ?", (now,))
            self.db.execute("DELETE FROM refresh_tokens WHERE expires_at <= ?", (now,))

    # --- agent sessions --------------------------------------------------------------------------

    async def save_agent_session(self, session: AgentSessionRecord) -> None:
        with _transaction(self.db):
            self.db.execute(_UPSERT_AGENT_SESSION, astuple(session))

    async def get_agent_session(self, session_id: str) -> AgentSessionRecord | None:
        row = self.db.execute(_SELECT_AGENT_SESSIONS + " WHERE id = ?", (session_id,)).fetchone()
        return AgentSessionRecord(*row) if row else None

    async def list_agent_sessions(self, *, limit: int) -> list[AgentSessionRecord]:
        rows = self.db.execute(_SELECT_AGENT_SESSIONS + " ORDER BY started_at DESC, id LIMIT ?", (limit,))
        return [AgentSessionRecord(*row) for row in rows]

    async def append_agent_output(
        self, session_id: str, lines: Sequence[AgentOutputLine], *, keep_last: int | None = None
    ) -> None:
        if not lines:
            return
        db = self.db
        last = max(line.seq for line in lines)
        with _transaction(db):
            db.executemany(
                "INSERT OR REPLACE INTO agent_output(session_id, seq, stream, line) VALUES (?, ?, ?, ?)",
                [(session_id, line.seq, line.stream, line.line) for line in lines],
            )
            db.execute(
                "UPDATE agent_sessions SET last_seq = MAX(last_seq, ?) WHERE id = ?", (last, session_id)
            )
            if keep_last is not None and last > keep_last:
                db.execute(
                    "DELETE FROM agent_output WHERE session_id = ? AND seq <= ?",
                    (session_id, last - keep_last),
                )

    async def agent_output(self, session_id: str, *, after_seq: int, limit: int) -> list[AgentOutputLine]:
        rows = self.db.execute(
            "SELECT seq, stream, line FROM agent_output WHERE session_id = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (session_id, after_seq, limit),
        )
        return [AgentOutputLine(*row) for row in rows]

    async def prune_agent_sessions(self, *, keep: int) -> int:
        db = self.db
        with _transaction(db):
            old = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM agent_sessions ORDER BY started_at DESC, id LIMIT -1 OFFSET ?", (keep,)
                )
            ]
            for session_id in old:
                db.execute("DELETE FROM agent_output WHERE session_id = ?", (session_id,))
                db.execute("DELETE FROM agent_sessions WHERE id = ?", (session_id,))
        return len(old)


# Column orders are the dataclasses' field orders.
_SELECT_API_KEYS: Final = (
    "SELECT id, name, role, created_at, expires_at, last_used_at, revoked_at FROM api_keys"
)
_INSERT_API_KEY: Final = (
    "INSERT INTO api_keys(id, name, role, created_at, expires_at, last_used_at, revoked_at, key_hash) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_COOKIES: Final = (
    "SELECT id, role, created_at, expires_at, max_expires_at, device_id, family_id, api_key_id, revoked_at "
    "FROM cookie_sessions"
)
_INSERT_COOKIE: Final = (
    "INSERT INTO cookie_sessions(id, role, created_at, expires_at, max_expires_at, device_id, family_id, "
    "api_key_id, revoked_at, session_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_SELECT_AGENT_SESSIONS: Final = (
    "SELECT id, agent_type, status, started_at, device_id, ended_at, exit_code, last_seq, command, prompt "
    "FROM agent_sessions"
)
_UPSERT_AGENT_SESSION: Final = (
    "INSERT INTO agent_sessions(id, agent_type, status, started_at, device_id, ended_at, exit_code, "
    "last_seq, command, prompt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET status = excluded.status, device_id = excluded.device_id, "
    "ended_at = excluded.ended_at, exit_code = excluded.exit_code, "
    "last_seq = MAX(agent_sessions.last_seq, excluded.last_seq), command = excluded.command, "
    "prompt = excluded.prompt"
)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    try:
        db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    except sqlite3.Error:
        raise StoreUnavailable from None
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    else:
        db.execute("COMMIT")
