"""In-memory rate limiting and failed-authentication lockout, with an injected clock.

Both classes are pure bookkeeping: no I/O, no tasks, no locks (they run on the event loop's
thread). Time comes from ``clock`` (``time.monotonic`` by default) so tests are exact.

:class:`SlidingWindowLimiter` uses the sliding-window-counter approximation: per key, the
count of the current fixed window and of the previous one; a hit at fraction ``f`` of the
current window sees ``previous * (1 - f) + current``. That is O(1) memory per key.

Guarantees, for a limit ``L`` and window ``W`` (what the tests check):

* within one aligned window ``[kW, (k+1)W)`` at most ``L`` is allowed (the estimate is never
  below the current count);
* hence within any interval of length ``W``, which meets at most two aligned windows, at most
  ``2L`` is allowed; the weighting keeps a boundary burst well under that in practice;
* over ``n`` consecutive aligned windows at most ``nL``;
* refused hits are not counted, so a client that waits ``retry_after`` is allowed again.

Keys beyond ``max_keys`` are evicted least-recently-used, so a flood of addresses cannot grow
memory without bound; an evicted key starts fresh. RFC 6585 section 4 (429 Too Many Requests)
and RFC 9110 section 10.2.3 (Retry-After) are where ``retry_after`` ends up.

:class:`FailureLockout` counts failed authentications per key and locks the key out after
``threshold`` failures within ``window``; while failures continue, each further failure after a
lockout locks again for twice as long (capped), and a full quiet ``window`` resets it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_KEYS",
    "Clock",
    "FailureLockout",
    "RateDecision",
    "SlidingWindowLimiter",
]

Clock = Callable[[], float]

DEFAULT_MAX_KEYS = 100_000
"""Keys a limiter remembers before it forgets the least recently used."""

# Absorbs float rounding in the weighted estimate (counts are integers, so this can never
# let a window's count exceed the limit).
_TOLERANCE = 1e-9
# Lockout doublings stop here; max_lockout caps the duration long before.
_MAX_DOUBLINGS = 64


def _require_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _require_positive_seconds(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")


def _whole_count(value: float) -> int:
    return max(0, math.floor(value + _TOLERANCE))


@dataclass(frozen=True, slots=True)
class RateDecision:
    """A limiter's answer.

    ``retry_after`` is 0 when allowed; when refused it is the seconds until the same hit
    would be allowed (if nothing else is recorded meanwhile), always > 0. ``remaining`` is
    how many unit hits would still be allowed right after this decision.
    """

    allowed: bool
    retry_after: float
    remaining: int


class _WindowCounts:
    """One key's state: the counts of fixed window ``index`` and of the one before it."""

    __slots__ = ("current", "index", "previous")

    def __init__(self, index: int) -> None:
        self.index = index
        self.previous = 0
        self.current = 0

    def estimate(self, position: float) -> float:
        """The weighted count at ``position`` (clock time divided by the window length)."""
        index = math.floor(position)
        if index < self.index:  # the clock went backwards: count everything, conservatively
            return float(self.previous + self.current)
        if index == self.index:
            return self.previous * (1.0 - (position - index)) + self.current
        if index == self.index + 1:
            return self.current * (1.0 - (position - index))
        return 0.0

    def add(self, position: float, cost: int) -> None:
        index = math.floor(position)
        if index == self.index + 1:
            self.previous, self.current = self.current, 0
        elif index > self.index + 1:
            self.previous, self.current = 0, 0
        self.index = max(index, self.index)
        self.current += cost


class SlidingWindowLimiter:
    """Allow at most about ``limit`` cost per ``window`` seconds per key (see module doc)."""

    __slots__ = ("_clock", "_counts", "_limit", "_max_keys", "_window")

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        _require_positive_int("limit", limit)
        _require_positive_seconds("window", window)
        _require_positive_int("max_keys", max_keys)
        self._limit = limit
        self._window = float(window)
        self._max_keys = max_keys
        self._clock = clock
        self._counts: OrderedDict[str, _WindowCounts] = OrderedDict()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def window(self) -> float:
        return self._window

    def __len__(self) -> int:
        """How many keys are remembered (at most ``max_keys``)."""
        return len(self._counts)

    def __repr__(self) -> str:
        return (
            f"SlidingWindowLimiter(limit={self._limit!r}, window={self._window!r}, "
            f"max_keys={self._max_keys!r})"
        )

    def hit(self, key: str, cost: int = 1) -> RateDecision:
        """Record a hit of ``cost`` for ``key`` if it is allowed; refused hits count nothing."""
        self._require_cost(cost)
        now = self._clock()
        position = now / self._window
        counts = self._counts.get(key)
        if counts is None:
            counts = _WindowCounts(math.floor(position))
            self._counts[key] = counts
            if len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        decision = self._decide(counts, now, cost)
        if decision.allowed:
            counts.add(position, cost)
        return decision

    def hit_one(self, key: str) -> bool:
        """``hit(key).allowed`` without building a decision: the per-message hot path. Call
        :meth:`peek` after a refusal for the ``retry_after``."""
        position = self._clock() / self._window
        counts = self._counts.get(key)
        if counts is None:
            counts = _WindowCounts(math.floor(position))
            self._counts[key] = counts
            if len(self._counts) > self._max_keys:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        if counts.estimate(position) <= self._limit - 1 + _TOLERANCE:
            counts.add(position, 1)
            return True
        return False

    def peek(self, key: str, cost: int = 1) -> RateDecision:
        """What :meth:`hit` would answer now, without recording anything."""
        self._require_cost(cost)
        counts = self._counts.get(key)
        if counts is None:
            return RateDecision(True, 0.0, self._limit - cost)
        return self._decide(counts, self._clock(), cost)

    def _require_cost(self, cost: int) -> None:
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= self._limit:
            raise ValueError(f"cost must be an integer from 1 to {self._limit}, got {cost!r}")

    def _allows(self, counts: _WindowCounts, now: float, cost: int) -> bool:
        return cost <= self._limit - counts.estimate(now / self._window) + _TOLERANCE

    def _decide(self, counts: _WindowCounts, now: float, cost: int) -> RateDecision:
        capacity = self._limit - counts.estimate(now / self._window)
        if cost <= capacity + _TOLERANCE:
            return RateDecision(True, 0.0, _whole_count(capacity - cost))
        return RateDecision(False, self._retry_after(counts, now, cost), _whole_count(capacity))

    def _retry_after(self, counts: _WindowCounts, now: float, cost: int) -> float:
        position = now / self._window
        index = max(math.floor(position), counts.index)
        if index == counts.index:
            previous, current = counts.previous, counts.current
        else:  # index == counts.index + 1 (further on, everything would be allowed)
            previous, current = counts.current, 0
        spare = self._limit - cost  # >= 0: the estimate must fall to this
        if current <= spare and previous > 0:
            # Later in this window: previous * (1 - f) + current <= spare.
            target = index + 1.0 - (spare - current) / previous
        else:
            # In the next window, where this window's count is weighted by (1 - g).
            target = index + 2.0 - spare / current
        wait = max(0.0, (target - position) * self._window)
        # Rounding must not refuse a client that waits exactly retry_after: check, nudge.
        step = self._window * 1e-9
        for _ in range(_MAX_DOUBLINGS):
            if wait > 0.0 and self._allows(counts, now + wait, cost):
                return wait
            wait += step
            step *= 2.0
        return wait  # pragma: no cover - the doublings pass two windows long before this


class _FailureRecord:
    """One key's failures: recent failure times, lockout level and lock end."""

    __slots__ = ("failures", "last_failure", "level", "locked_until")

    def __init__(self, threshold: int) -> None:
        self.failures: deque[float] = deque(maxlen=threshold)
        self.level = 0
        self.last_failure = -math.inf
        self.locked_until = -math.inf

    def is_quiet(self, now: float, window: float) -> bool:
        """True after a full ``window`` with neither a failure nor a lockout in force."""
        return now - max(self.last_failure, self.locked_until) >= window


class FailureLockout:
    """Lock a key (an address, a device, an account) out after repeated failed logins.

    * ``threshold`` failures within ``window`` seconds lock the key for ``base_lockout``;
    * after a lockout has ended, while failures continue (no quiet ``window``), every further
      failure locks again for twice the previous lockout, capped at ``max_lockout``
      (``base, 2 base, 4 base, ... max``);
    * a full ``window`` without failures and without a lockout in force resets everything;
    * :meth:`record_success` clears the key.

    A failure recorded while the key is locked does not lengthen the lockout (the caller
    should not have tried the credential), but keeps the key from counting as quiet.
    Keys beyond ``max_keys`` are evicted least-recently-used.
    """

    __slots__ = (
        "_base_lockout",
        "_clock",
        "_max_keys",
        "_max_lockout",
        "_records",
        "_threshold",
        "_window",
    )

    def __init__(
        self,
        threshold: int,
        window: float,
        base_lockout: float,
        max_lockout: float,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Clock = time.monotonic,
    ) -> None:
        _require_positive_int("threshold", threshold)
        _require_positive_seconds("window", window)
        _require_positive_seconds("base_lockout", base_lockout)
        _require_positive_seconds("max_lockout", max_lockout)
        _require_positive_int("max_keys", max_keys)
        if max_lockout < base_lockout:
            raise ValueError(
                f"max_lockout ({max_lockout!r}) must not be shorter than base_lockout ({base_lockout!r})"
            )
        self._threshold = threshold
        self._window = float(window)
        self._base_lockout = float(base_lockout)
        self._max_lockout = float(max_lockout)
        self._max_keys = max_keys
        self._clock = clock
        self._records: OrderedDict[str, _FailureRecord] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are remembered (at most ``max_keys``)."""
        return len(self._records)

    def __repr__(self) -> str:
        return (
            f"FailureLockout(threshold={self._threshold!r}, window={self._window!r}, "
            f"base_lockout={self._base_lockout!r}, max_lockout={self._max_lockout!r}, "
            f"max_keys={self._max_keys!r})"
        )

    def _current(self, key: str, now: float) -> _FailureRecord | None:
        record = self._records.get(key)
        if record is None:
            return None
        if record.is_quiet(now, self._window):
            del self._records[key]
            return None
        self._records.move_to_end(key)
        return record

    def record_failure(self, key: str) -> float:
        """Count a failed attempt; return the lockout in force now in seconds (0 if none)."""
        now = self._clock()
        record = self._current(key, now)
        if record is None:
            record = _FailureRecord(self._threshold)
            self._records[key] = record
            if len(self._records) > self._max_keys:
                self._records.popitem(last=False)
        record.last_failure = max(record.last_failure, now)
        if now < record.locked_until:
            return record.locked_until - now
        if record.level > 0:
            return self._lock(record, now)
        record.failures.append(now)
        while now - record.failures[0] >= self._window:
            record.failures.popleft()
        if len(record.failures) >= self._threshold:
            record.failures.clear()
            return self._lock(record, now)
        return 0.0

    def _lock(self, record: _FailureRecord, now: float) -> float:
        duration = min(self._base_lockout * 2.0**record.level, self._max_lockout)
        record.level = min(record.level + 1, _MAX_DOUBLINGS)
        record.locked_until = now + duration
        return duration

    def locked_for(self, key: str) -> float:
        """Seconds the key stays locked out (0 if it is not locked)."""
        now = self._clock()
        record = self._current(key, now)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - now)

    def record_success(self, key: str) -> None:
        """Forget the key's failures and lockout level (call after a successful login)."""
        self._records.pop(key, None)
