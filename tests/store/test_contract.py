"""The Store contract, run against every backend (``store`` is parametrized: sqlite, redis).

SQLite is the reference behaviour; a backend passes when these hold for it too. The last
test drives both backends with the same random operation sequences and compares every
answer, so a difference the hand-written cases miss still shows up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

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
    Store,
    token_hash,
)
from wardgate.store.redis import RedisStore
from wardgate.store.sqlite import SqliteStore

NOW = 1_800_000_000.0
DAY = 86400.0


def device(i: int = 1, *, created_at: float = NOW) -> Device:
    return Device(id=f"dev_{i}", name=f"phone {i}", role="operator", created_at=created_at)


async def pair(
    store: Store, i: int = 1, *, jti: str | None = None, gen: int = 0, created_at: float = NOW
) -> RedeemOutcome:
    return await store.redeem_pairing(
        jti=jti or f"jti_{i}",
        generation=gen,
        nonce_expires_at=NOW + 3600,
        device=device(i, created_at=created_at),
        family=Family(id=f"fam_{i}", device_id=f"dev_{i}", created_at=created_at, expires_at=NOW + DAY),
        refresh=NewRefresh(token_hash(f"refresh_{i}_0"), f"fam_{i}", NOW + DAY),
    )


def api_key(i: int = 1, *, created_at: float = NOW, expires_at: float | None = None) -> ApiKey:
    return ApiKey(id=f"key_{i}", name=f"ci {i}", role="viewer", created_at=created_at, expires_at=expires_at)


def cookie(
    i: int = 1, *, key: str | None = None, dev: str | None = None, max_at: float = NOW + DAY
) -> CookieSession:
    return CookieSession(
        id=f"cs_{i}",
        role="operator",
        created_at=NOW,
        expires_at=NOW + 3600,
        max_expires_at=max_at,
        device_id=dev,
        family_id=None,
        api_key_id=key,
    )


# --- empty store ---------------------------------------------------------------------------------


async def test_an_empty_store(store: Store) -> None:
    assert await store.revision() == 0
    assert await store.pairing_generation() == 0
    assert await store.revocations(NOW) == Revocations(revision=0)
    assert await store.list_devices() == []
    assert await store.list_families(include_revoked=True) == []
    assert await store.list_api_keys(include_revoked=True) == []
    assert await store.list_agent_sessions(limit=10) == []
    assert await store.get_device("dev_1") is None
    assert await store.api_key_by_hash(token_hash("x")) is None
    assert await store.cookie_session_by_hash(token_hash("x")) is None
    assert await store.get_agent_session("s") is None
    assert await store.agent_output("s", after_seq=0, limit=10) == []
    assert not await store.nonce_consumed("jti")


# --- pairing ---------------------------------------------------------------------------------------


async def test_pairing_nonce_is_single_use(store: Store) -> None:
    assert await pair(store, 1) is RedeemOutcome.REDEEMED
    assert await store.nonce_consumed("jti_1")
    assert await pair(store, 2, jti="jti_1") is RedeemOutcome.ALREADY_USED
    assert [d.id for d in await store.list_devices()] == ["dev_1"]  # nothing half-written
    assert [f.id for f in await store.list_families()] == ["fam_1"]
    unknown = await store.rotate_refresh(token_hash("refresh_2_0"), NewRefresh("h", "fam_2", NOW), now=NOW)
    assert unknown.outcome is RotateOutcome.UNKNOWN


async def test_stale_generation_is_refused(store: Store) -> None:
    assert await store.bump_pairing_generation() == 1
    assert await store.bump_pairing_generation() == 2
    assert await store.pairing_generation() == 2
    assert await pair(store, 1, gen=1) is RedeemOutcome.STALE_GENERATION
    assert not await store.nonce_consumed("jti_1")
    assert await store.list_devices() == []
    assert await pair(store, 1, gen=2) is RedeemOutcome.REDEEMED
    assert await store.revision() == 0  # pairing does not invalidate connections


async def test_redeem_registers_device_family_and_refresh(store: Store) -> None:
    dev = Device(
        id="dev_x",
        name="Zoë's phone ☎",
        role="admin",
        created_at=NOW + 0.123456789,
        client_info='{"name": "app", "deviceId": "abc"}',
    )
    fam = Family(id="fam_x", device_id="dev_x", created_at=NOW + 0.123456789, expires_at=NOW + 30 * DAY)
    outcome = await store.redeem_pairing(
        jti="j",
        generation=0,
        nonce_expires_at=NOW + 60,
        device=dev,
        family=fam,
        refresh=NewRefresh(token_hash("r0"), "fam_x", NOW + 30 * DAY),
    )
    assert outcome is RedeemOutcome.REDEEMED
    assert await store.get_device("dev_x") == dev
    assert await store.list_devices() == [dev]
    assert await store.list_families() == [fam]
    rotated = await store.rotate_refresh(
        token_hash("r0"), NewRefresh(token_hash("r1"), "", NOW + 31 * DAY), now=NOW
    )
    assert (rotated.outcome, rotated.device_id, rotated.family_id) == (
        RotateOutcome.ROTATED,
        "dev_x",
        "fam_x",
    )


# --- devices -----------------------------------------------------------------------------------------


async def test_devices_are_listed_by_creation_then_insertion(store: Store) -> None:
    await pair(store, 3, created_at=NOW + 5)
    await pair(store, 10, created_at=NOW)
    await pair(store, 2, created_at=NOW)
    await pair(store, 1, created_at=NOW + 1)
    assert [d.id for d in await store.list_devices()] == ["dev_10", "dev_2", "dev_1", "dev_3"]
    assert [f.id for f in await store.list_families()] == ["fam_10", "fam_2", "fam_1", "fam_3"]


async def test_touch_device_records_last_seen_and_address(store: Store) -> None:
    await pair(store, 1)
    await store.touch_device("dev_1", ip="192.0.2.7", now=NOW + 10)
    dev = await store.get_device("dev_1")
    assert dev is not None
    assert (dev.last_seen, dev.last_ip) == (NOW + 10, "192.0.2.7")
    await store.touch_device("dev_1", ip=None, now=NOW + 20)
    dev = await store.get_device("dev_1")
    assert dev is not None
    assert (dev.last_seen, dev.last_ip) == (NOW + 20, None)
    await store.touch_device("dev_unknown", ip="192.0.2.8", now=NOW)
    assert await store.get_device("dev_unknown") is None
    assert [d.id for d in await store.list_devices()] == ["dev_1"]
    assert await store.revision() == 0


async def test_revoke_device_revokes_its_families_and_bumps_revision(store: Store) -> None:
    await pair(store, 1)
    await pair(store, 2)
    assert await store.revoke_device("dev_1", now=NOW + 5)
    assert await store.revision() == 1
    dev = await store.get_device("dev_1")
    assert dev is not None
    assert dev.revoked_at == NOW + 5
    families = {f.id: f for f in await store.list_families(include_revoked=True)}
    assert families["fam_1"].revoked_at == NOW + 5
    assert families["fam_2"].revoked_at is None
    assert [f.id for f in await store.list_families()] == ["fam_2"]
    # Already revoked, or unknown: False, but the revision still moves (as SQLite does).
    assert not await store.revoke_device("dev_1", now=NOW + 6)
    assert not await store.revoke_device("dev_unknown", now=NOW + 6)
    assert await store.revision() == 3
    dev = await store.get_device("dev_1")
    assert dev is not None
    assert dev.revoked_at == NOW + 5
    snap = await store.revocations(NOW + 6)
    assert snap.devices == {"dev_1"}
    assert snap.families == {"fam_1"}
    refused = await store.rotate_refresh(
        token_hash("refresh_1_0"), NewRefresh("n", "fam_1", NOW), now=NOW + 7
    )
    assert (refused.outcome, refused.device_id, refused.family_id) == (
        RotateOutcome.REVOKED,
        "dev_1",
        "fam_1",
    )


# --- refresh tokens ----------------------------------------------------------------------------------


async def test_refresh_rotation_and_reuse_detection(store: Store) -> None:
    await pair(store, 1)
    first = token_hash("refresh_1_0")
    second = NewRefresh(token_hash("refresh_1_1"), "fam_1", NOW + 90000)
    rotated = await store.rotate_refresh(first, second, now=NOW + 1)
    assert rotated.outcome is RotateOutcome.ROTATED
    assert rotated.device_id == "dev_1"
    fam = (await store.list_families())[0]
    assert (fam.last_used_at, fam.expires_at) == (NOW + 1, NOW + 90000)
    revision = await store.revision()
    # The first token comes back: a stolen copy. The device is revoked.
    reused = await store.rotate_refresh(first, NewRefresh(token_hash("x"), "fam_1", NOW + 90000), now=NOW + 2)
    assert (reused.outcome, reused.device_id, reused.family_id) == (RotateOutcome.REUSED, "dev_1", "fam_1")
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
    # The reused token, presented again, is refused as revoked (no second revocation).
    again = await store.rotate_refresh(first, NewRefresh(token_hash("z"), "fam_1", NOW), now=NOW + 4)
    assert again.outcome is RotateOutcome.REVOKED


async def test_unknown_and_expired_refresh(store: Store) -> None:
    await pair(store, 1)
    new = NewRefresh(token_hash("n"), "fam_1", NOW + 10)
    assert (await store.rotate_refresh(token_hash("nope"), new, now=NOW)).outcome is RotateOutcome.UNKNOWN
    late = await store.rotate_refresh(token_hash("refresh_1_0"), new, now=NOW + DAY)
    assert (late.outcome, late.device_id, late.family_id) == (RotateOutcome.UNKNOWN, "dev_1", "fam_1")
    # An expired token rotates nothing and revokes nothing.
    assert (await store.rotate_refresh(token_hash("n"), new, now=NOW)).outcome is RotateOutcome.UNKNOWN
    assert await store.revision() == 0


# --- revocation ----------------------------------------------------------------------------------------


async def test_revoke_family_token_and_all(store: Store) -> None:
    await pair(store, 1)
    await pair(store, 2)
    assert await store.revoke_family("fam_2", now=NOW)
    assert not await store.revoke_family("fam_2", now=NOW)
    assert not await store.revoke_family("fam_unknown", now=NOW)
    assert await store.revision() == 3
    assert [f.id for f in await store.list_families()] == ["fam_1"]
    await store.revoke_token("jti_session", expires_at=NOW + 60)
    snap = await store.revocations(NOW)
    assert snap.session_revoked(device="dev_9", family=None, jti="jti_session", iat=NOW)
    assert snap.session_revoked(device="dev_2", family="fam_2", jti="x", iat=NOW)
    assert not snap.session_revoked(device="dev_1", family="fam_1", jti="x", iat=NOW)
    assert await store.revoke_all(now=NOW + 5.75) == 1
    snap = await store.revocations(NOW + 5)
    assert snap.not_before == NOW + 5  # whole seconds, like the tokens' iat
    assert snap.families == {"fam_1", "fam_2"}
    assert snap.devices == frozenset()  # revoke-all ends sessions and families, not devices
    assert snap.session_revoked(device="dev_1", family="fam_1", jti="x", iat=NOW)
    assert not snap.session_revoked(device="dev_1", family=None, jti="x", iat=NOW + 5)
    assert await store.pairing_generation() == 1
    assert await store.revoke_all(now=NOW + 6) == 0
    assert await store.pairing_generation() == 2
    assert not await store.revoke_device("dev_unknown", now=NOW)


async def test_revocation_snapshot_contents(store: Store) -> None:
    await pair(store, 1)
    await pair(store, 2)
    await pair(store, 3)
    await store.revoke_device("dev_1", now=NOW)
    await store.revoke_family("fam_2", now=NOW)
    await store.revoke_token("jti_live", expires_at=NOW + 60)
    await store.revoke_token("jti_gone", expires_at=NOW - 1)
    await store.revoke_token("jti_live", expires_at=NOW + 120)  # replaces the expiry
    await store.create_api_key(api_key(1), key_hash=token_hash("k1"))
    await store.create_api_key(api_key(2, expires_at=NOW + 10), key_hash=token_hash("k2"))
    await store.create_api_key(api_key(3), key_hash=token_hash("k3"))
    await store.revoke_api_key("key_3", now=NOW)
    await store.create_cookie_session(cookie(1), session_hash=token_hash("c1"))
    await store.create_cookie_session(cookie(2, max_at=NOW + 100), session_hash=token_hash("c2"))
    await store.revoke_cookie_session("cs_2", now=NOW)
    await store.revoke_cookie_session("cs_1", now=NOW)
    snap = await store.revocations(NOW)
    assert snap == Revocations(
        revision=await store.revision(),
        devices=frozenset({"dev_1"}),
        families=frozenset({"fam_1", "fam_2"}),
        tokens=frozenset({"jti_live"}),
        not_before=0.0,
        api_keys=frozenset({"key_3"}),
        cookies=frozenset({"cs_1", "cs_2"}),
    )
    later = await store.revocations(NOW + 100)
    assert later.tokens == {"jti_live"}
    assert later.api_keys == {"key_2", "key_3"}  # expired keys count as revoked
    assert later.cookies == {"cs_1"}  # a cookie past its hard expiry no longer needs listing
    assert (await store.revocations(NOW + 120)).tokens == frozenset()
    assert (await store.revocations(NOW + DAY)).families == frozenset()  # families expired too
    assert (await store.revocations(NOW + DAY)).devices == {"dev_1"}  # devices stay revoked


async def test_revision_moves_with_every_revocation(store: Store) -> None:
    await pair(store, 1)
    await store.create_api_key(api_key(1), key_hash=token_hash("k1"))
    await store.create_cookie_session(cookie(1), session_hash=token_hash("c1"))
    steps: list[Callable[[], Awaitable[object]]] = [
        lambda: store.revoke_token("j", expires_at=NOW + 60),
        lambda: store.revoke_family("fam_1", now=NOW),
        lambda: store.revoke_device("dev_1", now=NOW),
        lambda: store.revoke_cookie_session("cs_1", now=NOW),
        lambda: store.revoke_cookie_session("cs_1", now=NOW),
        lambda: store.revoke_api_key("key_1", now=NOW),
        lambda: store.revoke_api_key("key_unknown", now=NOW),
        lambda: store.revoke_all(now=NOW),
    ]
    for expected, step in enumerate(steps, start=1):
        await step()
        assert await store.revision() == expected
        assert (await store.revocations(NOW)).revision == expected


# --- API keys ----------------------------------------------------------------------------------------


async def test_api_keys_are_kept_by_hash_and_listed_in_order(store: Store) -> None:
    keys = [
        ApiKey("key_b", "b", "operator", NOW + 1, expires_at=NOW + DAY),
        ApiKey("key_c", "c", "viewer", NOW),
        ApiKey("key_a", "a", "admin", NOW + 1),
    ]
    for key in keys:
        await store.create_api_key(key, key_hash=token_hash(key.id))
    assert await store.api_key_by_hash(token_hash("key_b")) == keys[0]
    assert await store.api_key_by_hash(token_hash("key_unknown")) is None
    assert [k.id for k in await store.list_api_keys()] == ["key_c", "key_a", "key_b"]
    await store.touch_api_key("key_a", now=NOW + 50)
    await store.touch_api_key("key_unknown", now=NOW + 50)
    touched = await store.api_key_by_hash(token_hash("key_a"))
    assert touched is not None
    assert touched.last_used_at == NOW + 50
    assert await store.revision() == 0
    assert await store.revoke_api_key("key_a", now=NOW + 60)
    assert not await store.revoke_api_key("key_a", now=NOW + 61)
    assert not await store.revoke_api_key("key_unknown", now=NOW + 61)
    assert [k.id for k in await store.list_api_keys()] == ["key_c", "key_b"]
    listed = await store.list_api_keys(include_revoked=True)
    assert [k.id for k in listed] == ["key_c", "key_a", "key_b"]
    assert listed[1].revoked_at == NOW + 60
    revoked = await store.api_key_by_hash(token_hash("key_a"))  # still found: the caller decides
    assert revoked is not None
    assert not revoked.usable(NOW)
    await store.touch_api_key("key_a", now=NOW + 70)  # use of a revoked key is still recorded
    assert (await store.list_api_keys(include_revoked=True))[1].last_used_at == NOW + 70


async def test_revoking_an_api_key_revokes_its_cookie_sessions(store: Store) -> None:
    await store.create_api_key(api_key(1), key_hash=token_hash("k1"))
    await store.create_api_key(api_key(2), key_hash=token_hash("k2"))
    await store.create_cookie_session(cookie(1, key="key_1"), session_hash=token_hash("c1"))
    await store.create_cookie_session(cookie(2, key="key_1"), session_hash=token_hash("c2"))
    await store.create_cookie_session(cookie(3, key="key_2"), session_hash=token_hash("c3"))
    await store.create_cookie_session(cookie(4, dev="dev_1"), session_hash=token_hash("c4"))
    await store.revoke_cookie_session("cs_2", now=NOW)
    assert await store.revoke_api_key("key_1", now=NOW + 5)
    revoked_at = []
    for name in ("c1", "c2", "c3", "c4"):
        found = await store.cookie_session_by_hash(token_hash(name))
        assert found is not None
        revoked_at.append(found.revoked_at)
    assert revoked_at == [NOW + 5, NOW, None, None]
    snap = await store.revocations(NOW + 5)
    assert snap.api_keys == {"key_1"}
    assert snap.cookies == {"cs_1", "cs_2"}


# --- cookie sessions -------------------------------------------------------------------------------------


async def test_cookie_sessions_round_trip_and_slide(store: Store) -> None:
    session = CookieSession(
        id="cs_1",
        role="operator",
        created_at=NOW,
        expires_at=NOW + 3600,
        max_expires_at=NOW + 7200,
        device_id="dev_1",
        family_id="fam_1",
        api_key_id=None,
    )
    await store.create_cookie_session(session, session_hash=token_hash("c1"))
    assert await store.cookie_session_by_hash(token_hash("c1")) == session
    assert await store.cookie_session_by_hash(token_hash("c2")) is None

    async def expires() -> float:
        found = await store.cookie_session_by_hash(token_hash("c1"))
        assert found is not None
        return found.expires_at

    await store.extend_cookie_session("cs_1", expires_at=NOW + 4000)
    assert await expires() == NOW + 4000
    await store.extend_cookie_session("cs_1", expires_at=NOW + 3000)  # never backwards
    assert await expires() == NOW + 4000
    await store.extend_cookie_session("cs_1", expires_at=NOW + 9999)  # never past the cap
    assert await expires() == NOW + 7200
    await store.extend_cookie_session("cs_unknown", expires_at=NOW + 9999)
    assert await store.revision() == 0
    assert await store.revoke_cookie_session("cs_1", now=NOW + 1)
    assert not await store.revoke_cookie_session("cs_1", now=NOW + 2)
    assert not await store.revoke_cookie_session("cs_unknown", now=NOW + 2)
    assert await store.revision() == 3
    revoked = await store.cookie_session_by_hash(token_hash("c1"))
    assert revoked is not None
    assert revoked.revoked_at == NOW + 1
    assert not revoked.usable(NOW + 2)


async def test_a_revoked_cookie_session_does_not_slide(store: Store) -> None:
    await store.create_cookie_session(cookie(1), session_hash=token_hash("c1"))
    await store.revoke_cookie_session("cs_1", now=NOW)
    await store.extend_cookie_session("cs_1", expires_at=NOW + 5000)
    found = await store.cookie_session_by_hash(token_hash("c1"))
    assert found is not None
    assert found.expires_at == NOW + 3600


# --- prune -------------------------------------------------------------------------------------------------


async def test_prune_drops_only_expired(store: Store) -> None:
    await pair(store, 1)
    await store.redeem_pairing(
        jti="jti_short",
        generation=0,
        nonce_expires_at=NOW - 1,
        device=device(2),
        family=Family(id="fam_2", device_id="dev_2", created_at=NOW, expires_at=NOW + DAY),
        refresh=NewRefresh(token_hash("short_refresh"), "fam_2", NOW - 1),
    )
    await store.revoke_token("old", expires_at=NOW - 1)
    await store.revoke_token("live", expires_at=NOW + 60)
    await store.create_cookie_session(cookie(1, max_at=NOW), session_hash=token_hash("c1"))
    await store.create_cookie_session(cookie(2, max_at=NOW + 1), session_hash=token_hash("c2"))
    await store.revoke_cookie_session("cs_1", now=NOW - 10)
    await store.create_api_key(api_key(1, expires_at=NOW - 5), key_hash=token_hash("k1"))
    await store.prune(now=NOW)
    assert (await store.revocations(NOW - 100)).tokens == frozenset({"live"})
    assert await store.nonce_consumed("jti_1")
    assert not await store.nonce_consumed("jti_short")
    assert await store.cookie_session_by_hash(token_hash("c1")) is None
    assert await store.cookie_session_by_hash(token_hash("c2")) is not None
    assert (await store.revocations(NOW - 100)).cookies == frozenset()
    # Pruned refresh tokens are unknown; the live one still rotates.
    gone = await store.rotate_refresh(token_hash("short_refresh"), NewRefresh("a", "", NOW + 9), now=NOW - 50)
    assert gone.outcome is RotateOutcome.UNKNOWN
    live = await store.rotate_refresh(
        token_hash("refresh_1_0"), NewRefresh(token_hash("b"), "", NOW + 9), now=NOW
    )
    assert live.outcome is RotateOutcome.ROTATED
    # Devices, families and API keys are never pruned.
    assert len(await store.list_devices()) == 2
    assert len(await store.list_families()) == 2
    assert [k.id for k in await store.list_api_keys()] == ["key_1"]


# --- agent sessions --------------------------------------------------------------------------------------


def run(i: str, started: float, **changes: Any) -> AgentSessionRecord:
    base = AgentSessionRecord(
        id=i, agent_type="claude", status="running", started_at=started, command="claude"
    )
    return dataclasses.replace(base, **changes)


async def test_agent_session_upsert(store: Store) -> None:
    first = run("s1", NOW, device_id="dev_1", prompt="fix it", last_seq=5)
    await store.save_agent_session(first)
    assert await store.get_agent_session("s1") == first
    update = run(
        "s1", NOW + 99, agent_type="codex", status="exited", ended_at=NOW + 9, exit_code=0, last_seq=3
    )
    await store.save_agent_session(update)
    # agent_type and started_at are kept from the first save; last_seq never goes back;
    # everything else (including None) is replaced.
    assert await store.get_agent_session("s1") == dataclasses.replace(
        update, agent_type="claude", started_at=NOW, last_seq=5
    )
    await store.save_agent_session(dataclasses.replace(update, last_seq=8, exit_code=-9))
    saved = await store.get_agent_session("s1")
    assert saved is not None
    assert (saved.last_seq, saved.exit_code) == (8, -9)


async def test_agent_sessions_newest_first_and_pruned(store: Store) -> None:
    for i, started in [("b", NOW), ("a", NOW), ("c", NOW + 1), ("d", NOW - 1), ("e", NOW + 0.5)]:
        await store.save_agent_session(run(i, started))
        await store.append_agent_output(i, [AgentOutputLine(1, "stdout", f"from {i}")])
    assert [s.id for s in await store.list_agent_sessions(limit=10)] == ["c", "e", "a", "b", "d"]
    assert [s.id for s in await store.list_agent_sessions(limit=3)] == ["c", "e", "a"]
    assert await store.list_agent_sessions(limit=0) == []
    assert await store.prune_agent_sessions(keep=2) == 3
    assert [s.id for s in await store.list_agent_sessions(limit=10)] == ["c", "e"]
    assert await store.agent_output("a", after_seq=0, limit=10) == []
    assert await store.agent_output("c", after_seq=0, limit=10) == [AgentOutputLine(1, "stdout", "from c")]
    assert await store.prune_agent_sessions(keep=2) == 0
    assert await store.prune_agent_sessions(keep=0) == 2
    assert await store.list_agent_sessions(limit=10) == []


async def test_agent_output_append_read_and_trim(store: Store) -> None:
    await store.save_agent_session(run("s1", NOW))
    lines = [AgentOutputLine(i, "stdout" if i % 2 else "stderr", f'line {i} ✓ \t"q"') for i in range(1, 6)]
    await store.append_agent_output("s1", lines[:3])
    await store.append_agent_output("s1", [])
    saved = await store.get_agent_session("s1")
    assert saved is not None
    assert saved.last_seq == 3
    await store.append_agent_output("s1", lines[3:])
    assert await store.agent_output("s1", after_seq=0, limit=100) == lines
    assert await store.agent_output("s1", after_seq=2, limit=2) == lines[2:4]
    assert await store.agent_output("s1", after_seq=5, limit=100) == []
    # The same seq again replaces the line.
    await store.append_agent_output("s1", [AgentOutputLine(2, "stdout", "again")])
    assert (await store.agent_output("s1", after_seq=1, limit=1)) == [AgentOutputLine(2, "stdout", "again")]
    saved = await store.get_agent_session("s1")
    assert saved is not None
    assert saved.last_seq == 5  # never lowered
    # keep_last counts back from the batch's last seq.
    await store.append_agent_output("s1", [AgentOutputLine(7, "stdout", "7")], keep_last=3)
    assert [line.seq for line in await store.agent_output("s1", after_seq=0, limit=100)] == [5, 7]
    saved = await store.get_agent_session("s1")
    assert saved is not None
    assert saved.last_seq == 7
    # Output for a session that has no record is kept, and creates no record.
    await store.append_agent_output("ghost", [AgentOutputLine(1, "stdout", "x")], keep_last=5)
    assert await store.get_agent_session("ghost") is None
    assert await store.agent_output("ghost", after_seq=0, limit=5) == [AgentOutputLine(1, "stdout", "x")]


# --- both backends, same random operations ---------------------------------------------------------------

# Few ids and times, chosen so that expiries (t + 10, t + 20) often meet another time exactly.
_ids = st.sampled_from(["1", "2"])
_times = st.sampled_from([NOW - 10, NOW, NOW + 0.5, NOW + 10, NOW + 20])
_ops = st.one_of(
    st.tuples(st.just("pair"), _ids, st.integers(0, 1), _times),
    st.tuples(st.just("rotate"), _ids, st.integers(0, 2), _times, _times),
    st.tuples(st.just("revoke_device"), _ids, _times),
    st.tuples(st.just("revoke_family"), _ids, _times),
    st.tuples(st.just("revoke_all"), _times),
    st.tuples(st.just("revoke_token"), _ids, _times),
    st.tuples(st.just("bump_generation")),
    st.tuples(st.just("touch_device"), _ids, st.sampled_from([None, "192.0.2.1", "::1"]), _times),
    st.tuples(st.just("create_key"), _ids, _times, st.sampled_from([None, NOW, NOW + 10])),
    st.tuples(st.just("touch_key"), _ids, _times),
    st.tuples(st.just("revoke_key"), _ids, _times),
    st.tuples(st.just("create_cookie"), _ids, st.sampled_from([None, "1", "2"]), _times),
    st.tuples(st.just("extend_cookie"), _ids, _times),
    st.tuples(st.just("revoke_cookie"), _ids, _times),
    st.tuples(st.just("prune"), _times),
    st.tuples(st.just("save_run"), _ids, _times, st.integers(0, 6), st.sampled_from([None, "p", "q"])),
    st.tuples(
        st.just("append"), _ids, st.lists(st.integers(1, 8), max_size=4), st.none() | st.integers(0, 3)
    ),
    st.tuples(st.just("prune_runs"), st.integers(0, 3)),
)


async def _apply(store: Store, op: tuple[Any, ...]) -> Any:
    name, *a = op
    try:
        return await _apply_one(store, name, a)
    except (sqlite3.IntegrityError, ValueError):  # a duplicate id: both backends refuse it
        return ("duplicate", name)


async def _apply_one(store: Store, name: str, a: list[Any]) -> Any:
    if name == "pair":
        i, gen, t = a
        return await store.redeem_pairing(
            jti=f"jti_{i}",
            generation=gen,
            nonce_expires_at=t,
            device=Device(id=f"dev_{i}", name=i, role="operator", created_at=t),
            family=Family(id=f"fam_{i}", device_id=f"dev_{i}", created_at=t, expires_at=t + 10),
            refresh=NewRefresh(f"r_{i}", f"fam_{i}", t + 10),
        )
    if name == "rotate":  # the token after `depth` rotations
        i, depth, t, exp = a
        old = f"r_{i}" + "x" * depth
        return await store.rotate_refresh(old, NewRefresh(old + "x", "", exp), now=t)
    if name == "revoke_device":
        return await store.revoke_device(f"dev_{a[0]}", now=a[1])
    if name == "revoke_family":
        return await store.revoke_family(f"fam_{a[0]}", now=a[1])
    if name == "revoke_all":
        return await store.revoke_all(now=a[0])
    if name == "revoke_token":
        return await store.revoke_token(f"jti_s{a[0]}", expires_at=a[1])
    if name == "bump_generation":
        return await store.bump_pairing_generation()
    if name == "touch_device":
        return await store.touch_device(f"dev_{a[0]}", ip=a[1], now=a[2])
    if name == "create_key":
        i, t, exp = a
        key = ApiKey(f"key_{i}", f"k{i}", "viewer", created_at=t, expires_at=exp)
        return await store.create_api_key(key, key_hash=f"kh_{i}")
    if name == "touch_key":
        return await store.touch_api_key(f"key_{a[0]}", now=a[1])
    if name == "revoke_key":
        return await store.revoke_api_key(f"key_{a[0]}", now=a[1])
    if name == "create_cookie":
        i, key, t = a
        session = CookieSession(
            f"cs_{i}", "operator", t, t + 10, t + 20, api_key_id=None if key is None else f"key_{key}"
        )
        return await store.create_cookie_session(session, session_hash=f"ch_{i}")
    if name == "extend_cookie":
        return await store.extend_cookie_session(f"cs_{a[0]}", expires_at=a[1])
    if name == "revoke_cookie":
        return await store.revoke_cookie_session(f"cs_{a[0]}", now=a[1])
    if name == "prune":
        return await store.prune(now=a[0])
    if name == "save_run":
        i, t, seq, prompt = a
        return await store.save_agent_session(run(f"run_{i}", t, last_seq=seq, prompt=prompt))
    if name == "append":
        i, seqs, keep = a
        lines = [AgentOutputLine(s, "stdout", f"{s}") for s in seqs]
        return await store.append_agent_output(f"run_{i}", lines, keep_last=keep)
    if name == "prune_runs":
        return await store.prune_agent_sessions(keep=a[0])
    raise AssertionError(name)


async def _observe(store: Store) -> Any:
    """Everything a caller can read back."""
    out: dict[str, Any] = {
        "revision": await store.revision(),
        "generation": await store.pairing_generation(),
        "devices": await store.list_devices(),
        "families": await store.list_families(include_revoked=True),
        "live_families": await store.list_families(),
        "keys": await store.list_api_keys(include_revoked=True),
        "live_keys": await store.list_api_keys(),
        "runs": await store.list_agent_sessions(limit=-1),
    }
    for t in (NOW - 10, NOW, NOW + 10, NOW + 20, NOW + 30):
        out[f"revocations@{t}"] = await store.revocations(t)
    for i in ("1", "2"):
        out[f"nonce_{i}"] = await store.nonce_consumed(f"jti_{i}")
        out[f"key_{i}"] = await store.api_key_by_hash(f"kh_{i}")
        out[f"cookie_{i}"] = await store.cookie_session_by_hash(f"ch_{i}")
        out[f"output_{i}"] = await store.agent_output(f"run_{i}", after_seq=0, limit=-1)
    return out


def test_backends_agree_on_random_operation_sequences(redis_url: str, tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        redis = RedisStore(redis_url, prefix=f"wgtest:{uuid.uuid4().hex[:12]}:")
        runner.run(redis.open())
        examples = iter(range(1_000_000))

        async def compare(ops: list[tuple[Any, ...]]) -> None:
            sqlite = SqliteStore(tmp_path / f"{next(examples)}.db")
            await sqlite.open()
            try:
                for op in ops:
                    expected = await _apply(sqlite, op)
                    assert await _apply(redis, op) == expected, op
                assert await _observe(redis) == await _observe(sqlite)
            finally:
                await sqlite.close()
                keys = [key async for key in redis.client.scan_iter(match=redis.prefix + "*")]
                if keys:
                    await redis.client.delete(*keys)

        @settings(max_examples=150, deadline=None)
        @given(ops=st.lists(_ops, min_size=2, max_size=20))
        def check(ops: list[tuple[Any, ...]]) -> None:
            runner.run(compare(ops))

        try:
            check()
        finally:
            runner.run(redis.close())
