"""Tests for wardgate.ratelimit: the sliding-window-counter limiter and failure lockout."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.ratelimit import FailureLockout, RateDecision, SlidingWindowLimiter


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- constructor validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"limit": 0, "window": 1.0}, "limit"),
        ({"limit": -1, "window": 1.0}, "limit"),
        ({"limit": 1.5, "window": 1.0}, "limit"),
        ({"limit": True, "window": 1.0}, "limit"),
        ({"limit": 1, "window": 0}, "window"),
        ({"limit": 1, "window": -1.0}, "window"),
        ({"limit": 1, "window": math.inf}, "window"),
        ({"limit": 1, "window": math.nan}, "window"),
        ({"limit": 1, "window": "1"}, "window"),
        ({"limit": 1, "window": 1.0, "max_keys": 0}, "max_keys"),
    ],
)
def test_limiter_validates_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        SlidingWindowLimiter(**kwargs)


@pytest.mark.parametrize("cost", [0, -1, 4, True, 1.0])
def test_limiter_validates_cost(cost: Any) -> None:
    limiter = SlidingWindowLimiter(3, 1.0, clock=FakeClock())
    with pytest.raises(ValueError, match="cost must be an integer from 1 to 3"):
        limiter.hit("k", cost)
    with pytest.raises(ValueError, match="cost must be"):
        limiter.peek("k", cost)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 60.0, 1.0, 10.0), "threshold"),
        ((3, 0.0, 1.0, 10.0), "window"),
        ((3, 60.0, 0.0, 10.0), "base_lockout"),
        ((3, 60.0, -1.0, 10.0), "base_lockout"),
        ((3, 60.0, 1.0, math.inf), "max_lockout"),
        ((3, 60.0, 1.0, math.nan), "max_lockout"),
        ((3, 60.0, 10.0, 1.0), "max_lockout"),
    ],
)
def test_lockout_validates_arguments(args: tuple[Any, ...], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        FailureLockout(*args)
    with pytest.raises(ValueError, match=r"^max_keys"):
        FailureLockout(3, 60.0, 1.0, 10.0, max_keys=0)


# --- SlidingWindowLimiter -----------------------------------------------------------------


def test_limit_then_refuse() -> None:
    clock = FakeClock(1000.0)
    limiter = SlidingWindowLimiter(3, 10.0, clock=clock)
    assert [limiter.hit("a") for _ in range(3)] == [
        RateDecision(True, 0.0, 2),
        RateDecision(True, 0.0, 1),
        RateDecision(True, 0.0, 0),
    ]
    refused = limiter.hit("a")
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after > 0
    assert limiter.hit("b").allowed  # keys are independent


def test_retry_after_is_exact_and_sufficient() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(2, 10.0, clock=clock)
    limiter.hit("a")
    limiter.hit("a")
    refused = limiter.hit("a")
    # Next window at fraction g: 2 * (1 - g) + 1 <= 2 when g >= 0.5, i.e. t = 15.
    assert refused.retry_after == pytest.approx(15.0, abs=1e-6)
    clock.now = 14.9
    assert not limiter.hit("a").allowed
    clock.now = refused.retry_after
    assert limiter.hit("a") == RateDecision(True, 0.0, 0)


def test_previous_window_is_weighted_by_overlap() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(10, 60.0, clock=clock)
    for _ in range(10):
        assert limiter.hit("a").allowed
    clock.now = 60.0  # start of the next window: the previous 10 still weigh fully
    assert not limiter.hit("a").allowed
    clock.now = 90.0  # half way: they weigh 5
    assert limiter.peek("a") == RateDecision(True, 0.0, 4)
    assert [limiter.hit("a").allowed for _ in range(6)] == [True] * 5 + [False]


def test_refused_hits_are_not_counted() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(1, 1.0, clock=clock)
    assert limiter.hit("a").allowed
    first = limiter.hit("a")
    for _ in range(100):
        assert limiter.hit("a") == first
    clock.advance(first.retry_after)
    assert limiter.hit("a").allowed


def test_idle_key_starts_fresh_after_two_windows() -> None:
    clock = FakeClock(5.0)
    limiter = SlidingWindowLimiter(4, 1.0, clock=clock)
    limiter.hit("a", 4)
    clock.advance(2.0)
    assert limiter.hit("a", 4) == RateDecision(True, 0.0, 0)


def test_cost() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(10, 1.0, clock=clock)
    assert limiter.hit("a", 7) == RateDecision(True, 0.0, 3)
    refused = limiter.hit("a", 4)
    assert not refused.allowed
    assert refused.remaining == 3
    assert limiter.hit("a", 3) == RateDecision(True, 0.0, 0)


def test_peek_does_not_consume_or_create() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(2, 1.0, clock=clock)
    assert limiter.peek("a") == RateDecision(True, 0.0, 1)
    assert len(limiter) == 0
    limiter.hit("a")
    assert limiter.peek("a") == limiter.peek("a") == RateDecision(True, 0.0, 0)
    limiter.hit("a")
    assert not limiter.peek("a").allowed


def test_least_recently_used_keys_are_evicted() -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(1, 60.0, max_keys=2, clock=clock)
    limiter.hit("a")
    limiter.hit("b")
    assert not limiter.hit("a").allowed  # refreshes "a"
    limiter.hit("c")  # evicts "b", the least recently used
    assert len(limiter) == 2
    assert limiter.hit("b").allowed  # "b" starts fresh; "a" is evicted now
    assert limiter.hit("a").allowed


def test_clock_going_backwards_is_conservative() -> None:
    clock = FakeClock(100.0)
    limiter = SlidingWindowLimiter(2, 10.0, clock=clock)
    limiter.hit("a")
    clock.now = 50.0
    assert limiter.hit("a") == RateDecision(True, 0.0, 0)
    refused = limiter.hit("a")
    assert not refused.allowed
    assert refused.retry_after > 0
    clock.advance(refused.retry_after)
    assert limiter.hit("a").allowed


def test_limiter_repr_and_properties() -> None:
    limiter = SlidingWindowLimiter(5, 2, max_keys=9)
    assert (limiter.limit, limiter.window) == (5, 2.0)
    assert repr(limiter) == "SlidingWindowLimiter(limit=5, window=2.0, max_keys=9)"


def test_retry_after_survives_float_rounding_on_a_large_clock() -> None:
    """Near 2**33 s a float step is ~2e-6 s: the exact wait can round short, so it is nudged."""
    clock = FakeClock(2.0**33 + 0.5)
    limiter = SlidingWindowLimiter(6, 0.7, clock=clock)
    refused = 0
    for _ in range(200):
        clock.advance(0.05)
        decision = limiter.hit("k")
        if not decision.allowed:
            refused += 1
            clock.advance(decision.retry_after)
            assert limiter.hit("k").allowed
    assert refused > 0


def test_a_boundary_burst_stays_under_twice_the_limit() -> None:
    """The worst case the 2 * limit bound allows is nearly reached at a window boundary."""
    clock = FakeClock(63 / 64)
    limiter = SlidingWindowLimiter(10, 1.0, clock=clock)
    allowed = [clock.now for _ in range(20) if limiter.hit("k").allowed]
    assert len(allowed) == 10
    for tick in range(64):
        clock.now = 1.0 + tick / 64
        if limiter.hit("k").allowed:
            allowed.append(clock.now)
    assert sum(1 for at in allowed if 63 / 64 <= at < 1 + 63 / 64) == 19


# Times are multiples of 1/64 s and windows powers of two, so every float below is exact and
# "which aligned window" is the same question for the test and for the limiter.
_TICKS = st.lists(
    st.tuples(st.integers(min_value=0, max_value=160), st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150)
@given(
    st.integers(min_value=1, max_value=6),
    st.sampled_from([0.5, 1.0, 4.0]),
    _TICKS,
)
def test_allowed_cost_bounds(limit: int, window: float, steps: list[tuple[int, int]]) -> None:
    """The exact guarantees: <= limit per aligned window, <= 2 * limit per any window."""
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(limit, window, clock=clock)
    allowed: list[tuple[float, int]] = []
    for ticks, cost in steps:
        clock.advance(ticks / 64)
        cost = min(cost, limit)
        if limiter.hit("k", cost).allowed:
            allowed.append((clock.now, cost))
    per_window: dict[int, int] = {}
    for at, cost in allowed:
        per_window[math.floor(at / window)] = per_window.get(math.floor(at / window), 0) + cost
    assert max(per_window.values()) <= limit
    for start, _ in allowed:
        in_window = sum(cost for at, cost in allowed if start <= at < start + window)
        assert in_window <= 2 * limit
    first, last = min(per_window), max(per_window)
    assert sum(per_window.values()) <= (last - first + 1) * limit


@given(
    st.integers(min_value=1, max_value=50),
    st.floats(min_value=0.01, max_value=1000.0),
    st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=60),
    st.floats(min_value=0.0, max_value=1e12),
)
def test_waiting_retry_after_is_enough(limit: int, window: float, gaps: list[float], start: float) -> None:
    clock = FakeClock(start)
    limiter = SlidingWindowLimiter(limit, window, clock=clock)
    for gap in gaps:
        clock.advance(gap * window / limit)
        decision = limiter.hit("k")
        if not decision.allowed:
            assert decision.retry_after > 0
            assert decision.remaining == 0
            assert limiter.peek("k") == decision  # refused hits change nothing
            clock.advance(decision.retry_after)
            assert limiter.hit("k").allowed


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(min_value=0, max_value=64)), max_size=80))
def test_peek_predicts_hit(steps: list[tuple[str, int]]) -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(3, 1.0, clock=clock)
    for key, ticks in steps:
        clock.advance(ticks / 64)
        predicted = limiter.peek(key)
        assert limiter.hit(key) == predicted
        assert 0 <= predicted.remaining <= 3


@given(st.integers(min_value=1, max_value=20), st.lists(st.integers(0, 200), max_size=300))
def test_memory_is_bounded_by_max_keys(max_keys: int, keys: list[int]) -> None:
    clock = FakeClock(0.0)
    limiter = SlidingWindowLimiter(1, 1.0, max_keys=max_keys, clock=clock)
    for key in keys:
        limiter.hit(str(key))
        assert len(limiter) <= max_keys
        # the key just used is never the one evicted
        assert limiter.peek(str(key)) != RateDecision(True, 0.0, 0)


# --- FailureLockout -----------------------------------------------------------------------


def _lockout(clock: FakeClock, **kwargs: Any) -> FailureLockout:
    settings: dict[str, Any] = {
        "threshold": 3,
        "window": 60.0,
        "base_lockout": 10.0,
        "max_lockout": 80.0,
    }
    settings.update(kwargs)
    return FailureLockout(clock=clock, **settings)


def test_threshold_then_base_lockout() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock)
    assert lockout.record_failure("a") == 0.0
    clock.advance(1)
    assert lockout.record_failure("a") == 0.0
    assert lockout.locked_for("a") == 0.0
    clock.advance(1)
    assert lockout.record_failure("a") == 10.0
    assert lockout.locked_for("a") == 10.0
    assert lockout.locked_for("b") == 0.0
    clock.advance(3)
    assert lockout.locked_for("a") == 7.0
    assert lockout.record_failure("a") == 7.0  # a failure while locked does not extend it
    clock.advance(7)
    assert lockout.locked_for("a") == 0.0


def test_lockouts_double_while_failures_continue_and_cap() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock)
    for _ in range(3):
        lockout.record_failure("a")
    durations = [10.0]
    for _ in range(5):
        clock.advance(lockout.locked_for("a") + 1.0)
        durations.append(lockout.record_failure("a"))
    assert durations == [10.0, 20.0, 40.0, 80.0, 80.0, 80.0]


def test_a_quiet_window_resets_escalation() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock)
    for _ in range(3):
        lockout.record_failure("a")
    clock.advance(10.0 + 1.0)
    assert lockout.record_failure("a") == 20.0
    clock.advance(20.0 + 60.0)  # the lockout ends, then a full quiet window
    assert lockout.record_failure("a") == 0.0
    assert lockout.record_failure("a") == 0.0
    assert lockout.record_failure("a") == 10.0


def test_failures_spread_wider_than_the_window_do_not_lock() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock, threshold=2)
    for _ in range(5):
        assert lockout.record_failure("a") == 0.0
        clock.advance(60.0)


def test_only_failures_within_the_window_count() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock)
    for at in (0.0, 50.0, 100.0):  # the first is 100 s old by the third
        clock.now = at
        assert lockout.record_failure("a") == 0.0
    clock.now = 105.0
    assert lockout.record_failure("a") == 10.0


def test_failures_just_inside_the_window_lock() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock, threshold=2)
    assert lockout.record_failure("a") == 0.0
    clock.advance(59.9)
    assert lockout.record_failure("a") == 10.0


def test_success_clears() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock)
    for _ in range(3):
        lockout.record_failure("a")
    lockout.record_success("a")
    lockout.record_success("never-seen")
    assert lockout.locked_for("a") == 0.0
    assert len(lockout) == 0
    assert lockout.record_failure("a") == 0.0


def test_threshold_one_locks_on_the_first_failure() -> None:
    lockout = _lockout(FakeClock(0.0), threshold=1)
    assert lockout.record_failure("a") == 10.0


def test_lockout_keys_are_evicted_least_recently_used() -> None:
    clock = FakeClock(0.0)
    lockout = _lockout(clock, threshold=1, max_keys=2)
    lockout.record_failure("a")
    lockout.record_failure("b")
    lockout.locked_for("a")  # refreshes "a"
    lockout.record_failure("c")
    assert len(lockout) == 2
    assert lockout.locked_for("b") == 0.0
    assert lockout.locked_for("a") == 10.0


def test_lockout_repr() -> None:
    assert repr(FailureLockout(3, 60, 10, 80)) == (
        "FailureLockout(threshold=3, window=60.0, base_lockout=10.0, max_lockout=80.0, max_keys=100000)"
    )


@given(
    st.integers(min_value=1, max_value=5),
    st.floats(min_value=0.1, max_value=100.0),
    st.floats(min_value=1.0, max_value=1000.0),
    st.lists(st.floats(min_value=0.0, max_value=0.99), min_size=1, max_size=30),
)
def test_lockout_durations_double_then_cap(
    threshold: int, base: float, factor: float, gaps: list[float]
) -> None:
    """A client that fails again soon after every lockout sees base, 2 base, ... max."""
    window = 60.0
    cap = base * factor
    clock = FakeClock(0.0)
    lockout = FailureLockout(threshold, window, base, cap, clock=clock)
    for _ in range(threshold - 1):
        assert lockout.record_failure("k") == 0.0
    durations = [lockout.record_failure("k")]
    for gap in gaps:
        clock.advance(durations[-1] + gap * window)
        assert lockout.locked_for("k") == 0.0
        durations.append(lockout.record_failure("k"))
    expected = [min(base * 2.0**level, cap) for level in range(len(durations))]
    assert durations == pytest.approx(expected)
    assert all(a <= b for a, b in itertools.pairwise(durations))
    assert max(durations) <= cap


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fail", "succeed", "check"]),
            st.sampled_from("abcd"),
            st.floats(min_value=0.0, max_value=50.0),
        ),
        max_size=80,
    )
)
def test_lockout_stays_within_bounds(steps: list[tuple[str, str, float]]) -> None:
    clock = FakeClock(0.0)
    lockout = FailureLockout(2, 30.0, 5.0, 40.0, max_keys=3, clock=clock)
    for action, key, gap in steps:
        clock.advance(gap)
        if action == "fail":
            assert 0.0 <= lockout.record_failure(key) <= 40.0
        elif action == "succeed":
            lockout.record_success(key)
            assert lockout.locked_for(key) == 0.0
        assert 0.0 <= lockout.locked_for(key) <= 40.0
        assert len(lockout) <= 3


@given(
    limit=st.integers(min_value=1, max_value=20),
    steps=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.7), st.sampled_from(["a", "b"])), max_size=80
    ),
)
def test_hit_one_answers_exactly_as_hit(limit: int, steps: list[tuple[float, str]]) -> None:
    clock_a, clock_b = FakeClock(0.0), FakeClock(0.0)
    full = SlidingWindowLimiter(limit, 1.0, clock=clock_a)
    fast = SlidingWindowLimiter(limit, 1.0, clock=clock_b)
    for advance, key in steps:
        clock_a.advance(advance)
        clock_b.advance(advance)
        assert fast.hit_one(key) is full.hit(key).allowed
        assert fast.peek(key) == full.peek(key)
