"""Rate limits and connection caps: in this process, or on Redis so that they hold across instances.

One interface, two implementations (DESIGN.md, "State"):

* :class:`LocalLimits` keeps everything in memory: the sliding windows and the failure
  lockout of ``ratelimit``, and plain counters for open connections. Right for one instance.
* :class:`RedisLimits` puts every limit on the shared Redis, so several wardgate processes
  behind a load balancer enforce one limit, not one each:

  - handshakes per address and failed authentications per address are sliding windows in one
    Lua call each (``RedisStore.hit_window``); a lockout is a key with a TTL that doubles while
    failures go on;
  - open connections are *leases*: each connection takes one slot under every cap it counts
    against (global, per address, per principal, per upstream and user) in one atomic script,
    and the instance renews its leases every ``store.lease_ttl / 3`` seconds. An instance that
    dies stops renewing, and its slots free themselves after ``lease_ttl``: no counter leaks;
  - the per-principal message rate must not cost a Redis round trip per message, so each
    instance draws a *budget* (a share of the window's limit) from a fixed-window counter in
    one script and spends it locally; it asks again when it runs out. The sum over all
    instances never exceeds the limit; what an instance drew and did not spend by the end of
    the window is lost (at most one budget per instance and principal per window).

When Redis cannot be reached, a new handshake fails closed (``StoreUnavailable``, 503), while
established connections keep their message budget from a local limiter until Redis returns.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from wardgate.config import LimitSettings
from wardgate.errors import StoreUnavailable
from wardgate.ratelimit import FailureLockout, RateDecision, SlidingWindowLimiter

if TYPE_CHECKING:
    from wardgate.store.redis import RedisStore

log = logging.getLogger("wardgate.limits")

BUDGET_SHARE: Final = 50
"""An instance draws at most ``limit / BUDGET_SHARE`` messages of a window's budget at once."""


@dataclass(frozen=True, slots=True)
class Slot:
    """One cap a connection counts against: at most ``limit`` leases under ``key``."""

    key: str
    limit: int
    hint: str
    """What the refusal says when this cap is full (no secrets: keys name devices, not tokens)."""


ALLOWED: Final = RateDecision(allowed=True, retry_after=0.0, remaining=0)
"""The one answer for every allowed hit (``remaining`` is not tracked here)."""


def _allowed() -> RateDecision:
    return ALLOWED


def _refused(retry_after: float) -> RateDecision:
    return RateDecision(allowed=False, retry_after=max(retry_after, 1e-3), remaining=0)


class Limits(abc.ABC):
    """Every limit the gateway enforces that several instances must share."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (lease renewal)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop background work; give back every lease still held."""

    @abc.abstractmethod
    async def hit_address(self, ip: str, bucket: str = "handshakes") -> RateDecision:
        """Count a request from ``ip``: ``handshakes`` (upgrades and the auth API,
        ``limits.handshakes_per_ip``) or ``requests`` (HTTP relays, ``limits.http_requests_per_ip``)."""

    @abc.abstractmethod
    async def locked_for(self, ip: str) -> float:
        """Seconds ``ip`` remains locked out after failed authentications (0: not locked)."""

    async def admit_address(self, ip: str, bucket: str = "handshakes") -> tuple[float, RateDecision]:
        """The gate's address checks at once: ``(locked_for(ip), refused)`` while ``ip`` is
        locked out (the request is not counted), else ``(0, hit_address(ip, bucket))``."""
        locked = await self.locked_for(ip)
        if locked > 0:
            return locked, _refused(locked)
        return 0.0, await self.hit_address(ip, bucket)

    @abc.abstractmethod
    async def record_failure(self, ip: str) -> None: ...

    @abc.abstractmethod
    async def take_message(self, principal: str) -> RateDecision:
        """Count one message from ``principal`` (``limits.messages_per_principal``)."""

    def take_message_now(self, principal: str) -> bool | None:
        """``take_message(principal).allowed`` when it can be decided without I/O (and then
        counted); None when only ``take_message`` can decide (nothing counted). The relays'
        per-message path: no coroutine to step."""
        del principal
        return None

    @abc.abstractmethod
    async def acquire(self, lease_id: str, slots: Sequence[Slot]) -> Slot | None:
        """Take one slot under every cap at once, or none: returns None on success, else the
        first full cap. Acquiring the same ``lease_id`` twice counts once."""

    @abc.abstractmethod
    async def release(self, lease_id: str) -> None:
        """Give back a lease's slots. Harmless for an unknown or already released lease."""

    @abc.abstractmethod
    async def count(self, key: str) -> int:
        """Leases held under ``key`` now (for metrics and tests)."""


class LocalLimits(Limits):
    """The limits of a single instance, in memory, on the event loop's thread."""

    def __init__(self, settings: LimitSettings) -> None:
        self.addresses = {
            "handshakes": SlidingWindowLimiter(settings.handshakes_per_ip, settings.handshake_window),
            "requests": SlidingWindowLimiter(settings.http_requests_per_ip, settings.handshake_window),
        }
        self.lockout = FailureLockout(
            settings.auth_failures_per_ip,
            settings.auth_failure_window,
            settings.auth_lockout,
            settings.auth_lockout_max,
        )
        self.messages = SlidingWindowLimiter(settings.messages_per_principal, settings.message_window)
        self._counts: dict[str, int] = {}
        self._leases: dict[str, tuple[str, ...]] = {}

    async def hit_address(self, ip: str, bucket: str = "handshakes") -> RateDecision:
        return self.addresses[bucket].hit(ip)

    async def locked_for(self, ip: str) -> float:
        return self.lockout.locked_for(ip)

    async def record_failure(self, ip: str) -> None:
        self.lockout.record_failure(ip)

    async def take_message(self, principal: str) -> RateDecision:
        if self.messages.hit_one(principal):
            return ALLOWED
        return self.messages.peek(principal)

    def take_message_now(self, principal: str) -> bool | None:
        return self.messages.hit_one(principal)

    async def acquire(self, lease_id: str, slots: Sequence[Slot]) -> Slot | None:
        if lease_id in self._leases:
            return None
        for slot in slots:
            if self._counts.get(slot.key, 0) >= slot.limit:
                return slot
        for slot in slots:
            self._counts[slot.key] = self._counts.get(slot.key, 0) + 1
        self._leases[lease_id] = tuple(slot.key for slot in slots)
        return None

    async def release(self, lease_id: str) -> None:
        for key in self._leases.pop(lease_id, ()):
            left = self._counts.get(key, 0) - 1
            if left > 0:
                self._counts[key] = left
            else:
                self._counts.pop(key, None)

    async def count(self, key: str) -> int:
        return self._counts.get(key, 0)


# Draw up to ARGV[2] from a fixed window's budget of ARGV[1]; returns what was granted.
_DRAW_BUDGET: Final = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return grant
"""
# Lock an address out: each lockout doubles the last (level kept for ARGV[3] ms), capped.
_LOCK_OUT: Final = """
local level = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local ms = math.min(tonumber(ARGV[1]) * 2 ^ (level - 1), tonumber(ARGV[2]))
redis.call('SET', KEYS[1], level, 'PX', math.floor(ms))
return math.floor(ms)
"""


class RedisLimits(Limits):
    """The limits of a group of instances, shared through Redis (see the module docstring)."""

    def __init__(
        self, store: RedisStore, settings: LimitSettings, *, instance: str, lease_ttl: float
    ) -> None:
        self.store = store
        self.settings = settings
        self.instance = instance
        self.lease_ttl = lease_ttl
        self._leases: dict[str, list[str]] = {}
        self._orphans: dict[str, list[str]] = {}
        """Leases that Redis may still hold although their connection is gone (a release that
        failed, an acquisition whose answer was lost): given back at the next renewal, since
        renewing would otherwise keep them alive for as long as this instance runs."""
        self._budgets: dict[str, tuple[int, int]] = {}
        """principal -> (window number, messages left of what this instance drew)."""
        self._fallback = SlidingWindowLimiter(settings.messages_per_principal, settings.message_window)
        self._renewer: asyncio.Task[None] | None = None
        self._draw = store.client_script(_DRAW_BUDGET)
        self._lock = store.client_script(_LOCK_OUT)

    def _key(self, *parts: str) -> str:
        return self.store.prefix + "limits:" + ":".join(parts)

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew())

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for lease_id in list(self._leases):
            with contextlib.suppress(StoreUnavailable):
                await self.release(lease_id)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        """Give back orphaned leases, then extend this instance's leases (``start`` runs this
        every ``lease_ttl / 3``)."""
        try:
            for lease_id, keys in list(self._orphans.items()):
                await self.store.release_lease(keys, lease_id, instance=self.instance)
                del self._orphans[lease_id]
            lost = await self.store.renew_leases(self.instance, self.lease_ttl)
        except StoreUnavailable:
            log.warning("store unavailable: connection leases not renewed")
            return
        # A lease that expired meanwhile (Redis was away longer than the TTL) is taken again,
        # over the limit if need be: the connection exists, so it must be counted.
        for lease_id in lost:
            held = self._leases.get(lease_id)
            if not held:
                continue
            with contextlib.suppress(StoreUnavailable):
                await self.store.acquire_lease(
                    [(key, 2**31) for key in held], lease_id, self.instance, self.lease_ttl
                )
            if lease_id not in self._leases:
                # Its connection ended while the lease was being taken again: give it back.
                self._orphans[lease_id] = held

    async def hit_address(self, ip: str, bucket: str = "handshakes") -> RateDecision:
        s = self.settings
        limit = s.handshakes_per_ip if bucket == "handshakes" else s.http_requests_per_ip
        allowed, retry = await self.store.hit_window(
            self._key(bucket, ip), limit, s.handshake_window, time.time()
        )
        return _allowed() if allowed else _refused(retry)

    async def locked_for(self, ip: str) -> float:
        with self.store.errors_as_unavailable():
            ms = await self.store.client.pttl(self._key("lock", ip))
        return ms / 1000 if ms > 0 else 0.0

    async def admit_address(self, ip: str, bucket: str = "handshakes") -> tuple[float, RateDecision]:
        # One round trip instead of two: every handshake and relay request passes here.
        s = self.settings
        limit = s.handshakes_per_ip if bucket == "handshakes" else s.http_requests_per_ip
        locked, allowed, retry = await self.store.hit_window_unless_locked(
            self._key("lock", ip), self._key(bucket, ip), limit, s.handshake_window, time.time()
        )
        if locked > 0:
            return locked, _refused(locked)
        return 0.0, _allowed() if allowed else _refused(retry)

    async def record_failure(self, ip: str) -> None:
        s = self.settings
        # The threshold-th failure within the window locks (as in ``FailureLockout``): the
        # window holds the threshold - 1 failures before it, and refuses the one that locks.
        allowed = False
        if s.auth_failures_per_ip > 1:
            allowed, _ = await self.store.hit_window(
                self._key("fail", ip), s.auth_failures_per_ip - 1, s.auth_failure_window, time.time()
            )
        if not allowed and await self.locked_for(ip) == 0:
            await self._lock(
                keys=[self._key("lock", ip), self._key("level", ip)],
                args=[
                    math.ceil(s.auth_lockout * 1000),
                    math.ceil(s.auth_lockout_max * 1000),
                    math.ceil((s.auth_lockout_max + s.auth_failure_window) * 1000),
                ],
            )

    def take_message_now(self, principal: str) -> bool | None:
        window = int(time.time() // self.settings.message_window)
        current, left = self._budgets.get(principal, (window, 0))
        if current == window and left > 0:
            self._budgets[principal] = (window, left - 1)
            return True
        return None

    async def take_message(self, principal: str) -> RateDecision:
        s = self.settings
        now = time.time()
        window = int(now // s.message_window)
        current, left = self._budgets.get(principal, (window, 0))
        if current == window and left > 0:
            self._budgets[principal] = (window, left - 1)
            return _allowed()
        want = max(1, s.messages_per_principal // BUDGET_SHARE)
        try:
            granted = int(
                await self._draw(
                    keys=[self._key("msg", principal, str(window))],
                    args=[s.messages_per_principal, want, math.ceil(s.message_window * 2000)],
                )
            )
        except StoreUnavailable:
            return self._fallback.hit(principal)
        if granted <= 0:
            self._budgets.pop(principal, None)
            return _refused((window + 1) * s.message_window - now)
        self._budgets[principal] = (window, granted - 1)
        if len(self._budgets) > 10_000:
            self._budgets = {k: v for k, v in self._budgets.items() if v[0] == window}
        return _allowed()

    async def acquire(self, lease_id: str, slots: Sequence[Slot]) -> Slot | None:
        keys = [self._key("conn", slot.key) for slot in slots]
        try:
            full = await self.store.acquire_lease(
                [(key, slot.limit) for key, slot in zip(keys, slots, strict=True)],
                lease_id,
                self.instance,
                self.lease_ttl,
            )
        except (StoreUnavailable, asyncio.CancelledError):
            self._orphans[lease_id] = keys  # Redis may have taken it before the answer was lost
            raise
        if full is not None:
            return slots[keys.index(full)]
        self._leases[lease_id] = keys
        return None

    async def release(self, lease_id: str) -> None:
        keys = self._leases.pop(lease_id, None)
        if keys:
            try:
                await self.store.release_lease(keys, lease_id, instance=self.instance)
            except StoreUnavailable:
                log.warning("store unavailable: a connection lease is given back at the next renewal")
                self._orphans[lease_id] = keys

    async def count(self, key: str) -> int:
        return await self.store.lease_count(self._key("conn", key))
