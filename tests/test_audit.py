"""Tests for the tamper-evident audit log (src/wardgate/audit.py)."""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import remember
from wardgate.audit import (
    GENESIS_PREV,
    ROTATION_EVENT,
    AuditLocation,
    AuditLog,
    AuditVerification,
    read_audit,
    verify_audit,
)

SESSION_TOKEN = (
    "wgs_eyJ2IjogMSwgImtpZCI6ICJrMSIsICJ0eXAiOiAic2Vzc2lvbiIsICJqdGkiOiAiYTFiMmMzZDQifQ"
    ".Zq1hV0y2WJ8o3kYt7c5Ld-9xRb_NfA4sMpE6uGiT2wQ"
)
UPSTREAM_SECRET = "upstream-credential-77aa91"
remember(SESSION_TOKEN, UPSTREAM_SECRET)
ISO_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.log"


def fill(log: AuditLog, count: int, event: str = "auth.success") -> None:
    for number in range(count):
        log.append(event, device=f"dev_{number % 3}", n=number)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def edit_line(path: Path, line_number: int, **changes: Any) -> None:
    """Rewrite one line as valid compact JSON with some fields changed (a careful forger)."""
    lines = lines_of(path)
    record = json.loads(lines[line_number - 1])
    record.update(changes)
    lines[line_number - 1] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    write_lines(path, lines)


def assert_broken_at(result: AuditVerification, path: Path, line_number: int, detail: str) -> None:
    assert not result.ok
    assert result.first_bad == AuditLocation(path, line_number)
    assert result.first_bad == (path, line_number)
    assert detail in result.detail, result.detail


# --- the chain ----------------------------------------------------------------------------------


def test_append_writes_chained_compact_lines(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    first = log.append("pair.approved", device="dev_1", role="operator")
    second = log.append("auth.success", device="dev_1")
    raw = lines_of(audit_path)
    assert [json.loads(line) for line in raw] == [first, second]
    assert list(first) == ["ts", "seq", "event", "device", "role", "prev"]
    assert ISO_MS_UTC.fullmatch(first["ts"])
    assert (first["seq"], first["prev"]) == (1, GENESIS_PREV)
    assert (second["seq"], second["prev"]) == (2, hashlib.sha256(raw[0]).hexdigest())
    assert b", " not in raw[0]
    assert b": " not in raw[0]


def test_clean_log_verifies(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    assert verify_audit(audit_path) == AuditVerification(True, 10, None, "10 lines verified in 1 file(s)")


def test_missing_log_verifies_empty(tmp_path: Path) -> None:
    result = verify_audit(tmp_path / "nothing" / "audit.log")
    assert (result.ok, result.lines, result.first_bad) == (True, 0, None)


def test_a_second_writer_continues_the_chain(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 3)
    assert AuditLog(audit_path).append("cli.revoke")["seq"] == 4
    assert verify_audit(audit_path).ok


def test_reserved_field_names_are_refused(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    with pytest.raises(ValueError, match="prev"):
        log.append("x", prev="0" * 64)
    with pytest.raises(ValueError, match="seq"):
        log.append("x", seq=1)


@pytest.mark.parametrize(("max_bytes", "backups"), [(0, 5), (100, -1)])
def test_invalid_limits_are_refused(audit_path: Path, max_bytes: int, backups: int) -> None:
    with pytest.raises(ValueError, match="audit"):
        AuditLog(audit_path, max_bytes=max_bytes, backups=backups)


def test_long_lines_beyond_the_tail_chunk(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    for number in range(5):
        log.append("agent.run", prompt="p" * 20_000, n=number)
    assert log.append("agent.done")["seq"] == 6
    assert verify_audit(audit_path).ok


# --- tampering ----------------------------------------------------------------------------------


def test_edited_field_is_reported_at_the_next_line(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    edit_line(audit_path, 5, device="dev_attacker")
    result = verify_audit(audit_path)
    assert_broken_at(
        result, audit_path, 6, "line 6 of audit.log: prev hash does not match line 5 of audit.log"
    )
    assert "line 5 of audit.log was changed" in result.detail
    assert result.lines == 5


def test_edit_that_breaks_json_is_reported_at_that_line(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    lines = lines_of(audit_path)
    lines[4] = lines[4].replace(b'"event"', b'"event', 1)
    write_lines(audit_path, lines)
    assert_broken_at(verify_audit(audit_path), audit_path, 5, "not an audit record")


def test_edited_seq_is_reported_at_that_line(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    edit_line(audit_path, 5, seq=50)
    assert_broken_at(verify_audit(audit_path), audit_path, 5, "expected seq 5 after line 4 of audit.log")


def test_edited_prev_is_reported_at_that_line(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    edit_line(audit_path, 5, prev="f" * 64)
    assert_broken_at(verify_audit(audit_path), audit_path, 5, "prev hash does not match line 4")


@pytest.mark.parametrize("deleted", [2, 5, 9])
def test_deleted_line_is_reported_after_the_gap(audit_path: Path, deleted: int) -> None:
    fill(AuditLog(audit_path), 10)
    lines = lines_of(audit_path)
    del lines[deleted - 1]
    write_lines(audit_path, lines)
    assert_broken_at(
        verify_audit(audit_path),
        audit_path,
        deleted,
        f"expected seq {deleted} after line {deleted - 1} of audit.log, found seq {deleted + 1}: "
        "1 line(s) removed before this line",
    )


def test_deleted_first_line_is_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    write_lines(audit_path, lines_of(audit_path)[1:])
    assert_broken_at(verify_audit(audit_path), audit_path, 1, "does not start at its beginning")


def test_swapped_lines_are_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    lines = lines_of(audit_path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(audit_path, lines)
    assert_broken_at(
        verify_audit(audit_path), audit_path, 4, "expected seq 4 after line 3 of audit.log, found seq 5"
    )


def test_duplicated_line_is_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    lines = lines_of(audit_path)
    lines.insert(5, lines[4])
    write_lines(audit_path, lines)
    assert_broken_at(
        verify_audit(audit_path), audit_path, 6, "found seq 5: lines were duplicated or reordered"
    )


def test_truncated_last_line_is_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path), 10)
    data = audit_path.read_bytes()
    audit_path.write_bytes(data[:-15])
    assert_broken_at(verify_audit(audit_path), audit_path, 10, "truncated")


def test_removing_whole_lines_from_the_end_is_not_detectable(audit_path: Path) -> None:
    """The documented limit of an unanchored chain: it looks like a log that stopped earlier."""
    fill(AuditLog(audit_path), 10)
    write_lines(audit_path, lines_of(audit_path)[:7])
    assert verify_audit(audit_path).ok


def test_append_after_a_torn_line_keeps_chaining(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    fill(log, 5)
    audit_path.write_bytes(audit_path.read_bytes()[:-10])  # a crash mid-write
    record = log.append("after.crash")
    lines = lines_of(audit_path)
    assert len(lines) == 6
    assert record["seq"] == 6  # the torn line keeps its number
    assert record["prev"] == hashlib.sha256(lines[4]).hexdigest()
    assert json.loads(lines[5]) == record
    assert_broken_at(verify_audit(audit_path), audit_path, 5, "not an audit record")
    assert [r["event"] for r in read_audit(audit_path)][-1] == "after.crash"


# --- rotation -----------------------------------------------------------------------------------


def rotated(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def test_rotation_keeps_one_chain_across_files(audit_path: Path) -> None:
    log = AuditLog(audit_path, max_bytes=1500, backups=10)
    fill(log, 60)
    files = [rotated(audit_path, n) for n in range(10, 0, -1) if rotated(audit_path, n).exists()]
    files.append(audit_path)
    assert len(files) >= 4
    assert all(path.stat().st_size <= 1500 for path in files)
    result = verify_audit(audit_path)
    assert result.ok, result.detail
    records = list(read_audit(audit_path))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert [r["n"] for r in records if r["event"] != ROTATION_EVENT] == list(range(60))
    assert result.lines == len(records)
    for older, newer in itertools.pairwise(files):
        first = json.loads(lines_of(newer)[0])
        assert first["event"] == ROTATION_EVENT
        assert first["prev"] == hashlib.sha256(lines_of(older)[-1]).hexdigest()


def test_rotation_drops_the_oldest_and_anchors_on_the_rest(audit_path: Path) -> None:
    log = AuditLog(audit_path, max_bytes=800, backups=2)
    fill(log, 60)
    assert rotated(audit_path, 2).exists()
    assert not rotated(audit_path, 3).exists()
    result = verify_audit(audit_path)
    assert result.ok, result.detail
    assert "rotated away" in result.detail
    assert next(read_audit(audit_path))["event"] == ROTATION_EVENT


def test_rotation_with_no_backups(audit_path: Path) -> None:
    log = AuditLog(audit_path, max_bytes=600, backups=0)
    fill(log, 30)
    assert not rotated(audit_path, 1).exists()
    assert verify_audit(audit_path).ok


def test_fewer_backups_than_before_drop_the_extra_files(audit_path: Path) -> None:
    fill(AuditLog(audit_path, max_bytes=600, backups=6), 60)
    assert rotated(audit_path, 6).exists()
    fill(AuditLog(audit_path, max_bytes=600, backups=3), 10)
    assert not rotated(audit_path, 4).exists()
    assert verify_audit(audit_path).ok


def test_tampering_in_a_rotated_file_is_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path, max_bytes=1500, backups=10), 60)
    victim = rotated(audit_path, 2)
    edit_line(victim, 3, device="dev_attacker")
    assert_broken_at(
        verify_audit(audit_path), victim, 4, "line 4 of audit.log.2: prev hash does not match line 3"
    )


def test_a_missing_rotated_file_is_detected(audit_path: Path) -> None:
    fill(AuditLog(audit_path, max_bytes=1500, backups=10), 60)
    rotated(audit_path, 2).unlink()
    assert_broken_at(verify_audit(audit_path), rotated(audit_path, 1), 1, "of audit.log.3, found seq")


def test_the_first_file_must_start_the_chain(audit_path: Path) -> None:
    fill(AuditLog(audit_path, max_bytes=1500, backups=10), 60)
    oldest = max(int(p.suffix[1:]) for p in audit_path.parent.glob("audit.log.[0-9]*"))
    write_lines(rotated(audit_path, oldest), lines_of(rotated(audit_path, oldest))[2:])
    assert_broken_at(verify_audit(audit_path), rotated(audit_path, oldest), 1, "does not start")


# --- concurrency --------------------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from wardgate.audit import AuditLog

path, writer, max_bytes, ready, go = sys.argv[1:]
log = AuditLog(Path(path), max_bytes=int(max_bytes), backups=1000)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
for n in range(200):
    log.append("test.concurrent", writer=writer, n=n)
"""


@pytest.mark.parametrize("max_bytes", [10 * 1024 * 1024, 8 * 1024], ids=["one-file", "rotating"])
def test_two_processes_append_concurrently(audit_path: Path, tmp_path: Path, max_bytes: int) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), *sys.path])}
    writers = []
    for name in ("a", "b"):
        ready = tmp_path / f"ready-{name}"
        command = [sys.executable, "-c", WRITER, str(audit_path), name, str(max_bytes), str(ready), str(go)]
        writers.append((subprocess.Popen(command, env=env), ready))
    deadline = time.monotonic() + 30
    while not all(ready.exists() for _, ready in writers) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for process, _ in writers:
        assert process.wait(timeout=60) == 0
    result = verify_audit(audit_path)
    assert result.ok, result.detail
    records = list(read_audit(audit_path))
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    events = [r for r in records if r["event"] == "test.concurrent"]
    for name in ("a", "b"):
        assert [r["n"] for r in events if r["writer"] == name] == list(range(200))


def test_threads_share_one_log(audit_path: Path) -> None:
    shared = AuditLog(audit_path, max_bytes=4096, backups=1000)

    def write(log: AuditLog, name: str) -> None:
        for n in range(50):
            log.append("test.thread", writer=name, n=n)

    threads = [threading.Thread(target=write, args=(shared, f"shared{i}")) for i in range(3)]
    threads += [
        threading.Thread(target=write, args=(AuditLog(audit_path, max_bytes=4096, backups=1000), f"own{i}"))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify_audit(audit_path).ok
    assert sum(r["event"] == "test.thread" for r in read_audit(audit_path)) == 250


# --- files and secrets --------------------------------------------------------------------------


def test_file_and_directory_modes(audit_path: Path) -> None:
    log = AuditLog(audit_path, max_bytes=600, backups=3)
    assert stat.S_IMODE(audit_path.parent.stat().st_mode) == 0o700
    fill(log, 20)
    for path in audit_path.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_existing_file_with_loose_mode_is_tightened(audit_path: Path) -> None:
    audit_path.parent.mkdir()
    audit_path.touch(mode=0o644)
    os.chmod(audit_path, 0o644)
    AuditLog(audit_path)
    assert stat.S_IMODE(audit_path.stat().st_mode) == 0o600


def test_tokens_and_secrets_never_reach_the_file(audit_path: Path) -> None:
    log = AuditLog(audit_path, secrets=[UPSTREAM_SECRET])
    record = log.append(
        "auth.failure",
        token=SESSION_TOKEN,
        reason=f"bad token {SESSION_TOKEN}",
        url=f"/ws?token={SESSION_TOKEN}&x=1",
        headers={"Authorization": f"Bearer {UPSTREAM_SECRET}", "Origin": "https://a"},
        upstream=f"calling with {UPSTREAM_SECRET}",
        when=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
    )
    late_secret = "registered-later-secret"
    assert log.add_secret(late_secret)
    log.append("proxy.error", detail=f"upstream said {late_secret}")
    text = audit_path.read_text()
    for secret in (SESSION_TOKEN[4:40], SESSION_TOKEN[-20:], UPSTREAM_SECRET, late_secret):
        assert secret not in text
    assert record["token"] == "wgs_[REDACTED]"
    assert record["reason"] == "bad token wgs_[REDACTED]"
    assert record["url"] == "/ws?token=[REDACTED]&x=1"
    assert record["headers"] == {"Authorization": "[REDACTED]", "Origin": "https://a"}
    assert record["when"] == "2025-01-01 00:00:00+00:00"


# --- reading ------------------------------------------------------------------------------------


def test_read_audit_filters(audit_path: Path) -> None:
    log = AuditLog(audit_path)
    log.append("auth.success", device="dev_1")
    log.append("auth.failure", device="dev_2")
    middle = datetime.datetime.now(datetime.UTC)
    time.sleep(0.01)
    log.append("auth.success", device="dev_2")
    with audit_path.open("ab") as handle:
        handle.write(b"not json\n[1, 2]\n")
    assert [r["seq"] for r in read_audit(audit_path)] == [1, 2, 3]
    assert [r["seq"] for r in read_audit(audit_path, event="auth.success")] == [1, 3]
    assert [r["seq"] for r in read_audit(audit_path, device="dev_2")] == [2, 3]
    assert [r["seq"] for r in read_audit(audit_path, since=middle)] == [3]
    naive_utc = middle.replace(tzinfo=None)
    assert [r["seq"] for r in read_audit(audit_path, since=naive_utc, device="dev_2")] == [3]


def test_read_audit_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    assert list(read_audit(tmp_path / "audit.log")) == []
