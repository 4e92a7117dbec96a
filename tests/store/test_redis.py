"""What only the Redis store has to show: atomicity across instances, distributed limits,
failure and recovery of the server, authentication, TLS, pub/sub, key layout and TTLs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.redis_server import RedisServer, delete_prefix
from wardgate.errors import ConfigError, StoreUnavailable
from wardgate.store.base import (
    ApiKey,
    CookieSession,
    Device,
    Family,
    NewRefresh,
    RedeemOutcome,
    RotateOutcome,
    token_hash,
)
from wardgate.store.redis import EXPIRY_GRACE, RedisStore

NOW = 1_800_000_000.0
PASSWORD = "s3cret-Pa55word-for-tests"


@pytest.fixture
async def instances(redis_url: str, redis_prefix: str) -> AsyncIterator[list[RedisStore]]:
    """Three stores sharing one prefix, each with its own connection pool: three instances."""
    stores = [RedisStore(redis_url, prefix=redis_prefix) for _ in range(3)]
    for s in stores:
        await s.open()
    yield stores
    for s in stores:
        await s.close()


async def open_store(url: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, **kwargs)
    await store.open()
    return store


def pairing(i: int, *, jti: str = "shared") -> dict[str, Any]:
    return {
        "jti": jti,
        "generation": 0,
        "nonce_expires_at": time.time() + 3600,
        "device": Device(id=f"dev_{i}", name=f"phone {i}", role="operator", created_at=NOW),
        "family": Family(id=f"fam_{i}", device_id=f"dev_{i}", created_at=NOW, expires_at=NOW + 86400),
        "refresh": NewRefresh(token_hash(f"refresh_{i}"), f"fam_{i}", NOW + 86400),
    }


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait for a time-driven change (a lease expiring): poll, bounded."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# --- atomicity across instances ------------------------------------------------------------------


async def test_one_pairing_token_redeemed_concurrently_on_three_instances_has_one_winner(
    instances: list[RedisStore],
) -> None:
    outcomes = await asyncio.gather(*(instances[i % 3].redeem_pairing(**pairing(i)) for i in range(50)))
    assert outcomes.count(RedeemOutcome.REDEEMED) == 1
    assert outcomes.count(RedeemOutcome.ALREADY_USED) == 49
    winner = outcomes.index(RedeemOutcome.REDEEMED)
    for store in instances:
        assert [d.id for d in await store.list_devices()] == [f"dev_{winner}"]
        assert [f.id for f in await store.list_families()] == [f"fam_{winner}"]
    # Only the winner's refresh token exists.
    for i in range(50):
        new = NewRefresh(token_hash(f"next_{i}"), "", NOW + 90000)
        result = await instances[0].rotate_refresh(token_hash(f"refresh_{i}"), new, now=NOW)
        assert result.outcome is (RotateOutcome.ROTATED if i == winner else RotateOutcome.UNKNOWN)


async def test_concurrent_rotation_of_one_refresh_token_rotates_once_and_revokes_the_device(
    instances: list[RedisStore],
) -> None:
    assert await instances[0].redeem_pairing(**pairing(1)) is RedeemOutcome.REDEEMED
    old = token_hash("refresh_1")
    results = await asyncio.gather(
        *(
            instances[i % 3].rotate_refresh(
                old, NewRefresh(token_hash(f"new_{i}"), "fam_1", NOW + 90000), now=NOW
            )
            for i in range(30)
        )
    )
    outcomes = [r.outcome for r in results]
    assert outcomes.count(RotateOutcome.ROTATED) == 1
    # The first replay is reuse (it revokes the device); the ones after it find it revoked.
    assert outcomes.count(RotateOutcome.REUSED) >= 1
    assert set(outcomes) <= {RotateOutcome.ROTATED, RotateOutcome.REUSED, RotateOutcome.REVOKED}
    assert all((r.device_id, r.family_id) == ("dev_1", "fam_1") for r in results)
    device = await instances[1].get_device("dev_1")
    assert device is not None
    assert device.revoked_at == NOW
    winner = outcomes.index(RotateOutcome.ROTATED)
    after = await instances[2].rotate_refresh(
        token_hash(f"new_{winner}"), NewRefresh(token_hash("x"), "", NOW + 90000), now=NOW
    )
    assert after.outcome is RotateOutcome.REVOKED
    snap = await instances[2].revocations(NOW)
    assert snap.devices == {"dev_1"}
    assert snap.families == {"fam_1"}


async def test_duplicate_ids_are_refused_without_partial_writes(redis_store: RedisStore) -> None:
    assert await redis_store.redeem_pairing(**pairing(1, jti="j1")) is RedeemOutcome.REDEEMED
    with pytest.raises(ValueError, match="duplicate"):
        await redis_store.redeem_pairing(**pairing(1, jti="j2"))
    assert not await redis_store.nonce_consumed("j2")
    await redis_store.create_api_key(ApiKey("key_1", "a", "viewer", NOW), key_hash="h")
    with pytest.raises(ValueError, match="duplicate"):
        await redis_store.create_api_key(ApiKey("key_2", "b", "viewer", NOW), key_hash="h")
    assert [k.id for k in await redis_store.list_api_keys()] == ["key_1"]
    session = CookieSession("cs_1", "operator", NOW, NOW + 60, NOW + 600)
    await redis_store.create_cookie_session(session, session_hash="c")
    with pytest.raises(ValueError, match="duplicate"):
        await redis_store.create_cookie_session(session, session_hash="other")
    assert await redis_store.cookie_session_by_hash("other") is None


# --- distributed rate limit ----------------------------------------------------------------------------


async def test_hit_window_limits_the_sum_over_instances(instances: list[RedisStore]) -> None:
    now = NOW
    decisions = await asyncio.gather(
        *(instances[i % 3].hit_window("ip:192.0.2.1", 10, 60.0, now) for i in range(30))
    )
    assert [allowed for allowed, _ in decisions].count(True) == 10
    assert all(retry == 0.0 for allowed, retry in decisions if allowed)
    assert all(0 < retry <= 60.0 for allowed, retry in decisions if not allowed)
    # Another key is independent.
    assert (await instances[0].hit_window("ip:192.0.2.2", 10, 60.0, now))[0]


async def test_hit_window_slides_and_tells_when_to_retry(redis_store: RedisStore) -> None:
    hit = redis_store.hit_window
    assert await hit("k", 2, 10.0, NOW) == (True, 0.0)
    assert await hit("k", 2, 10.0, NOW + 4) == (True, 0.0)
    allowed, retry = await hit("k", 2, 10.0, NOW + 5)
    assert not allowed
    assert retry == pytest.approx(5.0)  # the hit at NOW leaves the window at NOW + 10
    assert (await hit("k", 2, 10.0, NOW + 9.999))[0] is False
    assert await hit("k", 2, 10.0, NOW + 10) == (True, 0.0)
    allowed, retry = await hit("k", 2, 10.0, NOW + 11)
    assert not allowed
    assert retry == pytest.approx(3.0)
    for bad in [(0, 1.0), (1, 0.0), (1, float("nan"))]:
        with pytest.raises(ValueError, match="must be"):
            await hit("k", *bad, NOW)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(1, 5),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    steps=st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 3.0]), min_size=1, max_size=30),
)
def test_hit_window_matches_a_sliding_log(
    redis_url: str, limit: int, window: float, steps: list[float]
) -> None:
    """Against a model: a hit is allowed iff fewer than ``limit`` allowed hits lie in (t - window, t]."""

    async def check() -> None:
        store = await open_store(redis_url, prefix=f"wgtest:{os.urandom(6).hex()}:")
        try:
            log: list[float] = []
            t = NOW
            for step in steps:
                t += step
                allowed, retry = await store.hit_window("k", limit, window, t)
                live = [h for h in log if h > t - window]
                assert allowed is (len(live) < limit)
                if allowed:
                    log.append(t)
                else:
                    expected = live[len(live) - limit] + window - t
                    assert retry == pytest.approx(max(expected, 1e-3))
        finally:
            await store.close()
            delete_prefix(redis_url, store.prefix)

    asyncio.run(check())


# --- connection leases ------------------------------------------------------------------------------------


async def test_leases_hold_a_cap_across_instances(instances: list[RedisStore]) -> None:
    a, b, c = instances
    results = await asyncio.gather(
        *(
            instances[i % 3].acquire_lease([("user:u1", 5)], f"lease_{i}", f"inst_{i % 3}", 30)
            for i in range(12)
        )
    )
    assert results.count(None) == 5
    assert set(results) == {None, "user:u1"}
    assert await a.lease_count("user:u1") == 5
    first = results.index(None)
    await instances[first % 3].release_lease(["user:u1"], f"lease_{first}", instance=f"inst_{first % 3}")
    assert await b.lease_count("user:u1") == 4
    assert await c.acquire_lease([("user:u1", 5)], "lease_new", "inst_2", 30) is None
    assert await c.acquire_lease([("user:u1", 5)], "lease_more", "inst_2", 30) == "user:u1"


async def test_a_lease_takes_every_scope_or_none(redis_store: RedisStore) -> None:
    scopes = [("global", 10), ("ip:192.0.2.1", 2), ("user:u1", 1)]
    assert await redis_store.acquire_lease(scopes, "l1", "i1", 30) is None
    # user:u1 is full: nothing is taken anywhere.
    assert await redis_store.acquire_lease(scopes, "l2", "i1", 30) == "user:u1"
    assert [await redis_store.lease_count(k) for k, _ in scopes] == [1, 1, 1]
    # The same lease again is not a second slot.
    assert await redis_store.acquire_lease(scopes, "l1", "i1", 30) is None
    assert [await redis_store.lease_count(k) for k, _ in scopes] == [1, 1, 1]
    assert await redis_store.acquire_lease([("global", 10), ("ip:192.0.2.1", 2)], "l3", "i1", 30) is None
    assert (
        await redis_store.acquire_lease([("ip:192.0.2.1", 2), ("global", 10)], "l4", "i1", 30)
        == "ip:192.0.2.1"
    )
    await redis_store.release_lease([k for k, _ in scopes], "l1", instance="i1")
    await redis_store.release_lease([k for k, _ in scopes], "l1", instance="i1")  # harmless twice
    assert [await redis_store.lease_count(k) for k, _ in scopes] == [1, 1, 0]
    assert await redis_store.acquire_lease([("zero", 0)], "l5", "i1", 30) == "zero"
    with pytest.raises(ValueError, match="ttl"):
        await redis_store.acquire_lease(scopes, "l6", "i1", 0)


async def test_leases_of_an_instance_that_stops_renewing_expire(instances: list[RedisStore]) -> None:
    alive, dead, observer = instances
    assert await alive.acquire_lease([("user:u1", 2)], "alive_1", "alive", 0.4) is None
    assert await dead.acquire_lease([("user:u1", 2)], "dead_1", "dead", 0.4) is None
    assert await observer.acquire_lease([("user:u1", 2)], "x", "observer", 30) == "user:u1"

    async def dead_lease_gone() -> bool:
        assert await alive.renew_leases("alive", 0.4) == []  # the live instance keeps its lease
        return await observer.lease_count("user:u1") == 1

    await until(dead_lease_gone)
    assert await observer.acquire_lease([("user:u1", 2)], "x", "observer", 30) is None
    # The dead instance, back too late, learns that its lease was lost (and holds nothing).
    assert await dead.renew_leases("dead", 0.4) == ["dead_1"]
    assert await observer.lease_count("user:u1") == 2
    assert await alive.renew_leases("alive", 30) == []


async def test_renew_reports_leases_removed_elsewhere(redis_store: RedisStore) -> None:
    await redis_store.acquire_lease([("a", 5), ("b", 5)], "l1", "i1", 30)
    await redis_store.acquire_lease([("a", 5)], "l2", "i1", 30)
    await redis_store.release_lease(["b"], "l1", instance="other")  # an operator clearing "b"
    assert await redis_store.renew_leases("i1", 30) == ["l1"]
    assert (await redis_store.lease_count("a"), await redis_store.lease_count("b")) == (1, 0)
    assert await redis_store.renew_leases("i1", 30) == []
    assert await redis_store.renew_leases("nobody", 30) == []


# --- pub/sub ---------------------------------------------------------------------------------------------


async def test_every_revision_bump_is_published(instances: list[RedisStore]) -> None:
    listener, writer, _ = instances
    async with listener.watch_revisions() as feed:
        await writer.revoke_token("jti", expires_at=NOW)
        assert await asyncio.wait_for(feed.next(), 5) == 1
        await writer.create_api_key(ApiKey("key_1", "a", "viewer", NOW), key_hash="h")
        await writer.bump_pairing_generation()  # neither of these bumps the revision
        await writer.revoke_api_key("key_1", now=NOW)
        assert await asyncio.wait_for(feed.next(), 5) == 2
        await writer.revoke_all(now=NOW)
        seen = []
        async for revision in feed:
            seen.append(revision)
            break
        assert seen == [3]
    assert await listener.revision() == 3


# --- failure and recovery ----------------------------------------------------------------------------------


async def test_a_dead_server_makes_the_store_unavailable_until_it_returns(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store(private_redis.url, socket_timeout=1.0, connect_timeout=1.0)
    try:
        await store.revoke_token("j", expires_at=NOW)
        assert await store.ping()
        private_redis.kill()
        calls: list[Callable[[], Awaitable[object]]] = [
            store.revision,
            lambda: store.revocations(NOW),
            lambda: store.redeem_pairing(**pairing(1)),
            lambda: store.nonce_consumed("j"),
            lambda: store.hit_window("k", 1, 1.0, NOW),
            lambda: store.acquire_lease([("k", 1)], "l", "i", 1.0),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await call()
            assert time.monotonic() - started < 1.5
            assert raised.value.hint == "cannot reach the Redis store"
            assert raised.value.http_status == 503
        assert not await store.ping()
        private_redis.start()  # same port, empty (no persistence)
        assert await store.ping()
        assert await store.revision() == 0
        assert await store.redeem_pairing(**pairing(1)) is RedeemOutcome.REDEEMED
        # One warning for the outage (not one per failed call), one when it is over.
        warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store ")]
        assert len(warnings) == 2
        assert warnings[0].startswith("store unavailable: cannot reach the Redis store (ConnectionError")
        assert warnings[1].startswith(f"store available again after {len(calls)} failed calls")
    finally:
        await store.close()


async def test_a_hung_server_times_out(private_redis: RedisServer) -> None:
    store = await open_store(private_redis.url, socket_timeout=0.3)
    assert private_redis.proc is not None
    try:
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await store.revision()
            assert 0.25 < time.monotonic() - started < 1.5
            assert raised.value.hint == "the Redis store did not answer in time"
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert await store.revision() == 0
    finally:
        await store.close()


async def test_a_store_opened_while_redis_is_down_works_once_it_is_up(private_redis: RedisServer) -> None:
    private_redis.kill()
    store = RedisStore(private_redis.url)
    with pytest.raises(StoreUnavailable):
        await store.revision()  # not open
    try:
        with pytest.raises(StoreUnavailable, match="unavailable") as raised:
            await store.open()
        assert raised.value.hint == "cannot reach the Redis store"
        with pytest.raises(StoreUnavailable):
            await store.revision()
        assert not await store.ping()
        private_redis.start()
        assert await store.revision() == 0
        await store.open()  # already open: nothing to do
        assert await store.ping()
    finally:
        await store.close()
    assert not await store.ping()


# --- authentication and TLS ---------------------------------------------------------------------------------


async def test_password_from_argument_or_url(
    private_redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = private_redis_factory(password=PASSWORD)
    with_arg = await open_store(server.url, password=PASSWORD)
    in_url = await open_store(server.url.replace("redis://", f"redis://:{PASSWORD}@"))
    # An explicit password wins over one in the URL.
    overridden = await open_store(server.url.replace("redis://", "redis://:wrong@"), password=PASSWORD)
    try:
        await with_arg.revoke_token("j", expires_at=NOW)
        assert await in_url.revision() == 1
        assert await overridden.revision() == 1
        for store in (with_arg, in_url, overridden):
            assert PASSWORD not in repr(store)
            assert PASSWORD not in store.location
    finally:
        for store in (with_arg, in_url, overridden):
            await store.close()
    failures = []
    for url, password in [
        (server.url, None),
        (server.url, "wrong"),
        (server.url.replace("redis://", f"redis://:{PASSWORD}x@"), None),
    ]:
        store = RedisStore(url, password=password)
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await store.open()
            failures.append(raised.value)
            assert not await store.ping()
        finally:
            await store.close()
    assert {f.hint for f in failures} == {"the Redis store refused wardgate's credentials"}
    for failure in failures:
        assert PASSWORD not in f"{failure} {failure.hint} {failure.body()} {failure.rpc_error()}"
    assert PASSWORD not in caplog.text
    assert "refused wardgate's credentials" in caplog.text


async def test_tls(private_redis_factory: Callable[..., RedisServer]) -> None:
    server = private_redis_factory(tls=True, password=PASSWORD)
    assert server.url.startswith("rediss://")
    store = await open_store(server.url, password=PASSWORD)
    try:
        await store.revoke_token("j", expires_at=NOW)
        assert (await store.revocations(NOW - 1)).tokens == {"j"}
    finally:
        await store.close()
    # Without the certificate to trust, the connection is refused: no silent downgrade.
    untrusted = RedisStore(server.url.split("?")[0], password=PASSWORD, socket_timeout=0.5)
    # And a plain client cannot talk to the TLS port.
    plain = RedisStore(
        server.url.split("?")[0].replace("rediss://", "redis://"), password=PASSWORD, socket_timeout=0.5
    )
    for refused in (untrusted, plain):
        try:
            with pytest.raises(StoreUnavailable):
                await refused.open()
            with pytest.raises(StoreUnavailable):
                await refused.revocations(NOW)
        finally:
            await refused.close()


def test_only_redis_urls_are_accepted() -> None:
    for url in ["http://127.0.0.1:6379", "unix:///tmp/redis.sock", "127.0.0.1:6379", "redis://h:99999999/0"]:
        with pytest.raises(ConfigError, match=r"store\.url") as raised:
            RedisStore(url)
        assert url not in str(raised.value)
    store = RedisStore(f"rediss://user:{PASSWORD}@[::1]:6380/2")
    assert store.location == "rediss://[::1]:6380/2"
    assert PASSWORD not in repr(store)


# --- layout: prefix isolation and TTLs ----------------------------------------------------------------------


async def populate(store: RedisStore) -> None:
    await store.redeem_pairing(**pairing(1, jti="j1"))
    await store.rotate_refresh(token_hash("refresh_1"), NewRefresh("r2", "", NOW + 90000), now=NOW)
    await store.revoke_token("jti", expires_at=NOW)
    await store.create_api_key(ApiKey("key_1", "a", "viewer", NOW, expires_at=NOW + 5), key_hash="kh")
    await store.create_cookie_session(
        CookieSession("cs_1", "operator", NOW, NOW + 60, NOW + 600, api_key_id="key_1"), session_hash="ch"
    )
    await store.revoke_cookie_session("cs_1", now=NOW)
    await store.hit_window("k", 5, 10.0, NOW)
    await store.acquire_lease([("k", 5)], "l", "i", 30)


async def test_every_key_is_under_the_prefix_and_prefixes_are_isolated(private_redis: RedisServer) -> None:
    a = await open_store(private_redis.url, prefix="tenant-a:")
    b = await open_store(private_redis.url, prefix="tenant-b:")
    raw = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        async with a.watch_revisions() as feed_a:
            await populate(a)
            assert await asyncio.wait_for(feed_a.next(), 5) >= 1
        keys = [k async for k in raw.scan_iter()]
        assert keys
        assert all(k.startswith("tenant-a:") for k in keys)
        assert await b.revision() == 0
        assert await b.list_devices() == []
        assert await b.lease_count("k") == 0
        assert (await b.hit_window("k", 1, 10.0, NOW))[0]
        assert (await b.revocations(NOW - 1)).tokens == frozenset()
    finally:
        await raw.aclose()
        await a.close()
        await b.close()


async def test_expiring_records_carry_ttls_and_the_rest_none(redis_store: RedisStore, redis_url: str) -> None:
    now = time.time()
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    p = redis_store.prefix
    try:
        await redis_store.redeem_pairing(**{**pairing(1, jti="real"), "nonce_expires_at": now + 60})
        # A pairing token expiring in 60 s: its nonce is kept 60 s plus the grace period.
        assert EXPIRY_GRACE + 55 < await raw.ttl(p + "nonce:real") <= EXPIRY_GRACE + 61
        # Times in the past (a test clock) still get the full grace, counted from the server's now.
        await redis_store.redeem_pairing(**{**pairing(2, jti="past"), "nonce_expires_at": 1000.0})
        assert EXPIRY_GRACE - 5 < await raw.ttl(p + "nonce:past") <= EXPIRY_GRACE + 1
        assert await redis_store.nonce_consumed("past")
        await redis_store.revoke_token("jti", expires_at=now + 100)
        assert EXPIRY_GRACE + 95 < await raw.ttl(p + "revoked_tokens") <= EXPIRY_GRACE + 101
        await redis_store.revoke_token("jti2", expires_at=now + 10)  # never shortens
        assert EXPIRY_GRACE + 95 < await raw.ttl(p + "revoked_tokens") <= EXPIRY_GRACE + 101
        session = CookieSession("cs_1", "operator", now, now + 60, now + 600)
        await redis_store.create_cookie_session(session, session_hash="ch")
        assert EXPIRY_GRACE + 595 < await raw.ttl(p + "cookie:cs_1") <= EXPIRY_GRACE + 601
        assert EXPIRY_GRACE + 595 < await raw.ttl(p + "cookie_hash:ch") <= EXPIRY_GRACE + 601
        refresh_ttl = await raw.ttl(p + "refresh:" + token_hash("refresh_1"))
        assert refresh_ttl > NOW + 86400 - now  # until the refresh token's own expiry
        await redis_store.hit_window("k", 5, 10.0, now)
        assert 9 <= await raw.ttl(p + "rate:k") <= 10
        await redis_store.acquire_lease([("k", 5)], "l", "i", 30)
        assert 28 <= await raw.ttl(p + "lease:k") <= 30
        # The holder index outlives its leases, so an instance back from a long pause learns
        # which leases it lost (renew_leases) instead of believing it still holds them.
        assert EXPIRY_GRACE + 28 <= await raw.ttl(p + "lease_holder:i") <= EXPIRY_GRACE + 30
        # What must not vanish by itself has no TTL.
        await redis_store.create_api_key(ApiKey("key_1", "a", "viewer", now), key_hash="kh")
        await redis_store.revoke_device("dev_1", now=now)
        permanent = ["device:dev_1", "family:fam_1", "devices", "revoked_devices", "revoked_families"]
        permanent += ["revision", "api_key:key_1", "api_key_hash:kh", "api_keys"]
        for key in permanent:
            assert await raw.ttl(p + key) == -1, key
    finally:
        await raw.aclose()


async def test_scripts_survive_a_script_cache_flush(private_redis: RedisServer) -> None:
    """A failover to a fresh server (or SCRIPT FLUSH) empties the script cache: calls reload.
    (A private server: flushing the machine's shared script cache would be rude.)"""
    store = await open_store(private_redis.url)
    raw = aioredis.Redis.from_url(private_redis.url)
    try:
        await store.revoke_token("a", expires_at=NOW)
        await raw.script_flush()
        await store.revoke_token("b", expires_at=NOW)
        assert (await store.revocations(NOW - 1)).tokens == {"a", "b"}
    finally:
        await raw.aclose()
        await store.close()


async def test_state_outlives_the_client_and_open_close_are_idempotent(
    redis_url: str, redis_prefix: str
) -> None:
    first = await open_store(redis_url, prefix=redis_prefix)
    await first.open()
    assert await first.redeem_pairing(**pairing(1)) is RedeemOutcome.REDEEMED
    await first.close()
    await first.close()
    with pytest.raises(StoreUnavailable):
        await first.revision()
    second = await open_store(redis_url, prefix=redis_prefix)
    try:
        assert [d.id for d in await second.list_devices()] == ["dev_1"]
        assert await second.nonce_consumed("shared")
    finally:
        await second.close()


async def test_a_callers_own_script_runs_with_the_store_failure_handling(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, prefix="p:")
    incr = store.client_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")  # before open: fine
    with pytest.raises(StoreUnavailable):
        await incr(keys=["p:n"], args=[1])  # not open yet
    await store.open()
    try:
        assert await incr(keys=["p:n"], args=[2]) == 2
        assert await incr(keys=["p:n"], args=[3]) == 5
        private_redis.kill()
        with pytest.raises(StoreUnavailable):
            await incr(keys=["p:n"], args=[1])
        with pytest.raises(StoreUnavailable), store.errors_as_unavailable():
            await store.client.pttl("p:n")
        private_redis.start()
        assert await incr(keys=["p:n"], args=[1]) == 1  # a fresh (empty) server: reloaded script
    finally:
        await store.close()


async def test_settings_that_let_redis_forget_revocations_are_reported(
    private_redis_factory: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    risky = private_redis_factory(extra_args=["--maxmemory-policy", "allkeys-lru"])  # and no AOF
    safe = private_redis_factory(extra_args=["--appendonly", "yes", "--maxmemory-policy", "noeviction"])
    for server in (risky, safe):
        caplog.clear()
        store = await open_store(server.url)
        await store.close()
        messages = [r.getMessage() for r in caplog.records if r.name == "wardgate.store.redis"]
        if server is risky:
            assert len(messages) == 2
            assert "maxmemory-policy is allkeys-lru" in messages[0]
            assert "without append-only persistence" in messages[1]
        else:
            assert messages == []
