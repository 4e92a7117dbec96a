"""The connection lifecycle: one enum of states, one enum of events, one transition table.

No I/O. The session feeds it one :class:`Event` per message and acts on the new
:class:`State`; an illegal event raises a :class:`LifecycleError` naming the event and the state.

::

    AWAIT_INIT ──INITIALIZE──► READY ──SHUTDOWN──► SHUTTING_DOWN
                               ↺ INITIALIZED, CALL
    (any state) ──CLOSE──► CLOSED

Decisions:

* ``INITIALIZE`` means a *successful* ``initialize``: the session checks :meth:`Lifecycle.allows`
  first and applies the event once the credentials are verified, so a failed attempt leaves the
  connection in ``AWAIT_INIT`` (the initialize deadline still runs).
* ``INITIALIZED`` (the client's notification) is legal in ``READY`` and idempotent: the first one
  sets :attr:`Lifecycle.client_initialized`, a repeat changes nothing and is not an error.
  ``CALL`` does not wait for it (clients that skip the notification keep working).
* ``CLOSE`` is legal everywhere, ``CLOSED`` included, because several disconnect paths (peer
  close, deadline, revocation, slow consumer) may race to close one connection.
* The refusal depends on the state alone: ``AWAIT_INIT`` refuses with ``not_initialized``,
  ``READY`` (only ``INITIALIZE`` is illegal there) with ``already_initialized``,
  ``SHUTTING_DOWN`` with ``shutting_down`` and ``CLOSED`` with ``closed``.
* A refused notification (``INITIALIZED`` before ``initialize``) is never answered (JSON-RPC 2.0
  section 4.1); the session logs it and drops it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Final

from wardgate.errors import InvalidRequest

__all__ = [
    "TRANSITIONS",
    "AlreadyInitialized",
    "Event",
    "Lifecycle",
    "LifecycleError",
    "NotInitialized",
    "SessionClosed",
    "ShuttingDown",
    "State",
]


class State(enum.Enum):
    AWAIT_INIT = "await_init"
    READY = "ready"
    SHUTTING_DOWN = "shutting_down"
    CLOSED = "closed"


class Event(enum.Enum):
    INITIALIZE = "initialize"  # a successful `initialize` request
    INITIALIZED = "initialized"  # the client's `initialized` notification
    CALL = "call"  # any other method
    SHUTDOWN = "shutdown"  # the `shutdown` request
    CLOSE = "close"  # the connection ends, for any reason


TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = MappingProxyType(
    {
        (State.AWAIT_INIT, Event.INITIALIZE): State.READY,
        (State.AWAIT_INIT, Event.CLOSE): State.CLOSED,
        (State.READY, Event.INITIALIZED): State.READY,
        (State.READY, Event.CALL): State.READY,
        (State.READY, Event.SHUTDOWN): State.SHUTTING_DOWN,
        (State.READY, Event.CLOSE): State.CLOSED,
        (State.SHUTTING_DOWN, Event.CLOSE): State.CLOSED,
        (State.CLOSED, Event.CLOSE): State.CLOSED,
    }
)
"""Every legal (state, event) pair and the state it leads to; any other pair is refused."""


class LifecycleError(InvalidRequest):
    """An event the current state does not allow; the peer broke the protocol.

    On the wire it is an Invalid Request (-32600) with the fixed message and
    ``data: {"reason": <subclass reason>, "hint": <fixed hint>}``; ``str()`` names the
    event and the state for logs. One subclass per reason; :meth:`Lifecycle.apply` raises them.
    """

    hint_text: ClassVar[str] = "This request is not allowed now."

    def __init__(self, event: Event, state: State) -> None:
        super().__init__(self.hint_text)
        self.event = event
        self.state = state
        self.args = (event, state)  # so that copy and pickle rebuild it

    def __str__(self) -> str:
        return f"{self.event.name} is not allowed in state {self.state.name} ({self.reason})"


class NotInitialized(LifecycleError):
    reason = "not_initialized"
    hint_text = "Send 'initialize' first."


class AlreadyInitialized(LifecycleError):
    reason = "already_initialized"
    hint_text = "The session is already initialized."


class ShuttingDown(LifecycleError):
    reason = "shutting_down"
    hint_text = "The session is shutting down."


class SessionClosed(LifecycleError):
    reason = "closed"
    hint_text = "The session is closed."


_REFUSALS: Final[Mapping[State, type[LifecycleError]]] = MappingProxyType(
    {
        State.AWAIT_INIT: NotInitialized,
        State.READY: AlreadyInitialized,
        State.SHUTTING_DOWN: ShuttingDown,
        State.CLOSED: SessionClosed,
    }
)


class Lifecycle:
    """The lifecycle of one connection, starting in ``AWAIT_INIT``."""

    __slots__ = ("_client_initialized", "_state")

    def __init__(self) -> None:
        self._state = State.AWAIT_INIT
        self._client_initialized = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def client_initialized(self) -> bool:
        """Whether the client's ``initialized`` notification has arrived (informational)."""
        return self._client_initialized

    def allows(self, event: Event) -> bool:
        """Whether :meth:`apply` would accept ``event`` now."""
        return (self._state, event) in TRANSITIONS

    def apply(self, event: Event) -> State:
        """Move to the next state and return it; raise a :class:`LifecycleError` if illegal."""
        try:
            new_state = TRANSITIONS[self._state, event]
        except KeyError:
            raise _REFUSALS[self._state](event, self._state) from None
        if event is Event.INITIALIZED:
            self._client_initialized = True
        self._state = new_state
        return new_state

    def __repr__(self) -> str:
        return f"<Lifecycle {self._state.name}>"
