"""The SQLite store on a real file: atomic redemption, rotation, reuse detection, revocation."""

from __future__ import annotations

import asyncio
import multiprocessing
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from wardgate.store.base import (
    Device,
    Family,
    NewRefresh,
    RedeemOutcome,
    RotateOutcome,
    token_hash,
)
from wardgate.store.sqlite import SqliteStore

NOW = 1_800_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "wardgate.db")
    await s.open()
    yield s
    await s.close()


def device(i: int = 1) -> Device:
    return Device(id=f"dev_{i}", name=f"phone {i}", role="operator", created_at=NOW)


async def pair(store: SqliteStore, i: int = 1, *, jti: str | None = None, gen: int = 0) -> RedeemOutcome:
    return await store.redeem_pairing(
        jti=jti or f"jti_{i}",
        generation=gen,
        nonce_expires_at=NOW + 3600,
        device=device(i),
        family=Family(id=f"fam_{i}", device_id=f"dev_{i}", created_at=NOW, expires_at=NOW + 86400),
        refresh=NewRefresh(token_hash(f"refresh_{i}_0"), f"fam_{i}", NOW + 86400),
    )


async def test_file_is_private_and_in_wal_mode(store: SqliteStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_pairing_nonce_is_single_use(store: SqliteStore) -> None:
    assert await pair(store, 1) is RedeemOutcome.REDEEMED
    assert await store.nonce_consumed("jti_1")
    again = await store.redeem_pairing(
        jti="jti_1",
        generation=0,
        nonce_expires_at=NOW + 3600,
        device=device(2),
        family=Family(id="fam_2", device_id="dev_2", created_at=NOW, expires_at=NOW + 86400),
        refresh=NewRefresh(token_hash("r2"), "fam_2", NOW + 86400),
    )
    assert again is RedeemOutcome.ALREADY_USED
    assert [d.id for d in await store.list_devices()] == ["dev_1"]  # nothing half-written


async def test_stale_generation_is_refused(store: SqliteStore) -> None:
    assert await store.bump_pairing_generation() == 1
    assert await pair(store, 1, gen=0) is RedeemOutcome.STALE_GENERATION
    assert not await store.nonce_consumed("jti_1")
    assert await pair(store, 1, gen=1) is RedeemOutcome.REDEEMED


async def test_refresh_rotation_and_reuse_detection(store: SqliteStore) -> None:
    await pair(store, 1)
    first = token_hash("refresh_1_0")
    second = NewRefresh(token_hash("refresh_1_1"), "fam_1", NOW + 90000)
    rotated = await store.rotate_refresh(first, second, now=NOW + 1)
    assert rotated.outcome is RotateOutcome.ROTATED
    assert rotated.device_id == "dev_1"
    revision = await store.revision()
    # The first token comes back: a stolen copy. The device is revoked.
    reused = await store.rotate_refresh(first, NewRefresh(token_hash("x"), "fam_1", NOW + 90000), now=NOW + 2)
    assert reused.outcome is RotateOutcome.REUSED
    assert await store.revision() > revision
    dev = await store.get_device("dev_1")
    assert dev is not None
    assert dev.revoked_at == NOW + 2
    # And the legitimate latest token is dead too.
    after = await store.rotate_refresh(
        second.token_hash, NewRefresh(token_hash("y"), "fam_1", NOW), now=NOW + 3
    )
    assert after.outcome is RotateOutcome.REVOKED
    revoked = await store.revocations(NOW + 3)
    assert "dev_1" in revoked.devices
    assert "fam_1" in revoked.families


async def test_unknown_and_expired_refresh(store: SqliteStore) -> None:
    await pair(store, 1)
    new = NewRefresh(token_hash("n"), "fam_1", NOW + 10)
    assert (await store.rotate_refresh(token_hash("nope"), new, now=NOW)).outcome is RotateOutcome.UNKNOWN
    late = NOW + 86400
    assert (
        await store.rotate_refresh(token_hash("refresh_1_0"), new, now=late)
    ).outcome is RotateOutcome.UNKNOWN


async def test_revoke_device_family_token_and_all(store: SqliteStore) -> None:
    await pair(store, 1)
    await pair(store, 2)
    assert await store.revoke_family("fam_2", now=NOW)
    assert not await store.revoke_family("fam_2", now=NOW)
    assert [f.id for f in await store.list_families()] == ["fam_1"]
    await store.revoke_token("jti_session", expires_at=NOW + 60)
    snap = await store.revocations(NOW)
    assert snap.session_revoked(device="dev_9", family=None, jti="jti_session", iat=NOW)
    assert snap.session_revoked(device="dev_2", family="fam_2", jti="x", iat=NOW)
    assert not snap.session_revoked(device="dev_1", family="fam_1", jti="x", iat=NOW)
    assert await store.revoke_all(now=NOW + 5) == 1
    snap = await store.revocations(NOW + 5)
    assert snap.session_revoked(device="dev_1", family="fam_1", jti="x", iat=NOW)
    assert await store.pairing_generation() == 1
    assert not await store.revoke_device("dev_unknown", now=NOW)


async def test_prune_drops_only_expired(store: SqliteStore) -> None:
    await pair(store, 1)
    await store.revoke_token("old", expires_at=NOW - 1)
    await store.revoke_token("live", expires_at=NOW + 60)
    await store.prune(now=NOW)
    assert (await store.revocations(NOW)).tokens == frozenset({"live"})
    assert await store.nonce_consumed("jti_1")


async def test_data_survives_reopen(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "db")
    await s.open()
    await pair(s, 1)
    await s.close()
    s2 = SqliteStore(tmp_path / "db")
    await s2.open()
    assert [d.name for d in await s2.list_devices()] == ["phone 1"]
    await s2.close()


def _redeem_in_process(path: str, barrier: Any, results: Any, i: int) -> None:
    async def go() -> str:
        s = SqliteStore(Path(path))
        await s.open()
        barrier.wait()
        outcome = await s.redeem_pairing(
            jti="shared",
            generation=0,
            nonce_expires_at=NOW + 3600,
            device=device(i),
            family=Family(id=f"fam_{i}", device_id=f"dev_{i}", created_at=NOW, expires_at=NOW + 86400),
            refresh=NewRefresh(token_hash(f"r{i}"), f"fam_{i}", NOW + 86400),
        )
        await s.close()
        return outcome.value

    results.put(asyncio.run(go()))


def test_concurrent_redemption_across_processes_has_one_winner(tmp_path: Path) -> None:
    path = tmp_path / "db"
    asyncio.run(_init(path))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_redeem_in_process, args=(str(path), barrier, queue, i)) for i in range(4)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == ["already_used"] * 3 + ["redeemed"]


async def _init(path: Path) -> None:
    s = SqliteStore(path)
    await s.open()
    await s.close()
