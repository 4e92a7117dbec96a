"""Tests for the JSON-RPC 2.0 codec (https://www.jsonrpc.org/specification)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wardgate import errors
from wardgate.rpc import jsonrpc
from wardgate.rpc.jsonrpc import (
    MAX_BATCH,
    ErrorObject,
    ErrorReply,
    Incoming,
    InvalidResponse,
    JsonId,
    Notification,
    Params,
    Request,
    Response,
    ServerMessage,
    encode_batch,
    encode_error,
    encode_error_from,
    encode_notification,
    encode_request,
    encode_result,
    parse_message,
    parse_response,
)


def only(incoming: Incoming) -> Request | ErrorReply:
    assert not incoming.is_batch
    assert len(incoming.items) == 1
    return incoming.items[0]


def only_request(data: bytes | str) -> Request:
    item = only(parse_message(data))
    assert isinstance(item, Request), item
    return item


def only_error(data: bytes | str) -> ErrorReply:
    item = only(parse_message(data))
    assert isinstance(item, ErrorReply), item
    return item


def invalid(id_: JsonId, reason: str) -> ErrorReply:
    return ErrorReply(id_, -32600, "Invalid Request", {"reason": reason})


PARSE_ERROR = ErrorReply(None, -32700, "Parse error", {"reason": "parse_error"})


def strict(value: object) -> bytes:
    """An encoding that tells 1 from 1.0 and 0.0 from -0.0, unlike ==."""
    return msgspec.json.encode(value)


# --- the specification's examples (section 7), end to end through a toy dispatcher ----------


def _subtract(params: Params) -> Any:
    if isinstance(params, list):
        return params[0] - params[1]
    assert isinstance(params, dict)
    return params["minuend"] - params["subtrahend"]


def _sum(params: Params) -> Any:
    assert isinstance(params, list)
    return sum(params)


SPEC_METHODS: dict[str, Callable[[Params], Any]] = {
    "subtract": _subtract,
    "sum": _sum,
    "get_data": lambda params: ["hello", 5],
    "update": lambda params: None,
    "notify_hello": lambda params: None,
    "notify_sum": lambda params: None,
}


def serve(message: str) -> Any:
    """What a minimal server built on the codec sends back, decoded; None when nothing."""
    incoming = parse_message(message)
    parts: list[bytes] = []
    for item in incoming.items:
        if isinstance(item, ErrorReply):
            parts.append(item.encode())
        elif item.is_notification:
            continue
        elif item.method in SPEC_METHODS:
            parts.append(encode_result(item.id, SPEC_METHODS[item.method](item.params)))
        else:
            parts.append(encode_error_from(item.id, errors.MethodNotFound()))
    out = encode_batch(parts) if incoming.is_batch else (parts[0] if parts else None)
    return None if out is None else json.loads(out)


def without_data(reply: Any) -> Any:
    """The spec's examples carry no error.data; wardgate adds a reason there."""
    if isinstance(reply, list):
        return [without_data(r) for r in reply]
    if "error" in reply:
        assert set(reply["error"]["data"]) == {"reason"}
        reply = {**reply, "error": {k: v for k, v in reply["error"].items() if k != "data"}}
    return reply


SPEC_EXAMPLES = [
    pytest.param(
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        {"jsonrpc": "2.0", "result": 19, "id": 1},
        id="positional-1",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        {"jsonrpc": "2.0", "result": -19, "id": 2},
        id="positional-2",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
        {"jsonrpc": "2.0", "result": 19, "id": 3},
        id="named-1",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}',
        {"jsonrpc": "2.0", "result": 19, "id": 4},
        id="named-2",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}',
        None,
        id="notification-params",
    ),
    pytest.param('{"jsonrpc": "2.0", "method": "foobar"}', None, id="notification"),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"},
        id="non-existent-method",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
        id="invalid-json",
    ),
    pytest.param(
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        id="invalid-request-object",
    ),
    pytest.param(
        '[\n  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},\n'
        '  {"jsonrpc": "2.0", "method"\n]',
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
        id="batch-invalid-json",
    ),
    pytest.param(
        "[]",
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
        id="empty-array",
    ),
    pytest.param(
        "[1]",
        [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}],
        id="invalid-batch-one",
    ),
    pytest.param(
        "[1,2,3]",
        [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}] * 3,
        id="invalid-batch-three",
    ),
    pytest.param(
        """[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
        ]""",
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
            {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ],
        id="mixed-batch",
    ),
    pytest.param(
        """[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
        ]""",
        None,
        id="all-notifications-batch",
    ),
]


@pytest.mark.parametrize(("message", "expected"), SPEC_EXAMPLES)
def test_spec_example(message: str, expected: Any) -> None:
    reply = serve(message)
    assert (None if reply is None else without_data(reply)) == expected
    # bytes in behave exactly as text in
    assert parse_message(message.encode()) == parse_message(message)


def test_spec_positional_params_parse() -> None:
    request = only_request('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}')
    assert request == Request("subtract", [42, 23], 1, is_notification=False)


def test_spec_named_params_parse() -> None:
    request = only_request(
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
    )
    assert request == Request("subtract", {"subtrahend": 23, "minuend": 42}, 3, False)


def test_spec_notifications_parse() -> None:
    assert only_request('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}') == (
        Request("update", [1, 2, 3, 4, 5], None, is_notification=True)
    )
    assert only_request('{"jsonrpc": "2.0", "method": "foobar"}') == (
        Request("foobar", None, None, is_notification=True)
    )


def test_spec_non_existent_method_parses() -> None:
    assert only_request('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}') == (
        Request("foobar", None, "1", False)
    )


def test_spec_invalid_request_object_reason() -> None:
    assert only_error('{"jsonrpc": "2.0", "method": 1, "params": "bar"}') == invalid(None, "invalid_method")


def test_spec_mixed_batch_items() -> None:
    incoming = parse_message(
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        ' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
        ' {"foo": "boo"}]'
    )
    assert incoming == Incoming(
        (
            Request("sum", [1, 2, 4], "1", False),
            Request("notify_hello", [7], None, True),
            invalid(None, "invalid_version"),
        ),
        is_batch=True,
    )


def test_spec_all_notification_batch_parses_as_batch() -> None:
    incoming = parse_message(
        '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
        ' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]'
    )
    assert incoming.is_batch
    assert all(isinstance(i, Request) and i.is_notification for i in incoming.items)


# --- ids ----------------------------------------------------------------------------------

LEGAL_IDS: list[JsonId] = [
    "",
    "abc",
    "1",
    "é",
    "日本語",
    "🎉 emoji",
    "\u0000nul",
    'quote " and \\ backslash',
    "\u2028line separator",
    0,
    1,
    -1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**40,
    -(10**40),
    1.0,
    -0.0,
    0.5,
    -2.5,
    1e300,
    5e-324,
    None,
]


def same_json_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


@pytest.mark.parametrize("id_", LEGAL_IDS, ids=repr)
def test_legal_id_round_trips(id_: JsonId) -> None:
    wire = encode_request(id_, "status/get")
    request = only_request(wire)
    assert same_json_value(request.id, id_)
    assert request.is_notification is False

    for reply in (
        encode_result(request.id, {"ok": True}),
        encode_error(request.id, -32601, "Method not found"),
        encode_error_from(request.id, errors.MethodNotFound()),
    ):
        assert same_json_value(json.loads(reply)["id"], id_)
        response = one(reply)
        assert isinstance(response, Response)
        assert same_json_value(response.id, id_)


@pytest.mark.parametrize("id_", LEGAL_IDS, ids=repr)
def test_legal_id_from_text_written_by_others(id_: JsonId) -> None:
    # json.dumps escapes non-ASCII (\u00e9) and writes floats its own way (1e+300)
    text = json.dumps({"jsonrpc": "2.0", "method": "m", "id": id_})
    assert same_json_value(only_request(text).id, id_)
    assert same_json_value(only_request(text.encode()).id, id_)


@pytest.mark.parametrize(
    ("written", "echoed"),
    [
        (b"1.0", b"1.0"),
        (b"-0.0", b"-0.0"),
        (b"17", b"17"),
        (b"123456789012345678901234567890", b"123456789012345678901234567890"),
        (b'"\\u00e9"', '"é"'.encode()),
        (b"1E2", b"100.0"),  # floats come back by value, not by spelling
    ],
)
def test_id_echo_bytes(written: bytes, echoed: bytes) -> None:
    request = only_request(b'{"jsonrpc":"2.0","method":"m","id":' + written + b"}")
    reply = encode_result(request.id, None)
    assert reply == b'{"jsonrpc":"2.0","id":' + echoed + b',"result":null}'


def test_explicit_null_id_is_a_request_not_a_notification() -> None:
    explicit_null = only_request('{"jsonrpc":"2.0","method":"m","id":null}')
    assert explicit_null == Request("m", None, None, is_notification=False)
    absent = only_request('{"jsonrpc":"2.0","method":"m"}')
    assert absent == Request("m", None, None, is_notification=True)


@pytest.mark.parametrize("bad", ["true", "false", "{}", '{"a":1}', "[]", "[1]", '["x"]'])
def test_illegal_id(bad: str) -> None:
    message = '{"jsonrpc":"2.0","method":"m","id":' + bad + "}"
    assert only_error(message) == invalid(None, "invalid_id")
    batch = parse_message("[" + message + "]")
    assert batch == Incoming((invalid(None, "invalid_id"),), is_batch=True)


# --- invalid requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('{"method":"m","id":1}', invalid(1, "invalid_version")),
        ('{"jsonrpc":"2","method":"m","id":1}', invalid(1, "invalid_version")),
        ('{"jsonrpc":2.0,"method":"m","id":1}', invalid(1, "invalid_version")),
        ('{"jsonrpc":"1.0","method":"m","id":1}', invalid(1, "invalid_version")),
        ('{"jsonrpc":"2.0 ","method":"m","id":1}', invalid(1, "invalid_version")),
        ('{"jsonrpc":null,"method":"m","id":"a"}', invalid("a", "invalid_version")),
        ('{"jsonrpc":"2.0","id":1}', invalid(1, "invalid_method")),
        ('{"jsonrpc":"2.0","method":null,"id":1}', invalid(1, "invalid_method")),
        ('{"jsonrpc":"2.0","method":7,"id":1}', invalid(1, "invalid_method")),
        ('{"jsonrpc":"2.0","method":["m"],"id":1}', invalid(1, "invalid_method")),
        ('{"jsonrpc":"2.0","method":true}', invalid(None, "invalid_method")),
        ('{"jsonrpc":"2.0","method":"m","params":null,"id":1}', invalid(1, "invalid_params_type")),
        ('{"jsonrpc":"2.0","method":"m","params":"x","id":1}', invalid(1, "invalid_params_type")),
        ('{"jsonrpc":"2.0","method":"m","params":3,"id":1}', invalid(1, "invalid_params_type")),
        ('{"jsonrpc":"2.0","method":"m","params":true}', invalid(None, "invalid_params_type")),
        ('{"jsonrpc":"2.0","result":1,"id":1}', invalid(1, "response_object")),
        ('{"jsonrpc":"2.0","result":null,"id":1}', invalid(1, "response_object")),
        (
            '{"jsonrpc":"2.0","error":{"code":1,"message":"x"},"id":null}',
            invalid(None, "response_object"),
        ),
        ('{"result":1}', invalid(None, "response_object")),
        ("{}", invalid(None, "invalid_version")),
        ('{"foo":"boo"}', invalid(None, "invalid_version")),
        ('{"jsonrpc":"2.0","method":1,"id":true}', invalid(None, "invalid_id")),
    ],
)
def test_invalid_request(message: str, expected: ErrorReply) -> None:
    assert only_error(message) == expected
    assert parse_message("[" + message + "]") == Incoming((expected,), is_batch=True)


@pytest.mark.parametrize("message", ["1", "-2.5", '"x"', '""', "true", "false", "null"])
def test_top_level_not_object_or_array(message: str) -> None:
    assert only_error(message) == invalid(None, "not_an_object")


@pytest.mark.parametrize("entry", ["1", '"x"', "null", "true", "[]", "[1]", '[{"jsonrpc":"2.0"}]'])
def test_batch_entry_not_an_object(entry: str) -> None:
    incoming = parse_message("[" + entry + ', {"jsonrpc":"2.0","method":"m","id":1}]')
    assert incoming == Incoming((invalid(None, "not_an_object"), Request("m", None, 1, False)), is_batch=True)


def test_batch_of_one_is_still_a_batch() -> None:
    incoming = parse_message('[{"jsonrpc":"2.0","method":"m","id":1}]')
    assert incoming == Incoming((Request("m", None, 1, False),), is_batch=True)


def test_empty_batch() -> None:
    assert parse_message("[]") == Incoming((invalid(None, "empty_batch"),), is_batch=False)
    assert parse_message(" [ ] ") == Incoming((invalid(None, "empty_batch"),), is_batch=False)


def test_max_batch_is_documented_default() -> None:
    assert MAX_BATCH == 100
    assert "MAX_BATCH" in (jsonrpc.__doc__ or "")


@pytest.mark.parametrize("entry", ['{"jsonrpc":"2.0","method":"m"}', "1"])
def test_batch_limit(entry: str) -> None:
    at_limit = parse_message("[" + ",".join([entry] * MAX_BATCH) + "]")
    assert at_limit.is_batch
    assert len(at_limit.items) == MAX_BATCH
    over = parse_message("[" + ",".join([entry] * (MAX_BATCH + 1)) + "]")
    assert over == Incoming((invalid(None, "batch_too_large"),), is_batch=False)


def test_batch_limit_is_configurable() -> None:
    message = "[" + ",".join(['{"jsonrpc":"2.0","method":"m"}'] * 3) + "]"
    assert len(parse_message(message, max_batch=3).items) == 3
    assert parse_message(message, max_batch=2) == Incoming(
        (invalid(None, "batch_too_large"),), is_batch=False
    )


def test_unknown_members_are_ignored() -> None:
    request = only_request('{"jsonrpc":"2.0","method":"m","id":1,"extra":{"x":1},"result":5,"error":null}')
    assert request == Request("m", None, 1, False)


def test_duplicate_members_last_wins() -> None:
    assert only_request('{"jsonrpc":"2.0","method":"a","method":"b","id":1,"id":2}') == Request(
        "b", None, 2, False
    )
    assert only_request('{"jsonrpc":"2.0","method":1,"method":"b"}').method == "b"
    last_invalid = only_error('{"jsonrpc":"2.0","method":"b","method":1}')
    assert last_invalid == invalid(None, "invalid_method")


@pytest.mark.parametrize("params", [{}, [], {"a": [1, {"b": None}]}, [None, True, 1.5, "x"]])
def test_params_kept_as_sent(params: Params) -> None:
    text = json.dumps({"jsonrpc": "2.0", "method": "m", "params": params, "id": 1})
    assert only_request(text).params == params


def test_reserved_method_parses_normally() -> None:
    request = only_request('{"jsonrpc":"2.0","method":"rpc.discover","id":1}')
    assert request == Request("rpc.discover", None, 1, False)
    assert request.is_reserved
    assert not only_request('{"jsonrpc":"2.0","method":"rpcx","id":1}').is_reserved
    assert not only_request('{"jsonrpc":"2.0","method":"","id":1}').is_reserved


def test_invalid_entry_in_batch_echoes_its_valid_id() -> None:
    incoming = parse_message('[{"jsonrpc":"2.0","id":"abc"},{"jsonrpc":"2.0","method":"m","id":[]}]')
    assert incoming.items == (invalid("abc", "invalid_method"), invalid(None, "invalid_id"))


# --- parse errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"   ",
        b"{",
        b"[",
        b'{"jsonrpc":"2.0","method":"m"',
        b'{"jsonrpc":"2.0","method":"m"} {}',
        b"{'jsonrpc':'2.0'}",
        b"NaN",
        b"Infinity",
        b'{"jsonrpc":"2.0","method":"m","id":NaN}',
        b'{"jsonrpc":"2.0","method":"m","id":1e400}',
        b'{"jsonrpc":"2.0","method":"m","params":[1e400]}',
        b'{"jsonrpc":"2.0","method":"m","id":"\\ud800"}',
        b'{"jsonrpc":"2.0","method":"\xff","id":1}',
        b"\xef\xbb\xbf{}",  # a byte order mark is not JSON
        b'{"jsonrpc":"2.0","method":"m",}',
        b"[" * 100_000,
        b"[" * 5_000 + b"]" * 5_000,
        b'{"jsonrpc":"2.0","method":"m","params":' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    ],
    ids=lambda m: repr(m[:40]),
)
def test_parse_error(message: bytes) -> None:
    assert parse_message(message) == Incoming((PARSE_ERROR,), is_batch=False)


def test_str_with_lone_surrogate_is_a_parse_error() -> None:
    message = '{"jsonrpc":"2.0","method":"\ud800","id":1}'
    assert parse_message(message) == Incoming((PARSE_ERROR,), is_batch=False)


def test_parse_error_reply_encoding() -> None:
    assert only_error(b"{").encode() == (
        b'{"jsonrpc":"2.0","id":null,"error":'
        b'{"code":-32700,"message":"Parse error","data":{"reason":"parse_error"}}}'
    )


def test_error_replies_do_not_share_state() -> None:
    first = only_error(b"{")
    assert first.data is not None
    first.data["mutated"] = True
    assert only_error(b"{") == PARSE_ERROR


# --- encoders -----------------------------------------------------------------------------


def test_encode_result_exact_bytes() -> None:
    assert encode_result(1, 19) == b'{"jsonrpc":"2.0","id":1,"result":19}'
    assert encode_result("a", None) == b'{"jsonrpc":"2.0","id":"a","result":null}'
    assert encode_result(None, {"k": ["v"]}) == b'{"jsonrpc":"2.0","id":null,"result":{"k":["v"]}}'


def test_encode_result_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError):
        encode_result(1, object())


def test_encode_error_exact_bytes() -> None:
    assert encode_error(1, -32601, "Method not found") == (
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"Method not found"}}'
    )
    assert encode_error("x", -32010, "Failed", {"reason": "r", "hint": "h"}) == (
        b'{"jsonrpc":"2.0","id":"x","error":'
        b'{"code":-32010,"message":"Failed","data":{"reason":"r","hint":"h"}}}'
    )
    assert json.loads(encode_error(None, 1, "m", {}))["error"]["data"] == {}


@pytest.mark.parametrize(
    "exc",
    [
        errors.ParseError(),
        errors.InvalidRequest(),
        errors.MethodNotFound(),
        errors.InvalidParams(hint="path must be a string"),
        errors.InternalError(),
        errors.AuthenticationRequired(),
        errors.InvalidToken(),
        errors.TokenExpired(),
        errors.SessionExpired(),
        errors.TokenRevoked(),
        errors.PermissionDenied(scope="admin"),
        errors.ApplicationError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_encode_error_from(exc: errors.WardgateError) -> None:
    reply = json.loads(encode_error_from(7, exc))
    assert reply == {"jsonrpc": "2.0", "id": 7, "error": exc.rpc_error()}
    assert reply["error"]["code"] == exc.rpc_code
    assert reply["error"]["message"] == exc.message
    assert reply["error"]["data"]["reason"] == exc.reason


def test_encode_notification() -> None:
    assert encode_notification("initialized") == b'{"jsonrpc":"2.0","method":"initialized"}'
    assert encode_notification("event/output", {"line": "é"}) == (
        '{"jsonrpc":"2.0","method":"event/output","params":{"line":"é"}}'.encode()
    )
    assert encode_notification("m", []) == b'{"jsonrpc":"2.0","method":"m","params":[]}'


def test_encode_request() -> None:
    assert encode_request(1, "status/get") == b'{"jsonrpc":"2.0","method":"status/get","id":1}'
    assert encode_request("a", "m", [1, 2]) == (b'{"jsonrpc":"2.0","method":"m","params":[1,2],"id":"a"}')
    assert encode_request(None, "m") == b'{"jsonrpc":"2.0","method":"m","id":null}'


def test_encode_batch() -> None:
    assert encode_batch([]) is None
    assert encode_batch(()) is None
    one = encode_result(1, 1)
    two = encode_error(None, -32600, "Invalid Request")
    assert encode_batch([one]) == b"[" + one + b"]"
    assert json.loads(encode_batch([one, two]) or b"") == [json.loads(one), json.loads(two)]


def test_error_reply_encode() -> None:
    reply = invalid("q", "invalid_method")
    assert json.loads(reply.encode()) == {
        "jsonrpc": "2.0",
        "id": "q",
        "error": {
            "code": -32600,
            "message": "Invalid Request",
            "data": {"reason": "invalid_method"},
        },
    }
    assert json.loads(ErrorReply(1, -32601, "Method not found").encode()) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32601, "message": "Method not found"},
    }


def test_every_reason_constant_is_produced() -> None:
    reasons = {v for k, v in vars(jsonrpc).items() if k.endswith("_REASON")}
    produced = set()
    for message in [
        "{",
        "[]",
        "[" + ",".join(["1"] * (MAX_BATCH + 1)) + "]",
        "1",
        '{"jsonrpc":"2.0","method":"m","id":true}',
        '{"jsonrpc":"2.0","result":1,"id":1}',
        '{"method":"m"}',
        '{"jsonrpc":"2.0"}',
        '{"jsonrpc":"2.0","method":"m","params":1}',
    ]:
        data = only_error(message).data
        assert data is not None
        produced.add(data["reason"])
    assert produced == reasons


# --- client side --------------------------------------------------------------------------


def one(data: bytes | str) -> Response | Notification:
    message = parse_response(data)
    assert not message.is_batch
    assert len(message.items) == 1
    return message.items[0]


def test_parse_response_result() -> None:
    assert one(b'{"jsonrpc":"2.0","result":19,"id":1}') == Response(1, 19)
    response = one('{"jsonrpc":"2.0","result":null,"id":"a"}')
    assert response == Response("a", None, None)
    assert isinstance(response, Response)
    assert response.ok


def test_parse_response_error() -> None:
    response = one(b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"},"id":"1"}')
    assert response == Response("1", None, ErrorObject(-32601, "Method not found"))
    assert isinstance(response, Response)
    assert not response.ok
    with_data = one(
        b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"x","data":{"reason":"r"}},"id":null}'
    )
    assert with_data == Response(None, None, ErrorObject(-32000, "x", {"reason": "r"}))


def test_parse_response_notification() -> None:
    assert one(b'{"jsonrpc":"2.0","method":"auth/revoked"}') == Notification("auth/revoked")
    assert one(b'{"jsonrpc":"2.0","method":"event/x","params":{"a":1}}') == (
        Notification("event/x", {"a": 1})
    )
    assert one(b'{"jsonrpc":"2.0","method":"event/x","params":[]}') == Notification("event/x", [])


def test_parse_response_batch() -> None:
    batch = parse_response(
        b'[{"jsonrpc":"2.0","result":7,"id":"1"},'
        b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}]'
    )
    expected = (Response("1", 7), Response(None, None, ErrorObject(-32600, "Invalid Request")))
    assert batch == ServerMessage(expected, is_batch=True)
    assert tuple(batch) == expected


def test_server_message_iterates_its_items() -> None:
    single = parse_response(b'{"jsonrpc":"2.0","method":"event/x"}')
    assert list(single) == [Notification("event/x")]
    assert ServerMessage((), is_batch=True).items == ()


@pytest.mark.parametrize(
    "message",
    [
        b"{",
        b"",
        b"[]",
        b"1",
        b"null",
        b'"x"',
        b"[1]",
        b'{"result":1,"id":1}',
        b'{"jsonrpc":"1.0","result":1,"id":1}',
        b'{"jsonrpc":"2.0","result":1}',
        b'{"jsonrpc":"2.0","result":1,"id":true}',
        b'{"jsonrpc":"2.0","result":1,"id":{}}',
        b'{"jsonrpc":"2.0","id":1}',
        b'{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":"m"},"id":1}',
        b'{"jsonrpc":"2.0","error":"boom","id":1}',
        b'{"jsonrpc":"2.0","error":{"message":"m"},"id":1}',
        b'{"jsonrpc":"2.0","error":{"code":true,"message":"m"},"id":1}',
        b'{"jsonrpc":"2.0","error":{"code":1.0,"message":"m"},"id":1}',
        b'{"jsonrpc":"2.0","error":{"code":1},"id":1}',
        b'{"jsonrpc":"2.0","error":{"code":1,"message":2},"id":1}',
        b'{"method":"event/x"}',
        b'{"jsonrpc":"2.0","method":1}',
        b'{"jsonrpc":"2.0","method":"ask","id":1}',
        b'{"jsonrpc":"2.0","method":"event/x","params":null}',
        b'{"jsonrpc":"2.0","method":"event/x","params":"s"}',
        b'[{"jsonrpc":"2.0","method":"event/x"}]',
        b'[{"jsonrpc":"2.0","result":1,"id":1}, 2]',
    ],
)
def test_parse_response_refuses(message: bytes) -> None:
    with pytest.raises(InvalidResponse) as info:
        parse_response(message)
    # nothing from the decoder (which may quote the input) rides along
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert isinstance(info.value, errors.ProtocolError)
    assert info.value.rpc_error()["data"]["reason"] == "invalid_response"


def test_parse_response_lone_surrogate_text() -> None:
    with pytest.raises(InvalidResponse):
        parse_response('{"jsonrpc":"2.0","result":"\ud800","id":1}')


# --- properties ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
legal_ids = (
    st.none()
    | st.text(max_size=20)
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
)
params_values = (
    st.none()
    | st.lists(json_values, max_size=4)
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
)
_ABSENT = object()


@st.composite
def request_like(draw: st.DrawFn) -> dict[str, Any]:
    """Objects that are often valid requests and often nearly so."""
    obj: dict[str, Any] = {}
    # (member, chance in ten that it is present, chance in ten that it is well-formed)
    members: list[tuple[str, int, int, st.SearchStrategy[Any]]] = [
        ("jsonrpc", 9, 9, st.just("2.0")),
        ("method", 9, 9, st.text(max_size=12)),
        ("params", 5, 8, params_values.filter(lambda p: p is not None)),
        ("id", 6, 8, legal_ids),
        ("result", 1, 10, json_values),
        ("error", 1, 10, json_values),
        ("extra", 2, 10, json_values),
    ]
    for name, present, well_formed, strategy in members:
        if draw(st.integers(0, 9)) < present:
            good = draw(st.integers(0, 9)) < well_formed
            obj[name] = draw(strategy if good else json_values)
    return obj


messages = (
    request_like()
    | st.lists(request_like(), max_size=5)
    | json_values
    | st.lists(request_like() | json_values, max_size=5)
)


def expected_entry(obj: Any) -> Request | None:
    """An independent reading of section 4: the Request this object is, or None if invalid."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return None
    method = obj.get("method", _ABSENT)
    params = obj.get("params", _ABSENT)
    id_ = obj.get("id", _ABSENT)
    if not isinstance(method, str):
        return None
    request_params: Params = None
    if params is not _ABSENT:
        if not isinstance(params, dict | list):
            return None
        request_params = params
    if id_ is _ABSENT:
        id_, is_notification = None, True
    elif isinstance(id_, bool) or not isinstance(id_, str | int | float | None):
        return None
    else:
        is_notification = False
    return Request(method, request_params, id_, is_notification)


def check_well_formed(incoming: Incoming) -> None:
    assert incoming.items
    if not incoming.is_batch:
        assert len(incoming.items) == 1
    for item in incoming.items:
        assert isinstance(item, Request | ErrorReply)
        if isinstance(item, ErrorReply):
            assert item.code in (-32700, -32600)
            assert item.data is not None
            assert item.data["reason"] in {v for k, v in vars(jsonrpc).items() if k.endswith("_REASON")}
            encode_batch([item.encode()])


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    check_well_formed(parse_message(data))


@given(st.text(st.characters(), max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    check_well_formed(parse_message(text))


@given(messages)
def test_arbitrary_json_never_raises_and_follows_the_spec(value: Any) -> None:
    text = json.dumps(value)
    incoming = parse_message(text)
    check_well_formed(incoming)
    # the typed fast path and the general path agree exactly, types included
    general = jsonrpc._parse_general(text, MAX_BATCH)
    assert strict(incoming) == strict(general)
    assert strict(parse_message(text.encode())) == strict(incoming)

    if isinstance(value, list) and 0 < len(value) <= MAX_BATCH:
        assert incoming.is_batch
        entries = value
    else:
        assert not incoming.is_batch
        entries = [value]
    if isinstance(value, list) and not value:
        assert incoming.items == (invalid(None, "empty_batch"),)
        return
    assert len(incoming.items) == len(entries)
    for entry, item in zip(entries, incoming.items, strict=True):
        expected = expected_entry(entry)
        if expected is None:
            assert isinstance(item, ErrorReply)
            assert item.code == -32600
            # the id is echoed only when it is itself legal
            entry_id = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(entry_id, bool) or not isinstance(entry_id, str | int | float):
                entry_id = None
            assert strict(item.id) == strict(entry_id)
        else:
            assert strict(item) == strict(expected)


@given(
    method=st.text(max_size=30),
    params=params_values,
    id_=legal_ids,
    notification=st.booleans(),
)
def test_request_round_trip(method: str, params: Params, id_: JsonId, notification: bool) -> None:
    if notification:
        wire = encode_notification(method, params)
        expected = Request(method, params, None, True)
    else:
        wire = encode_request(id_, method, params)
        expected = Request(method, params, id_, False)
    assert strict(only_request(wire)) == strict(expected)


@given(st.lists(st.tuples(st.text(max_size=10), params_values, legal_ids), min_size=1, max_size=8))
def test_batch_round_trip(calls: list[tuple[str, Params, JsonId]]) -> None:
    wire = encode_batch([encode_request(id_, method, params) for method, params, id_ in calls])
    assert wire is not None
    incoming = parse_message(wire)
    assert incoming.is_batch
    assert strict(incoming.items) == strict(
        tuple(Request(method, params, id_, False) for method, params, id_ in calls)
    )


@given(id_=legal_ids, result=json_values)
def test_result_round_trip(id_: JsonId, result: Any) -> None:
    assert strict(one(encode_result(id_, result))) == strict(Response(id_, result))


@given(
    id_=legal_ids,
    code=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    message=st.text(max_size=20),
    data=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_error_round_trip(id_: JsonId, code: int, message: str, data: dict[str, Any] | None) -> None:
    response = one(encode_error(id_, code, message, data))
    assert strict(response) == strict(Response(id_, None, ErrorObject(code, message, data)))


@given(method=st.text(max_size=20), params=params_values)
def test_notification_round_trip(method: str, params: Params) -> None:
    assert strict(one(encode_notification(method, params))) == strict(Notification(method, params))


@given(st.binary(max_size=300) | st.text(st.characters(), max_size=200) | messages.map(json.dumps))
def test_parse_response_only_raises_invalid_response(data: bytes | str) -> None:
    with contextlib.suppress(InvalidResponse):
        parse_response(data)


@given(st.lists(st.tuples(legal_ids, json_values), min_size=1, max_size=6))
def test_response_batch_round_trip(replies: list[tuple[JsonId, Any]]) -> None:
    wire = encode_batch([encode_result(id_, result) for id_, result in replies])
    assert wire is not None
    expected = ServerMessage(tuple(Response(id_, result) for id_, result in replies), True)
    assert strict(parse_response(wire)) == strict(expected)
