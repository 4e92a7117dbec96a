"""What only the SQLite store has: a private WAL file shared by processes.

The behaviour every backend shares is in ``test_contract.py``."""

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
    token_hash,
)
from wardgate.store.sqlite import SqliteStore

NOW = 1_800_000_000.0


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
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


async def test_file_is_private_and_in_wal_mode(sqlite_store: SqliteStore) -> None:
    assert stat.S_IMODE(sqlite_store.path.stat().st_mode) == 0o600
    assert sqlite_store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


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
