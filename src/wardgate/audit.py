"""The tamper-evident, append-only audit log (DESIGN.md, "Operations").

One JSON object per line, compact, keys in a stable order::

    {"ts":"2025-01-31T12:34:56.789Z","seq":42,"event":"auth.failure",...fields...,"prev":"<64 hex>"}

``prev`` is the SHA-256 (hex) of the exact bytes of the previous line,
newline included; the very first line of a log carries 64 zeros. ``seq``
counts lines from 1 without gaps. Together they chain the lines: editing,
removing, reordering or truncating a line breaks the chain at that point,
and :func:`verify_audit` names the first line where it breaks.

String values pass through :mod:`wardgate.logs` redaction, and fields whose
name is a credential's (``token``, ``authorization``, ``cookie``...) are
masked whole: a token is never written here.

Writers
-------

The daemon and the CLI both append, so every append takes an exclusive
``flock`` on a lock file beside the log (``audit.log.lock``; the log itself is
renamed on rotation, so it cannot carry the lock), then opens the live file,
reads only its last line (seeking from the end), writes the new line with one
``os.write`` on an ``O_APPEND`` descriptor, and closes. No descriptor stays
open between appends, so an :class:`AuditLog` needs no closing and survives
``fork``. Appends are synchronous file I/O taking well under a millisecond;
an asyncio caller that cannot afford even that can use ``asyncio.to_thread``.

With ``fsync=True`` each append is flushed to disk before ``append`` returns
(and rotations flush the directory). It is off by default: the line is in the
kernel's page cache once ``os.write`` returns, which survives the process
crashing, and the OS writes it out within seconds; only a power loss or
kernel crash in that window loses it. Turn it on where that window matters
more than a disk flush per event.

Rotation
--------

When a line would take the live file past ``max_bytes``, the files shift
(``audit.log.1`` to ``audit.log.2`` and so on, the oldest beyond ``backups``
deleted), the live file becomes ``audit.log.1`` and a new live file starts
with an ``audit.rotated`` line that chains to the last line of the rotated
file and continues its ``seq``. The chain therefore runs across all files.

What the chain proves, and what it cannot
-----------------------------------------

The hash chain has no secret and no outside anchor: it detects edits made
without recomputing the chain (a hand edit, a careless script, a partial
restore), not an attacker who rewrites every later line. Removing lines
from the end of the newest file, or whole rotated files from the old end,
looks the same as a log that simply stopped there or was rotated away.
Anchoring the latest ``seq`` and hash elsewhere (the store's audit tail, a
remote log) closes that gap.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import itertools
import os
import re
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

import msgspec

from wardgate.logs import Redactor, format_utc_timestamp

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_MAX_BYTES",
    "GENESIS_PREV",
    "ROTATION_EVENT",
    "AuditLocation",
    "AuditLog",
    "AuditVerification",
    "read_audit",
    "verify_audit",
]

DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
"""Rotate when the live file would grow past this many bytes."""

DEFAULT_BACKUPS: Final = 5
"""Keep this many rotated files (``audit.log.1`` newest ... ``audit.log.5`` oldest)."""

GENESIS_PREV: Final = "0" * 64
"""The ``prev`` of the first line of a log that has never lost a file to rotation."""

ROTATION_EVENT: Final = "audit.rotated"
"""The first line of every file started by rotation; it chains to the previous file."""

_RESERVED_FIELDS: Final = frozenset({"ts", "seq", "event", "prev"})
_TAIL_CHUNK_BYTES: Final = 8192
_FILE_MODE: Final = 0o600
_DIRECTORY_MODE: Final = 0o700
_HEX_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
_ENCODER: Final = msgspec.json.Encoder()


class AuditLocation(NamedTuple):
    """A line in the audit log: the file and the 1-based line number within it."""

    file: Path
    line_number: int


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """The result of :func:`verify_audit`.

    ``lines`` is the number of lines that verified before the first broken one
    (all of them when ``ok``). ``first_bad`` is the first line at which the
    chain is broken (see :func:`verify_audit` for exactly which line that is)
    and ``detail`` says what is wrong in words.
    """

    ok: bool
    lines: int
    first_bad: AuditLocation | None
    detail: str


def _sha256_hex(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _rotated_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _rotated_numbers(path: Path) -> list[int]:
    """The numbers ``n`` of the existing ``<path>.<n>`` files, ascending (newest first)."""
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(int(match.group(1)) for name in names if (match := pattern.fullmatch(name)))


def _lock_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.lock")


def _parse_record(line: bytes) -> dict[str, Any] | None:
    """The record on ``line``, or None if it is not a well-formed audit record."""
    try:
        record = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    if not isinstance(record, dict):
        return None
    seq, prev, event = record.get("seq"), record.get("prev"), record.get("event")
    if type(seq) is not int or not isinstance(event, str):
        return None
    if not isinstance(prev, str) or _HEX_DIGEST.fullmatch(prev) is None:
        return None
    return record


def _lines_backward(fd: int, size: int) -> Iterator[bytes]:
    """The lines of the first ``size`` bytes of ``fd``, last first, read in chunks from the end."""
    end = size
    pending = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK_BYTES)
        pending = os.pread(fd, end - start, start) + pending
        end = start
        # Every newline except one that ends ``pending`` closes a complete line after it.
        cut = pending.rfind(b"\n", 0, len(pending) - 1)
        while cut >= 0:
            yield pending[cut + 1 :]
            pending = pending[: cut + 1]
            cut = pending.rfind(b"\n", 0, len(pending) - 1)
    if pending:
        yield pending


class _ChainTail(NamedTuple):
    """Where the next line continues the chain."""

    prev: str
    last_seq: int
    torn: bool
    """The live file ends in the middle of a line (a crash mid-write, or truncation)."""


_GENESIS: Final = _ChainTail(GENESIS_PREV, 0, torn=False)


def _chain_tail(fd: int, size: int) -> _ChainTail:
    """Read the end of a non-empty file: the hash and ``seq`` the next line continues from.

    A torn last line will be ended with a newline before the next line is
    written, so it is hashed with one; it stays in the chain, and
    :func:`verify_audit` reports it. Lines that are not records still count
    for ``seq``, which continues from the last record before them.
    """
    lines = _lines_backward(fd, size)
    last = next(lines)
    torn = not last.endswith(b"\n")
    prev = _sha256_hex(last + b"\n" if torn else last)
    unparsed = 0
    for line in itertools.chain((last,), lines):
        record = _parse_record(line)
        if record is not None:
            return _ChainTail(prev, int(record["seq"]) + unparsed, torn)
        unparsed += 1
    return _ChainTail(prev, unparsed, torn)


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` (a single line on ``O_APPEND`` is not interleaved); loop only if it was short."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(lock_path: Path, operation: int, *, create: bool) -> Iterator[None]:
    """Hold ``flock(operation)`` on ``lock_path``; without ``create``, a missing file means no lock."""
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, _FILE_MODE)
    except (FileNotFoundError, PermissionError):
        if create:
            raise
        yield
        return
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


class AuditLog:
    """Appends chained JSON lines to ``path``, safely across threads and processes.

    ``max_bytes`` and ``backups`` control rotation (module docstring);
    ``backups=0`` deletes the rotated file. ``secrets`` are extra strings to
    redact from field values (see :func:`wardgate.logs.redact`). ``fsync``
    flushes every append to disk (off by default; module docstring).

    The directory is created (mode 0700) if missing and the file (mode 0600)
    at once, so a misconfigured path fails at startup rather than at the
    first event.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        secrets: Collection[str] = (),
        fsync: bool = False,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"audit max_bytes must be positive, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"audit backups must be zero or more, got {backups}")
        self._path = Path(path)
        self._lock_path = _lock_path(self._path)
        self._max_bytes = max_bytes
        self._backups = backups
        self._fsync = fsync
        self._redactor = Redactor(secrets)
        self._thread_lock = threading.Lock()
        self._path.parent.mkdir(mode=_DIRECTORY_MODE, parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)

    @property
    def path(self) -> Path:
        """The live file."""
        return self._path

    def add_secret(self, secret: str) -> bool:
        """Redact ``secret`` from field values from now on; False (ignored) if under 8 characters."""
        return self._redactor.add_secret(secret)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event and return the record as written (redacted, with ``ts``, ``seq``, ``prev``).

        Field values may be any JSON-able data; strings are redacted, other
        objects are written as their redacted ``str()``. The names ``ts``,
        ``seq`` and ``prev`` are reserved (``ValueError``).
        """
        reserved = sorted(_RESERVED_FIELDS.intersection(fields))
        if reserved:
            raise ValueError(f"audit field names {reserved} are reserved")
        safe_event = self._redactor.redact(event)
        safe_fields = {name: self._redactor.redact_field(name, value) for name, value in fields.items()}
        with self._thread_lock, _flocked(self._lock_path, fcntl.LOCK_EX, create=True):
            return self._append_locked(safe_event, safe_fields)

    def _append_locked(self, event: str, fields: dict[str, object]) -> dict[str, Any]:
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            tail = self._tail(fd, size)
            prefix = b"\n" if tail.torn else b""
            record: dict[str, Any] = {
                "ts": format_utc_timestamp(time.time()),
                "seq": tail.last_seq + 1,
                "event": event,
                **fields,
                "prev": tail.prev,
            }
            line = _ENCODER.encode(record) + b"\n"
            if size > 0 and size + len(prefix) + len(line) > self._max_bytes:
                if prefix:
                    _write_all(fd, prefix)
                os.close(fd)
                fd = -1  # closed; _rotate() opens the new live file
                fd = self._rotate()
                marker = _ENCODER.encode(
                    {
                        "ts": record["ts"],
                        "seq": tail.last_seq + 1,
                        "event": ROTATION_EVENT,
                        "prev": tail.prev,
                    }
                )
                marker += b"\n"
                record["seq"] = tail.last_seq + 2
                record["prev"] = _sha256_hex(marker)
                data = marker + _ENCODER.encode(record) + b"\n"
            else:
                data = prefix + line
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        return record

    def _tail(self, fd: int, size: int) -> _ChainTail:
        """Where the chain continues: the live file's end, else the newest rotated file's."""
        if size > 0:
            return _chain_tail(fd, size)
        newest_rotated = _rotated_path(self._path, 1)
        try:
            rotated_fd = os.open(newest_rotated, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _GENESIS
        try:
            rotated_size = os.fstat(rotated_fd).st_size
            if rotated_size == 0:
                return _GENESIS
            tail = _chain_tail(rotated_fd, rotated_size)
            return tail._replace(torn=False)  # nothing more is written to a rotated file
        finally:
            os.close(rotated_fd)

    def _rotate(self) -> int:
        """Shift the files, start a new live file; returns its descriptor."""
        for number in reversed(_rotated_numbers(self._path)):
            source = _rotated_path(self._path, number)
            if number >= self._backups:
                source.unlink()
            else:
                os.replace(source, _rotated_path(self._path, number + 1))
        if self._backups > 0:
            os.replace(self._path, _rotated_path(self._path, 1))
        else:
            self._path.unlink()
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        if self._fsync:
            _fsync_directory(self._path.parent)
        return fd


# --- reading ------------------------------------------------------------------------------------


class _SnapshotFile(NamedTuple):
    path: Path
    handle: IO[bytes]
    size: int


@contextlib.contextmanager
def _snapshot(path: Path) -> Iterator[list[_SnapshotFile]]:
    """Open every file of the log, oldest first, each with its size at this moment.

    Taken under a shared lock (when the lock file exists), so no append or
    rotation is half done; the lock is released at once and reading happens
    afterwards on the open descriptors, up to the recorded sizes, while
    writers carry on.
    """
    with contextlib.ExitStack() as stack:
        files: list[_SnapshotFile] = []
        with _flocked(_lock_path(path), fcntl.LOCK_SH, create=False):
            candidates = [_rotated_path(path, n) for n in reversed(_rotated_numbers(path))]
            for candidate in [*candidates, path]:
                try:
                    handle = stack.enter_context(open(candidate, "rb"))
                except FileNotFoundError:
                    continue
                files.append(_SnapshotFile(candidate, handle, os.fstat(handle.fileno()).st_size))
        yield files


def _raw_lines(snapshot_file: _SnapshotFile) -> Iterator[bytes]:
    remaining = snapshot_file.size
    while remaining > 0:
        line = snapshot_file.handle.readline(remaining)
        if not line:
            return
        remaining -= len(line)
        yield line


class _VerifiedLine(NamedTuple):
    location: AuditLocation
    raw: bytes
    seq: int


def _describe(location: AuditLocation) -> str:
    return f"line {location.line_number} of {location.file.name}"


def verify_audit(path: Path) -> AuditVerification:
    """Check the whole chain: rotated files oldest to newest, then the live file.

    Each line must be a complete JSON record (``seq``, ``event``, ``prev``),
    its ``seq`` must be one more than the previous line's, and its ``prev``
    must be the SHA-256 of the previous line's bytes. The first line of all
    must carry :data:`GENESIS_PREV` and ``seq`` 1, unless it is an
    ``audit.rotated`` line: then older files were dropped by rotation, and its
    ``prev`` is accepted as the anchor.

    "The first broken line" is the first line failing one of those checks, so:

    * a line that was edited but is still valid JSON with its ``seq`` intact
      verifies by itself; the next line is reported, because its ``prev`` no
      longer matches ("line 5 of audit.log: prev hash does not match line 4 of
      audit.log: line 4 was changed after it was written");
    * an edit that breaks the JSON or the ``seq`` of line k reports line k;
    * a removed line reports the line after the gap (its ``seq`` jumps);
    * swapped lines report the first of them (its ``seq`` is out of order);
    * a truncated last line reports that line.

    Lines removed from the end of the newest file cannot be detected (see the
    module docstring). A missing or empty log verifies, with ``lines=0``.
    """
    with _snapshot(path) as files:
        previous: _VerifiedLine | None = None
        verified = 0
        anchor_note = ""
        for snapshot_file in files:
            for line_number, raw in enumerate(_raw_lines(snapshot_file), start=1):
                location = AuditLocation(snapshot_file.path, line_number)
                problem = _line_problem(raw, location, previous)
                if problem is not None:
                    return AuditVerification(False, verified, location, f"{_describe(location)}: {problem}")
                record = _parse_record(raw)
                assert record is not None  # _line_problem checked it
                if previous is None and record["prev"] != GENESIS_PREV:
                    anchor_note = f"; older files were rotated away, the chain starts at seq {record['seq']}"
                previous = _VerifiedLine(location, raw, int(record["seq"]))
                verified += 1
    return AuditVerification(
        True, verified, None, f"{verified} lines verified in {len(files)} file(s){anchor_note}"
    )


def _line_problem(raw: bytes, location: AuditLocation, previous: _VerifiedLine | None) -> str | None:
    """What is wrong with one line given the line before it, or None."""
    if not raw.endswith(b"\n"):
        return "truncated: the file ends in the middle of this line"
    record = _parse_record(raw)
    if record is None:
        return "not an audit record (invalid JSON, or seq/event/prev missing or malformed)"
    seq: int = record["seq"]
    if previous is None:
        if record["event"] == ROTATION_EVENT:
            return None
        if record["prev"] != GENESIS_PREV or seq != 1:
            return (
                f"the log does not start at its beginning (seq {seq}, prev is not the genesis hash): "
                "earlier lines were removed"
            )
        return None
    expected = previous.seq + 1
    if seq != expected:
        found = f"expected seq {expected} after {_describe(previous.location)}, found seq {seq}"
        if seq > expected:
            missing = seq - expected
            return f"{found}: {missing} line(s) removed before this line, or lines reordered"
        return f"{found}: lines were duplicated or reordered here"
    if record["prev"] != _sha256_hex(previous.raw):
        earlier = _describe(previous.location)
        return f"prev hash does not match {earlier}: {earlier} was changed after it was written"
    return None


def _parse_since(since: datetime.datetime) -> datetime.datetime:
    return since if since.tzinfo is not None else since.replace(tzinfo=datetime.UTC)


def _record_time(record: dict[str, Any]) -> datetime.datetime | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(ts)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def read_audit(
    path: Path,
    *,
    since: datetime.datetime | None = None,
    event: str | None = None,
    device: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records of the log, oldest first across rotated files, optionally filtered.

    ``since`` keeps records at or after that moment (a naive datetime is taken
    as UTC); ``event`` keeps one event name; ``device`` keeps records whose
    ``device`` field equals it. Lines that are not valid JSON objects are
    skipped (use :func:`verify_audit` to find them).
    """
    threshold = _parse_since(since) if since is not None else None
    with _snapshot(path) as files:
        for snapshot_file in files:
            for raw in _raw_lines(snapshot_file):
                try:
                    record = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if event is not None and record.get("event") != event:
                    continue
                if device is not None and record.get("device") != device:
                    continue
                if threshold is not None:
                    moment = _record_time(record)
                    if moment is None or moment < threshold:
                        continue
                yield record
