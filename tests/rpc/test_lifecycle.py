"""Tests for the connection lifecycle state machine."""

from __future__ import annotations

import copy
import itertools
import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardgate import errors
from wardgate.rpc.jsonrpc import encode_error_from
from wardgate.rpc.lifecycle import (
    TRANSITIONS,
    AlreadyInitialized,
    Event,
    Lifecycle,
    LifecycleError,
    NotInitialized,
    SessionClosed,
    ShuttingDown,
    State,
)

S = State
E = Event

# Written out by hand: the table in the module must say exactly this.
LEGAL: dict[tuple[State, Event], State] = {
    (S.AWAIT_INIT, E.INITIALIZE): S.READY,
    (S.AWAIT_INIT, E.CLOSE): S.CLOSED,
    (S.READY, E.INITIALIZED): S.READY,
    (S.READY, E.CALL): S.READY,
    (S.READY, E.SHUTDOWN): S.SHUTTING_DOWN,
    (S.READY, E.CLOSE): S.CLOSED,
    (S.SHUTTING_DOWN, E.CLOSE): S.CLOSED,
    (S.CLOSED, E.CLOSE): S.CLOSED,
}

REFUSAL: dict[State, tuple[type[LifecycleError], str]] = {
    S.AWAIT_INIT: (NotInitialized, "not_initialized"),
    S.READY: (AlreadyInitialized, "already_initialized"),
    S.SHUTTING_DOWN: (ShuttingDown, "shutting_down"),
    S.CLOSED: (SessionClosed, "closed"),
}

ILLEGAL = [pair for pair in itertools.product(State, Event) if pair not in LEGAL]

# Legal ways into each state.
PATHS: dict[State, list[list[Event]]] = {
    S.AWAIT_INIT: [[]],
    S.READY: [[E.INITIALIZE], [E.INITIALIZE, E.INITIALIZED], [E.INITIALIZE, E.CALL, E.CALL]],
    S.SHUTTING_DOWN: [[E.INITIALIZE, E.SHUTDOWN], [E.INITIALIZE, E.INITIALIZED, E.SHUTDOWN]],
    S.CLOSED: [[E.CLOSE], [E.INITIALIZE, E.CLOSE], [E.INITIALIZE, E.SHUTDOWN, E.CLOSE]],
}


def lifecycle_in(state: State, path_index: int = 0) -> Lifecycle:
    lifecycle = Lifecycle()
    for event in PATHS[state][path_index]:
        lifecycle.apply(event)
    assert lifecycle.state is state
    return lifecycle


def all_ways_in(state: State) -> list[Lifecycle]:
    return [lifecycle_in(state, i) for i in range(len(PATHS[state]))]


def test_starts_awaiting_initialize() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.state is S.AWAIT_INIT
    assert lifecycle.client_initialized is False
    assert repr(lifecycle) == "<Lifecycle AWAIT_INIT>"


def test_table_is_exactly_the_documented_one() -> None:
    assert dict(TRANSITIONS) == LEGAL


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[S.CLOSED, E.INITIALIZE] = S.READY  # type: ignore[index]


def test_every_state_reachable_and_refusal_reason_per_state() -> None:
    assert set(PATHS) == set(State) == set(REFUSAL)
    assert len({reason for _, reason in REFUSAL.values()}) == len(State)


@pytest.mark.parametrize(("pair", "target"), list(LEGAL.items()), ids=str)
def test_legal_transition(pair: tuple[State, Event], target: State) -> None:
    state, event = pair
    for lifecycle in all_ways_in(state):
        assert lifecycle.allows(event)
        assert lifecycle.apply(event) is target
        assert lifecycle.state is target


@pytest.mark.parametrize("pair", ILLEGAL, ids=str)
def test_illegal_transition(pair: tuple[State, Event]) -> None:
    state, event = pair
    cls, reason = REFUSAL[state]
    for lifecycle in all_ways_in(state):
        assert not lifecycle.allows(event)
        with pytest.raises(LifecycleError) as info:
            lifecycle.apply(event)
        exc = info.value
        assert type(exc) is cls
        assert isinstance(exc, errors.InvalidRequest)
        assert exc.reason == reason
        assert exc.event is event
        assert exc.state is state
        assert exc.__cause__ is None
        assert exc.__suppress_context__  # no KeyError from the table lookup in tracebacks
        assert lifecycle.state is state  # a refusal changes nothing


@pytest.mark.parametrize("pair", ILLEGAL, ids=str)
def test_refusal_text_for_logs_and_wire(pair: tuple[State, Event]) -> None:
    state, event = pair
    with pytest.raises(LifecycleError) as info:
        lifecycle_in(state).apply(event)
    exc = info.value
    # logs: event and state by name
    assert event.name in str(exc)
    assert state.name in str(exc)
    # wire: the fixed Invalid Request message, the reason, a fixed hint; no names
    wire = exc.rpc_error()
    assert wire == {
        "code": -32600,
        "message": "Invalid Request",
        "data": {"reason": REFUSAL[state][1], "hint": type(exc).hint_text},
    }
    assert exc.message == errors.InvalidRequest.message
    assert event.name not in json.dumps(wire)
    assert json.loads(encode_error_from(1, exc))["error"] == wire


def test_expected_reasons_named_in_the_brief() -> None:
    cases = [
        (S.AWAIT_INIT, E.CALL, "not_initialized"),
        (S.READY, E.INITIALIZE, "already_initialized"),
        (S.SHUTTING_DOWN, E.CALL, "shutting_down"),
        (S.CLOSED, E.CALL, "closed"),
    ]
    for state, event, reason in cases:
        with pytest.raises(LifecycleError) as info:
            lifecycle_in(state).apply(event)
        assert info.value.reason == reason


def test_initialized_is_idempotent() -> None:
    lifecycle = lifecycle_in(S.READY)
    assert lifecycle.client_initialized is False
    assert lifecycle.apply(E.INITIALIZED) is S.READY
    assert lifecycle.client_initialized is True
    assert lifecycle.apply(E.INITIALIZED) is S.READY  # a repeat is ignored, not an error
    assert lifecycle.client_initialized is True


def test_calls_do_not_wait_for_initialized() -> None:
    lifecycle = lifecycle_in(S.READY)
    assert lifecycle.apply(E.CALL) is S.READY
    assert lifecycle.client_initialized is False


def test_initialized_before_initialize_is_refused() -> None:
    lifecycle = Lifecycle()
    with pytest.raises(NotInitialized):
        lifecycle.apply(E.INITIALIZED)
    assert lifecycle.client_initialized is False


def test_close_is_idempotent_from_every_state() -> None:
    for state in State:
        lifecycle = lifecycle_in(state)
        assert lifecycle.apply(E.CLOSE) is S.CLOSED
        assert lifecycle.apply(E.CLOSE) is S.CLOSED


def test_happy_path() -> None:
    lifecycle = Lifecycle()
    states = [
        lifecycle.apply(event) for event in (E.INITIALIZE, E.INITIALIZED, E.CALL, E.CALL, E.SHUTDOWN, E.CLOSE)
    ]
    assert states == [S.READY, S.READY, S.READY, S.READY, S.SHUTTING_DOWN, S.CLOSED]


@pytest.mark.parametrize("pair", ILLEGAL, ids=str)
def test_error_survives_copy_and_pickle(pair: tuple[State, Event]) -> None:
    state, event = pair
    with pytest.raises(LifecycleError) as info:
        lifecycle_in(state).apply(event)
    for clone in (copy.copy(info.value), pickle.loads(pickle.dumps(info.value))):  # noqa: S301
        assert type(clone) is type(info.value)
        assert (clone.event, clone.state) == (event, state)
        assert str(clone) == str(info.value)
        assert clone.rpc_error() == info.value.rpc_error()


@given(st.lists(st.sampled_from(Event), max_size=30))
def test_random_event_sequences_follow_the_table(events: list[Event]) -> None:
    lifecycle = Lifecycle()
    model = S.AWAIT_INIT
    seen_initialized = False
    for event in events:
        target = LEGAL.get((model, event))
        assert lifecycle.allows(event) is (target is not None)
        if target is None:
            with pytest.raises(LifecycleError) as info:
                lifecycle.apply(event)
            assert info.value.reason == REFUSAL[model][1]
        else:
            assert lifecycle.apply(event) is target
            seen_initialized |= event is E.INITIALIZED
            model = target
        assert lifecycle.state is model
        assert lifecycle.client_initialized is seen_initialized
