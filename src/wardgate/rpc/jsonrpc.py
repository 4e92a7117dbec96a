"""The JSON-RPC 2.0 wire codec: bytes in, plain values out. No I/O.

Implements https://www.jsonrpc.org/specification exactly, on both sides:

* server side: :func:`parse_message` turns one WebSocket message into an :class:`Incoming`
  (requests to dispatch and :class:`ErrorReply` entries to answer without dispatch), and the
  ``encode_*`` functions build the replies;
* client side: :func:`encode_request` / :func:`encode_notification` build calls and
  :func:`parse_response` reads what the server sends back.

Rules the specification leaves to the implementation, decided here:

* Unknown members of a request object are ignored (spec section 4 does not forbid them).
* ``"id": null`` is a request with a null id (legal, section 4, though discouraged); only an
  absent ``"id"`` member makes a notification (section 4.1).
* A method name starting with ``rpc.`` (:data:`RESERVED_PREFIX`) parses normally; the
  registry answers it with Method not found (section 4).
* A Response object sent to the server (``result``/``error`` and no ``method``) is an
  Invalid Request.
* An invalid entry is answered with the id read from it when that id is itself valid, else
  with a null id (section 5: "If there was an error in detecting the id ... it MUST be Null").
* Numbers msgspec cannot represent (``1e400``), lone surrogates (``"\\ud800"``), invalid UTF-8
  and nesting deeper than the interpreter's recursion limit are Parse errors.
* Ids are echoed as decoded: strings and integers of any size exactly; floats by value (``1.0``
  stays ``1.0`` and ``-0.0`` stays ``-0.0``, but ``1E2`` comes back as ``100.0``).
* Every :class:`ErrorReply` carries ``data: {"reason": ...}`` naming the defect with a fixed
  string (the ``*_REASON`` constants below); never any of the input.
* A batch longer than :data:`MAX_BATCH` is refused as a whole with one Invalid Request
  (reason ``batch_too_large``), as is an empty batch (section 6); neither is a batch reply.

Speed: a typed msgspec decoder validates the common case (a valid request, or a batch of
valid requests) in C. Anything it refuses goes to the general path, which is the
specification as written and alone decides every error; the typed path only ever accepts
what the general path accepts, with the same result (a property test checks this).
The value types are frozen ``msgspec.Struct`` classes rather than frozen dataclasses: same
attributes, equality, repr and ``match`` support, but one is built in about 105 ns against
770 ns for a frozen slots dataclass on this machine, which was most of the cost of a parse.
Both paths decode a whole batch before counting it; the message size cap, applied before
parsing, bounds that work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final, Literal, TypeAlias

import msgspec

from wardgate.errors import (
    INVALID_REQUEST,
    PARSE_ERROR,
    InvalidRequest,
    ParseError,
    ProtocolError,
    WardgateError,
)

__all__ = [
    "BATCH_TOO_LARGE_REASON",
    "EMPTY_BATCH_REASON",
    "INVALID_ID_REASON",
    "INVALID_METHOD_REASON",
    "INVALID_PARAMS_TYPE_REASON",
    "INVALID_VERSION_REASON",
    "MAX_BATCH",
    "NOT_AN_OBJECT_REASON",
    "PARSE_ERROR_REASON",
    "RESERVED_PREFIX",
    "RESPONSE_OBJECT_REASON",
    "ErrorObject",
    "ErrorReply",
    "Incoming",
    "InvalidResponse",
    "JsonId",
    "Notification",
    "Params",
    "Request",
    "Response",
    "ServerMessage",
    "encode_batch",
    "encode_error",
    "encode_error_from",
    "encode_notification",
    "encode_request",
    "encode_result",
    "parse_message",
    "parse_response",
]

JsonId: TypeAlias = str | int | float | None
"""A request id: a string, a number or null (spec section 4). Never a bool."""

Params: TypeAlias = dict[str, Any] | list[Any] | None
"""By-name params, positional params, or none (the ``params`` member was absent)."""

MAX_BATCH: Final = 100
"""Most entries one batch may hold (the default of ``parse_message(max_batch=...)``).

Each entry costs a dispatch, so this bounds the work one message can ask for; the session
passes the configured limit. The message size cap applies before parsing, separately.
"""

RESERVED_PREFIX: Final = "rpc."
"""Method names with this prefix are reserved for rpc-internal methods (spec section 4)."""

# The `data.reason` of each ErrorReply parse_message can produce.
PARSE_ERROR_REASON: Final = "parse_error"
EMPTY_BATCH_REASON: Final = "empty_batch"
BATCH_TOO_LARGE_REASON: Final = "batch_too_large"
NOT_AN_OBJECT_REASON: Final = "not_an_object"
INVALID_ID_REASON: Final = "invalid_id"
RESPONSE_OBJECT_REASON: Final = "response_object"
INVALID_VERSION_REASON: Final = "invalid_version"
INVALID_METHOD_REASON: Final = "invalid_method"
INVALID_PARAMS_TYPE_REASON: Final = "invalid_params_type"

_VERSION: Final = "2.0"
_ID_TYPES: Final = (str, int, float)  # checked with `type(x) in`, so bool is not an int here
_PARAMS_TYPES: Final = (dict, list)
# What a decoder may raise on hostile input: malformed JSON and out-of-range numbers
# (DecodeError, ValidationError), a str holding lone surrogates (UnicodeEncodeError), nesting
# deeper than the recursion limit (RecursionError).
_DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeError, RecursionError)


# --- server side: what arrives -----------------------------------------------------------


class Request(msgspec.Struct, frozen=True):
    """A valid request or notification, ready to dispatch.

    ``id`` is None both for a notification and for an explicit ``"id": null``;
    ``is_notification`` tells them apart (a notification is never answered, section 4.1).
    """

    method: str
    params: Params
    id: JsonId
    is_notification: bool

    @property
    def is_reserved(self) -> bool:
        """True for an ``rpc.`` method name, which is answered with Method not found."""
        return self.method.startswith(RESERVED_PREFIX)


class ErrorReply(msgspec.Struct, frozen=True):
    """An entry to answer with an error without dispatching it.

    Always answered, even when it looked like a notification (section 5).
    """

    id: JsonId
    code: int
    message: str
    data: dict[str, Any] | None = None

    def encode(self) -> bytes:
        """The Response object for this entry."""
        return encode_error(self.id, self.code, self.message, self.data)


class Incoming(msgspec.Struct, frozen=True):
    """One parsed message: its entries in order, and whether it was a batch.

    When ``is_batch`` is true the replies (from non-notifications) go back as one array,
    or nothing at all when there are none (section 6; see :func:`encode_batch`). When false,
    ``items`` holds exactly one entry.
    """

    items: tuple[Request | ErrorReply, ...]
    is_batch: bool


class _WireRequest(msgspec.Struct):
    """The typed fast path's view of a valid request object (unknown members ignored)."""

    jsonrpc: Literal["2.0"]
    method: str
    params: dict[str, Any] | list[Any] | msgspec.UnsetType = msgspec.UNSET
    id: JsonId | msgspec.UnsetType = msgspec.UNSET


_any_decoder: Final = msgspec.json.Decoder()
_request_decoder: Final = msgspec.json.Decoder(_WireRequest | list[_WireRequest])


def parse_message(data: bytes | str, *, max_batch: int = MAX_BATCH) -> Incoming:
    """Parse one message from a client. Never raises on any input bytes or text.

    Invalid JSON gives one Parse error (-32700); an empty batch, a batch longer than
    ``max_batch`` or a top level that is neither object nor array gives one Invalid Request
    (-32600); in a batch, each invalid entry gives its own Invalid Request (section 6).
    """
    try:
        wire = _request_decoder.decode(data)
    except _DECODE_ERRORS:
        return _parse_general(data, max_batch)
    if type(wire) is list:
        if not wire or len(wire) > max_batch:
            return _batch_refused(len(wire))
        return Incoming(tuple([_from_wire(entry) for entry in wire]), True)
    return Incoming((_from_wire(wire),), False)


def _from_wire(wire: _WireRequest) -> Request:
    params = wire.params
    id_ = wire.id
    if id_ is msgspec.UNSET:
        return Request(wire.method, None if params is msgspec.UNSET else params, None, True)
    return Request(wire.method, None if params is msgspec.UNSET else params, id_, False)


def _parse_general(data: bytes | str, max_batch: int) -> Incoming:
    """The specification as written; decides every message the fast path refused."""
    try:
        value = _any_decoder.decode(data)
    except _DECODE_ERRORS:
        return Incoming(
            (ErrorReply(None, PARSE_ERROR, ParseError.message, {"reason": PARSE_ERROR_REASON}),),
            False,
        )
    if type(value) is list:
        if not value or len(value) > max_batch:
            return _batch_refused(len(value))
        return Incoming(tuple([_parse_entry(entry) for entry in value]), True)
    return Incoming((_parse_entry(value),), False)


def _batch_refused(length: int) -> Incoming:
    reason = EMPTY_BATCH_REASON if length == 0 else BATCH_TOO_LARGE_REASON
    return Incoming((_invalid(None, reason),), False)


def _invalid(id_: JsonId, reason: str) -> ErrorReply:
    return ErrorReply(id_, INVALID_REQUEST, InvalidRequest.message, {"reason": reason})


def _parse_entry(obj: Any) -> Request | ErrorReply:
    """Check one decoded value against section 4. Checks run in the order of the reasons."""
    if type(obj) is not dict:
        return _invalid(None, NOT_AN_OBJECT_REASON)
    if "id" in obj:
        id_ = obj["id"]
        if id_ is not None and type(id_) not in _ID_TYPES:
            return _invalid(None, INVALID_ID_REASON)
        is_notification = False
    else:
        id_ = None
        is_notification = True
    if "method" not in obj and ("result" in obj or "error" in obj):
        return _invalid(id_, RESPONSE_OBJECT_REASON)
    if obj.get("jsonrpc") != _VERSION:
        return _invalid(id_, INVALID_VERSION_REASON)
    method = obj.get("method")
    if type(method) is not str:
        return _invalid(id_, INVALID_METHOD_REASON)
    params = obj.get("params", msgspec.UNSET)
    if params is msgspec.UNSET:
        params = None
    elif type(params) not in _PARAMS_TYPES:
        return _invalid(id_, INVALID_PARAMS_TYPE_REASON)
    return Request(method, params, id_, is_notification)


# --- server side: what goes out ----------------------------------------------------------


class _ErrorMember(msgspec.Struct):
    code: int
    message: str
    data: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class _ResultEnvelope(msgspec.Struct):
    jsonrpc: str
    id: JsonId
    result: Any


class _ErrorEnvelope(msgspec.Struct):
    jsonrpc: str
    id: JsonId
    error: _ErrorMember | dict[str, Any]


class _CallEnvelope(msgspec.Struct):
    jsonrpc: str
    method: str
    params: dict[str, Any] | list[Any] | msgspec.UnsetType = msgspec.UNSET
    id: JsonId | msgspec.UnsetType = msgspec.UNSET


_encoder: Final = msgspec.json.Encoder()


def encode_result(id: JsonId, result: Any) -> bytes:
    """A success Response. ``result`` must be JSON-encodable (else TypeError)."""
    return _encoder.encode(_ResultEnvelope(_VERSION, id, result))


def encode_error(
    id: JsonId,
    code: int,
    message: str,
    data: dict[str, Any] | None = None,
) -> bytes:
    """An error Response; ``data`` is left out when None."""
    error = _ErrorMember(code, message, msgspec.UNSET if data is None else data)
    return _encoder.encode(_ErrorEnvelope(_VERSION, id, error))


def encode_error_from(id: JsonId, exc: WardgateError) -> bytes:
    """An error Response for a wardgate error: its code, fixed message, reason and hint."""
    return _encoder.encode(_ErrorEnvelope(_VERSION, id, exc.rpc_error()))


def encode_notification(method: str, params: Params = None) -> bytes:
    """A notification (no ``id`` member); ``params`` is left out when None."""
    return _encoder.encode(_CallEnvelope(_VERSION, method, msgspec.UNSET if params is None else params))


def encode_request(id: JsonId, method: str, params: Params = None) -> bytes:
    """A request expecting a response (``id`` None sends ``"id": null``)."""
    return _encoder.encode(_CallEnvelope(_VERSION, method, msgspec.UNSET if params is None else params, id))


def encode_batch(parts: Sequence[bytes]) -> bytes | None:
    """Join encoded Responses into a batch reply; None when there is nothing to send.

    A batch of notifications only gets no reply at all, not an empty array (section 6).
    """
    if not parts:
        return None
    return b"[" + b",".join(parts) + b"]"


# --- client side ---------------------------------------------------------------------------


class InvalidResponse(ProtocolError):
    """The server sent something that is not a JSON-RPC 2.0 response or notification.

    Raised on the client only; the hint names the defect with a fixed string.
    """

    reason = "invalid_response"
    message = "Invalid response from server"


class ErrorObject(msgspec.Struct, frozen=True):
    """The ``error`` member of a Response (section 5.1)."""

    code: int
    message: str
    data: Any = None


class Response(msgspec.Struct, frozen=True):
    """A Response: exactly one of ``result`` and ``error`` was sent (``result`` may be null)."""

    id: JsonId
    result: Any = None
    error: ErrorObject | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Notification(msgspec.Struct, frozen=True):
    """A notification from the server, e.g. ``event/<type>`` or ``auth/revoked``."""

    method: str
    params: Params = None


class ServerMessage(msgspec.Struct, frozen=True):
    """One message from the server, the client-side mirror of :class:`Incoming`.

    A single Response or Notification gives one item; a batch reply gives its Responses, in
    the server's order (any order, section 6: match them by id). Iterating yields the items.
    """

    items: tuple[Response | Notification, ...]
    is_batch: bool

    def __iter__(self) -> Iterator[Response | Notification]:
        return iter(self.items)


def parse_response(data: bytes | str) -> ServerMessage:
    """Parse one message from the server; raise :class:`InvalidResponse` for anything else.

    Strict, so that a server bug shows at once: a batch holds Responses only (no
    notifications, not empty), and a message with both ``method`` and ``id`` (a
    server-to-client request, which wardgate does not send) is refused.
    """
    try:
        value = _any_decoder.decode(data)
    except _DECODE_ERRORS:
        raise InvalidResponse("Not JSON.") from None
    if type(value) is list:
        if not value:
            raise InvalidResponse("Empty batch.")
        return ServerMessage(tuple([_parse_response_object(entry) for entry in value]), True)
    if type(value) is dict and "method" in value:
        return ServerMessage((_parse_notification(value),), False)
    return ServerMessage((_parse_response_object(value),), False)


def _parse_notification(obj: dict[str, Any]) -> Notification:
    if obj.get("jsonrpc") != _VERSION:
        raise InvalidResponse("Missing or wrong jsonrpc version.")
    method = obj["method"]
    if type(method) is not str:
        raise InvalidResponse("Method is not a string.")
    if "id" in obj:
        raise InvalidResponse("Server-to-client requests are not supported.")
    params = obj.get("params", msgspec.UNSET)
    if params is msgspec.UNSET:
        return Notification(method)
    if type(params) not in _PARAMS_TYPES:
        raise InvalidResponse("Params are neither object nor array.")
    return Notification(method, params)


def _parse_response_object(obj: Any) -> Response:
    if type(obj) is not dict:
        raise InvalidResponse("Not an object.")
    if obj.get("jsonrpc") != _VERSION:
        raise InvalidResponse("Missing or wrong jsonrpc version.")
    if "id" not in obj:
        raise InvalidResponse("Response without id.")
    id_ = obj["id"]
    if id_ is not None and type(id_) not in _ID_TYPES:
        raise InvalidResponse("Invalid id.")
    has_result = "result" in obj
    if has_result == ("error" in obj):
        raise InvalidResponse("A response needs exactly one of result and error.")
    if has_result:
        return Response(id_, obj["result"])
    error = obj["error"]
    if type(error) is not dict:
        raise InvalidResponse("Error is not an object.")
    code = error.get("code")
    message = error.get("message")
    if type(code) is not int or type(message) is not str:
        raise InvalidResponse("Error needs an integer code and a string message.")
    return Response(id_, None, ErrorObject(code, message, error.get("data")))
