"""The signing key ring: which keys sign and verify wardgate tokens.

There is no built-in or fallback key (seed 004's review). The ring comes from,
in order:

1. ``WARDGATE_SIGNING_KEYS``: one or more base64url keys of at least 32 bytes,
   comma-separated, the first one active. Several instances that share this
   variable share their keys (multi-instance deployments).
2. With ``store.backend: redis``, the ring kept in Redis: the first instance
   creates it (atomically, so all instances agree), the others read it. Easy,
   but whoever can read that Redis key can forge tokens; the env var is the
   recommendation for production (docs/DEPLOYMENT.md).
3. ``<data dir>/keys.json`` (mode 0600), generated with 256 random bits on the
   first start and read on every later one. Its mode is checked: a key file
   that others can read is refused, as ssh refuses such a private key.

Each key has an id (``kid``) carried by every token it signs, so a new key can
become active while the old ones still verify the tokens they signed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import secrets
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from wardgate.errors import ConfigError

KEY_BYTES: Final = 32
KEYS_ENV: Final = "WARDGATE_SIGNING_KEYS"
SERVER_ID_ENV: Final = "WARDGATE_SERVER_ID"
KEY_FILE_NAME: Final = "keys.json"


class _KeyFile(msgspec.Struct, forbid_unknown_fields=True):
    server_id: str
    active: str
    keys: dict[str, str]


@dataclass(frozen=True, slots=True)
class KeyRing:
    """Keys by ``kid``, the active one, and this server's (or cluster's) id."""

    server_id: str
    active_kid: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.active_kid not in self.keys:
            raise ConfigError("the active signing key is missing from the key ring")

    @property
    def active_key(self) -> bytes:
        return self.keys[self.active_kid]

    def __repr__(self) -> str:  # never show key material
        kids = len(self.keys)
        return f"KeyRing(server_id={self.server_id!r}, active_kid={self.active_kid!r}, keys=<{kids} keys>)"


def key_id(key: bytes) -> str:
    """A stable, non-secret id for a key: 8 bytes of its SHA-256, base64url."""
    return base64.urlsafe_b64encode(hashlib.sha256(b"wardgate-kid" + key).digest()[:8]).decode().rstrip("=")


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: a signing key is not valid base64url") from None
    if len(key) < KEY_BYTES:
        raise ConfigError(f"{where}: signing keys must be at least {KEY_BYTES} bytes")
    return key


def _encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def generate_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / ".keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path``, mode 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_data_dir(data_dir: Path) -> Path:
    """Create the data directory (mode 0700) if needed and return it."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return data_dir


def _read_key_file(path: Path) -> KeyRing:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}")
    return ring_from_json(path.read_bytes(), str(path), what="key file")


def _write_key_file(path: Path, ring: KeyRing) -> None:
    _write_private(path, msgspec.json.format(ring_to_json(ring)) + b"\n")


def ring_to_json(ring: KeyRing) -> bytes:
    """The ring in the key file's format (for sharing it through Redis)."""
    raw = _KeyFile(
        server_id=ring.server_id,
        active=ring.active_kid,
        keys={kid: _encode_key(key) for kid, key in ring.keys.items()},
    )
    return msgspec.json.encode(raw)


def ring_from_json(data: bytes | str, where: str, *, what: str = "key ring") -> KeyRing:
    try:
        raw = msgspec.json.decode(data, type=_KeyFile)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ConfigError(f"{where} is not a valid wardgate {what}") from None
    keys = {kid: _decode_key(text, where) for kid, text in raw.keys.items()}
    if raw.active not in keys:
        raise ConfigError(f"{where}: the active key {raw.active!r} is not in the ring")
    return KeyRing(server_id=raw.server_id, active_kid=raw.active, keys=keys)


def new_key_ring() -> KeyRing:
    key = generate_key()
    return KeyRing(server_id=str(uuid.uuid4()), active_kid=key_id(key), keys={key_id(key): key})


def env_key_ring(environ: Mapping[str, str] | None = None) -> KeyRing | None:
    """The ring from ``WARDGATE_SIGNING_KEYS``, or None when it is not set."""
    env = os.environ if environ is None else environ
    if not env.get(KEYS_ENV):
        return None
    keys_list = [_decode_key(part, KEYS_ENV) for part in env[KEYS_ENV].split(",") if part]
    if not keys_list:
        raise ConfigError(f"{KEYS_ENV} holds no key")
    keys = {key_id(key): key for key in keys_list}
    server_id = env.get(SERVER_ID_ENV) or key_id(keys_list[0])
    return KeyRing(server_id=server_id, active_kid=key_id(keys_list[0]), keys=keys)


def load_key_ring(data_dir: Path, environ: Mapping[str, str] | None = None) -> KeyRing:
    """Load the key ring (env var first, then the key file), generating the file if missing."""
    from_env = env_key_ring(environ)
    if from_env is not None:
        return from_env
    ensure_data_dir(data_dir)
    path = data_dir / KEY_FILE_NAME
    with _locked(data_dir):
        if path.exists():
            return _read_key_file(path)
        ring = new_key_ring()
        _write_key_file(path, ring)
        return ring


def rotate_key_file(data_dir: Path) -> KeyRing:
    """Add a fresh key to the key file and make it active; older keys still verify."""
    path = data_dir / KEY_FILE_NAME
    with _locked(data_dir):
        ring = _read_key_file(path)
        key = generate_key()
        keys = {**ring.keys, key_id(key): key}
        new = KeyRing(server_id=ring.server_id, active_kid=key_id(key), keys=keys)
        _write_key_file(path, new)
        return new
