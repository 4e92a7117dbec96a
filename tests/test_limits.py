"""Limits in one process and on Redis: the same contract, and on Redis the sum over instances."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest

from tests.redis_server import RedisServer
from wardgate.config import LimitSettings
from wardgate.errors import StoreUnavailable
from wardgate.limits import Limits, LocalLimits, RedisLimits, Slot
from wardgate.store.redis import RedisStore

SETTINGS = LimitSettings(
    handshakes_per_ip=3,
    handshake_window=60,
    auth_failures_per_ip=2,
    auth_failure_window=60,
    auth_lockout=30,
    auth_lockout_max=120,
    messages_per_principal=100,
    message_window=60,
)

Factory = Callable[..., Awaitable[Limits]]


@pytest.fixture(params=["local", "redis"])
async def make_limits(
    request: pytest.FixtureRequest,
    redis_url: str,
    redis_prefix: str,
) -> AsyncIterator[Factory]:
    """Builds limits sharing one state: on Redis, each call is another instance."""
    made: list[tuple[Limits, RedisStore | None]] = []

    async def make(settings: LimitSettings = SETTINGS, *, lease_ttl: float = 5.0) -> Limits:
        if request.param == "local":
            if made:
                return made[0][0]
            limits: Limits = LocalLimits(settings)
            made.append((limits, None))
            return limits
        store = RedisStore(redis_url, prefix=redis_prefix)
        await store.open()
        redis_limits = RedisLimits(store, settings, instance=f"i{len(made)}", lease_ttl=lease_ttl)
        await redis_limits.start()
        made.append((redis_limits, store))
        return redis_limits

    yield make
    for limits, store in made:
        await limits.stop()
        if store is not None:
            await store.close()


CAPS = [Slot("all", 3, "global"), Slot("ip:1", 2, "per address")]


async def test_leases_count_against_every_cap_at_once(make_limits: Factory) -> None:
    limits = await make_limits()
    assert await limits.acquire("a", CAPS) is None
    assert await limits.acquire("a", CAPS) is None  # the same lease counts once
    assert await limits.acquire("b", CAPS) is None
    assert await limits.count("ip:1") == 2
    full = await limits.acquire("c", CAPS)
    assert full == CAPS[1]
    # A refused acquisition took nothing anywhere.
    assert await limits.count("all") == 2
    assert await limits.acquire("c", [Slot("all", 3, "global"), Slot("ip:2", 2, "per address")]) is None
    assert await limits.acquire("d", [Slot("all", 3, "global")]) == CAPS[0]
    await limits.release("a")
    await limits.release("a")  # harmless
    await limits.release("never")
    assert await limits.count("ip:1") == 1
    assert await limits.count("all") == 2
    assert await limits.acquire("d", CAPS) is None


async def test_handshakes_and_lockout(make_limits: Factory) -> None:
    first = await make_limits()
    second = await make_limits()
    decisions = [await limits.hit_address("10.0.0.1") for limits in (first, second, first, second)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert 0 < decisions[-1].retry_after <= 120  # the sliding-window counter: up to two windows
    assert (await second.hit_address("10.0.0.2")).allowed
    assert await first.locked_for("10.0.0.9") == 0
    await first.record_failure("10.0.0.9")
    assert await first.locked_for("10.0.0.9") == 0
    await second.record_failure("10.0.0.9")  # the second failure within the window locks
    locked = await first.locked_for("10.0.0.9")
    assert 25 < locked <= 30
    assert await second.locked_for("10.0.0.8") == 0


async def test_admit_address_refuses_a_locked_address_without_counting_it(make_limits: Factory) -> None:
    settings = msgspec.structs.replace(SETTINGS, auth_lockout=1, auth_lockout_max=2)
    first = await make_limits(settings)
    second = await make_limits(settings)
    await first.record_failure("10.0.0.7")
    await second.record_failure("10.0.0.7")
    for limits in (first, second, first, second, first):
        locked, decision = await limits.admit_address("10.0.0.7")
        assert 0 < locked <= 1
        assert (decision.allowed, decision.retry_after) == (False, locked)
    await asyncio.sleep(1.1)
    # The refused requests were not counted: the full budget is there once the lock ends.
    answers = [await limits.admit_address("10.0.0.7") for limits in (first, second, first, second)]
    assert [(locked, d.allowed) for locked, d in answers] == [(0, True)] * 3 + [(0, False)]
    assert (await first.admit_address("10.0.0.7", "requests"))[1].allowed  # a budget of its own


async def test_message_budget_holds_for_the_sum(make_limits: Factory) -> None:
    settings = LimitSettings(messages_per_principal=120, message_window=3600)
    instances = [await make_limits(settings) for _ in range(3)]
    allowed = 0
    for round_ in range(100):
        for limits in instances:
            if (await limits.take_message("device:d1")).allowed:
                allowed += 1
        del round_
    assert allowed == 120
    refused = await instances[0].take_message("device:d1")
    assert not refused.allowed
    assert refused.retry_after > 0
    assert (await instances[1].take_message("device:d2")).allowed


async def test_redis_leases_of_a_dead_instance_expire(redis_url: str, redis_prefix: str) -> None:
    stores = [RedisStore(redis_url, prefix=redis_prefix) for _ in range(2)]
    for store in stores:
        await store.open()
    alive = RedisLimits(stores[0], SETTINGS, instance="alive", lease_ttl=0.6)
    dead = RedisLimits(stores[1], SETTINGS, instance="dead", lease_ttl=0.6)
    await alive.start()  # only this one renews
    try:
        cap = [Slot("principal:p", 2, "per principal")]
        assert await alive.acquire("a1", cap) is None
        assert await dead.acquire("d1", cap) is None
        assert await alive.acquire("a2", cap) == cap[0]
        await asyncio.sleep(1.2)
        # The dead instance's slot freed itself; the live one's was renewed.
        assert await alive.count("principal:p") == 1
        assert await alive.acquire("a2", cap) is None
    finally:
        await alive.stop()
        for store in stores:
            await store.close()


async def test_redis_down_fails_new_handshakes_closed_but_keeps_message_budgets(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url, prefix="t:")
    await store.open()
    limits = RedisLimits(store, SETTINGS, instance="i", lease_ttl=5)
    try:
        assert (await limits.take_message("device:d")).allowed
        private_redis.stop()
        with pytest.raises(StoreUnavailable):
            await limits.hit_address("10.0.0.1")
        with pytest.raises(StoreUnavailable):
            await limits.acquire("x", CAPS)
        # Established connections keep a (local) message limit while Redis is away.
        assert all([(await limits.take_message("device:e")).allowed for _ in range(10)])
        await limits.release("never-held")
        private_redis.start()
        assert (await limits.hit_address("10.0.0.1")).allowed
    finally:
        await limits.stop()
        await store.close()


async def test_take_message_now_counts_against_the_same_budget(make_limits: Factory) -> None:
    settings = LimitSettings(messages_per_principal=100, message_window=3600)
    limits = await make_limits(settings)
    allowed = 0
    for _ in range(150):
        decided = limits.take_message_now("device:n")
        if decided is None:  # only the coroutine can decide (Redis, no budget drawn yet)
            decided = (await limits.take_message("device:n")).allowed
        allowed += decided
    assert allowed == 100
    assert limits.take_message_now("device:n") in (False, None)
    assert not (await limits.take_message("device:n")).allowed


async def test_a_release_lost_to_an_outage_is_given_back_at_the_next_renewal(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url, prefix="t:")
    await store.open()
    limits = RedisLimits(store, SETTINGS, instance="i", lease_ttl=0.6)
    await limits.start()
    cap = [Slot("principal:p", 1, "per principal")]
    try:
        assert await limits.acquire("a", cap) is None
        private_redis.stop()
        await limits.release("a")  # cannot reach Redis: kept to give back later
        private_redis.start()
        deadline = asyncio.get_running_loop().time() + 5
        while await limits.count("principal:p") != 0:
            assert asyncio.get_running_loop().time() < deadline, "the orphaned lease was kept alive"
            await asyncio.sleep(0.1)
        assert await limits.acquire("b", cap) is None
    finally:
        await limits.stop()
        await store.close()


class RetakeInterleaved(RedisStore):
    """A real store that runs ``during_retake`` just before the next ``acquire_lease``."""

    during_retake: Callable[[], Awaitable[None]] | None = None

    async def acquire_lease(
        self, scope_keys: list[tuple[str, int]], lease_id: str, instance: str, ttl: float
    ) -> str | None:
        hook, self.during_retake = self.during_retake, None
        if hook is not None:
            await hook()
        return await super().acquire_lease(scope_keys, lease_id, instance, ttl)


async def test_a_lost_lease_whose_connection_ends_while_it_is_retaken_is_given_back(
    redis_url: str, redis_prefix: str
) -> None:
    store = RetakeInterleaved(redis_url, prefix=redis_prefix)
    await store.open()
    limits = RedisLimits(store, SETTINGS, instance="i", lease_ttl=0.3)  # renewed by hand here
    cap = [Slot("principal:p", 1, "per principal")]
    try:
        assert await limits.acquire("a", cap) is None
        await asyncio.sleep(0.5)  # expired in Redis: the next renewal finds it lost and retakes it
        store.during_retake = lambda: limits.release("a")  # the connection ends meanwhile
        await limits.renew_once()
        await limits.renew_once()
        assert await limits.count("principal:p") == 0
        assert await limits.acquire("b", cap) is None
    finally:
        await store.close()
