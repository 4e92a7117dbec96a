"""Tests for structured logging and its redaction layer (src/wardgate/logs.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, Literal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from tests.conftest import remember
from wardgate import logs
from wardgate.logs import (
    MIN_SECRET_LENGTH,
    REDACTED,
    ConsoleFormatter,
    JsonFormatter,
    RedactingFilter,
    Redactor,
    WardgateLogHandler,
    bind_connection_id,
    configure_logging,
    connection_id,
    install_redaction_on_root_handlers,
    is_credential_field_name,
    redact,
    redact_data,
)

SESSION_PAYLOAD = "eyJ2IjogMSwgImtpZCI6ICJrMSIsICJ0eXAiOiAic2Vzc2lvbiIsICJqdGkiOiAiODI2Mzk2OWIifQ"
SESSION_MAC = "ro48LmkP2ntzT8ghy_7P6dX5CHDAOLIeRaIr7lmhq_k"
SESSION_TOKEN = f"wgs_{SESSION_PAYLOAD}.{SESSION_MAC}"
PAIRING_TOKEN = (
    "wgp_eyJ2IjogMSwgImtpZCI6ICJrMSIsICJ0eXAiOiAicGFpcmluZyIsICJqdGkiOiAiZWJmODdhZTkifQ"
    ".KyLRF7ewle-BJDv0878kaSSzZ6lQQGi_Uhg3kfj_e2Y"
)
REFRESH_TOKEN = (
    "wgr_eyJ2IjogMSwgImtpZCI6ICJrMSIsICJ0eXAiOiAicmVmcmVzaCIsICJqdGkiOiAiOTY0MTUyNjkifQ"
    ".cFv47LykZLmAr0-ZuCujKpCX1n9zIP_tUq5B_U3yz-k"
)
API_KEY = "wgk_lXtfk2BlWVCnHQK7ijreD5TsQpEBqbtG"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
UPSTREAM_SECRET = "upstream-bearer-3f9a7c21d0"
ALL_SECRETS = (SESSION_TOKEN, PAIRING_TOKEN, REFRESH_TOKEN, API_KEY, UPSTREAM_SECRET)
remember(*ALL_SECRETS)


def secret_parts() -> list[str]:
    """Every part of every test credential that must never reach a log line."""
    parts = [SESSION_PAYLOAD, SESSION_MAC, JWT.split(".")[1], UPSTREAM_SECRET, "hunter2hunter2"]
    for token in (PAIRING_TOKEN, REFRESH_TOKEN, API_KEY):
        parts.extend(token[4:].split("."))
    return parts


def assert_no_secret(text: str) -> None:
    leaked = [part[:6] + "..." for part in secret_parts() if part in text]
    assert not leaked, f"secrets leaked: {leaked}"


# --- redact(): one row per form a credential takes in text --------------------------------------

REDACTION_TABLE: list[tuple[str, str]] = [
    # wardgate tokens keep their prefix
    (f"issued {SESSION_TOKEN} to dev_1", "issued wgs_[REDACTED] to dev_1"),
    (f"pairing {PAIRING_TOKEN}.", "pairing wgp_[REDACTED]."),
    (f"refresh={REFRESH_TOKEN[:20]}", "refresh=wgr_[REDACTED]"),
    (f"key {API_KEY} (no dot part)", "key wgk_[REDACTED] (no dot part)"),
    (f"tokens:{SESSION_TOKEN},{API_KEY}", "tokens:wgs_[REDACTED],wgk_[REDACTED]"),
    # tokens inside JSON
    (f'{{"session": "{SESSION_TOKEN}", "n": 1}}', '{"session": "wgs_[REDACTED]", "n": 1}'),
    (f'{{"token": "{SESSION_TOKEN}"}}', '{"token": "[REDACTED]"}'),
    (
        f'{{"access_token":"{JWT}","token_type":"bearer"}}',
        '{"access_token":"[REDACTED]","token_type":"bearer"}',
    ),
    # query values, case-insensitive names
    (f"GET /ws?token={PAIRING_TOKEN}&x=1 HTTP/1.1", "GET /ws?token=[REDACTED]&x=1 HTTP/1.1"),
    ("GET /ws?apiKey=abc123&b=2", "GET /ws?apiKey=[REDACTED]&b=2"),
    ("GET /ws?APIKEY=abc123", "GET /ws?APIKEY=[REDACTED]"),
    ("/cb?api_key=abc&access_token=def#frag", "/cb?api_key=[REDACTED]&access_token=[REDACTED]#frag"),
    ("/cb?Access_Token=def ok", "/cb?Access_Token=[REDACTED] ok"),
    ("url=https://h/x?refresh_token=zzz;y", "url=https://h/x?refresh_token=[REDACTED];y"),
    ("password=hunter2hunter2 user=bob", "password=[REDACTED] user=bob"),
    ('token="quoted value"', 'token="[REDACTED]"'),
    # HTTP header lines: the value to the end of the line, the scheme kept
    ("Authorization: Bearer abc.def", "Authorization: Bearer [REDACTED]"),
    ("authorization:Basic dXNlcjpwYXNz\nHost: x", "authorization:Basic [REDACTED]\nHost: x"),
    ("Proxy-Authorization: Negotiate abc", "Proxy-Authorization: Negotiate [REDACTED]"),
    ("Cookie: a=1; wardgate_session=s3cr3t", "Cookie: [REDACTED]"),
    ("Set-Cookie: wardgate_session=s3cr3t; HttpOnly; Secure", "Set-Cookie: [REDACTED]"),
    ("X-API-Key: abcdef", "X-API-Key: [REDACTED]"),
    ("X-Upstream-Authorization: raw", "X-Upstream-Authorization: [REDACTED]"),
    # the repr of a headers dict, a multidict, a list of tuples, bytes
    (
        "{'Host': 'h', 'Authorization': 'Bearer abc', 'Cookie': 'wardgate_session=s'}",
        "{'Host': 'h', 'Authorization': 'Bearer [REDACTED]', 'Cookie': '[REDACTED]'}",
    ),
    ("[('Cookie', 'a=1'), ('Accept', '*/*')]", "[('Cookie', '[REDACTED]'), ('Accept', '*/*')]"),
    ("(b'Authorization', b'Basic Zm9vOmJhcg==')", "(b'Authorization', b'Basic [REDACTED]')"),
    ("{'x-api-key': \"it's\"}", "{'x-api-key': \"[REDACTED]\"}"),
    ("{'cookie': 'a\\'b', 'n': 1}", "{'cookie': '[REDACTED]', 'n': 1}"),
    # a JSON dump, and JSON inside a JSON string
    ('{"authorization": "abc", "host": "h"}', '{"authorization": "[REDACTED]", "host": "h"}'),
    ('{"Set-Cookie":"a=b","x":1}', '{"Set-Cookie":"[REDACTED]","x":1}'),
    (
        '{"msg": "{\\"authorization\\": \\"Bearer abc\\", \\"h\\": 1}"}',
        '{"msg": "{\\"authorization\\": \\"Bearer [REDACTED]\\", \\"h\\": 1}"}',
    ),
    # the browser subprotocol and the session cookie
    (
        f"Sec-WebSocket-Protocol: wardgate.v1, wardgate.bearer.{SESSION_TOKEN}",
        "Sec-WebSocket-Protocol: wardgate.v1, wardgate.bearer.[REDACTED]",
    ),
    (
        "protocols=['wardgate.v1', 'wardgate.bearer.opaque-thing']",
        "protocols=['wardgate.v1', 'wardgate.bearer.[REDACTED]']",
    ),
    (
        "cookie header had wardgate_session=abc123; Path=/",
        "cookie header had wardgate_session=[REDACTED]; Path=/",
    ),
    ('("token", "abc")', '("token", "[REDACTED]")'),
    ("{'Set-Cookie': ['a=1', 'b=2']}", "{'Set-Cookie': [REDACTED]"),
    ('wardgate_session="abc 123"', 'wardgate_session="[REDACTED]"'),
    # identity-provider JWTs
    (f"idp said {JWT} ok", "idp said [REDACTED] ok"),
]


@pytest.mark.parametrize(("text", "expected"), REDACTION_TABLE)
def test_redact_removes_every_credential_form(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected


def test_redaction_table_leaks_nothing() -> None:
    for text, _ in REDACTION_TABLE:
        assert_no_secret(redact(text))


def test_redact_multidict_repr() -> None:
    headers = CIMultiDict(
        [("Host", "h"), ("Authorization", f"Bearer {SESSION_TOKEN}"), ("Cookie", "wardgate_session=zz")]
    )
    redacted = redact(repr(headers))
    assert_no_secret(redacted)
    assert "wardgate_session=zz" not in redacted
    assert "'Host': 'h'" in redacted
    assert "'Authorization': 'Bearer [REDACTED]'" in redacted


CLEAN_LINES = [
    "connection accepted from 10.0.0.5:51234 origin=https://phone.example.com device=dev_8f3a2b",
    '127.0.0.1 [01/Jan/2025:12:00:00 +0000] "GET /ws HTTP/1.1" 101 0 "-" "Mozilla/5.0 (X11; Linux x86_64)"',
    "token expired for device dev_1 (token_kind=session)",
    "token: expired",
    "Authorization header missing",
    "no cookie in request; falling back to the Sec-WebSocket-Protocol header",
    "api key revoked: key_id=k_123",
    '{"event": "auth.failure", "reason": "invalid_token", "token": null}',
    "{'token': None, 'cookie': None}",
    '["token", "password", "other"]',
    "[('Accept', '*/*'), ('token_kind', 'session')]",
    "wardgate.v1 accepted; the wg interface is down",
    "eyJ is how base64 JSON starts",
    "",
    "unicode \u2713 \u2013 \u0130stanbul \u017f \u212a\t tab",
]


@pytest.mark.parametrize("line", CLEAN_LINES)
def test_text_without_secrets_passes_unchanged(line: str) -> None:
    assert redact(line) == line


@given(st.text(alphabet=st.characters(blacklist_characters="=:_.'\"")))
def test_text_without_credential_syntax_is_unchanged(text: str) -> None:
    assert redact(text) == text


TOKEN_PREFIXES = st.sampled_from(["wgp_", "wgs_", "wgr_", "wgk_"])
BASE64URL = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16, max_size=60
)


@given(
    prefix=TOKEN_PREFIXES,
    payload=BASE64URL,
    mac=st.none() | BASE64URL,
    before=st.text(max_size=40),
    after=st.text(max_size=40),
)
def test_embedded_token_never_survives(
    prefix: str, payload: str, mac: str | None, before: str, after: str
) -> None:
    token = prefix + payload + (f".{mac}" if mac else "")
    surrounding = before + after
    parts = [payload, *([mac] if mac else [])]
    redacted = redact(before + token + after)
    for part in parts:
        if part not in surrounding:
            assert part not in redacted


FRAGMENTS = [
    "Authorization", "cookie", "Set-Cookie", "X-API-Key", ":", "=", ",", " ", "'", '"', "\\", '\\"',
    "b'", "token", "access_token", "apiKey", "wardgate_session", "wardgate.bearer.", "wgs_", "wgk_",
    "eyJabcdef", ".", "Bearer ", "\n", "&", "?", REDACTED, "abc", "_", "-", "]", "[", ";", "é", "\t",
]  # fmt: skip
CREDENTIAL_SOUP = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=25).map("".join)


@settings(max_examples=500)
@given(CREDENTIAL_SOUP)
def test_redact_is_idempotent(text: str) -> None:
    once = redact(text)
    assert redact(once) == once


@settings(max_examples=300)
@given(CREDENTIAL_SOUP, st.sampled_from(FRAGMENTS) | st.text(max_size=12), st.text(min_size=8, max_size=12))
def test_redact_with_secrets_is_idempotent(text: str, secret_a: str, secret_b: str) -> None:
    secrets = [secret_a * 3, secret_b]
    once = redact(text, secrets)
    assert redact(once, secrets) == once
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            assert secret not in once


@settings(max_examples=500)
@given(CREDENTIAL_SOUP | st.text())
def test_fast_path_agrees_with_the_full_pattern(text: str) -> None:
    full = logs._STRUCTURAL_PATTERN.sub(logs._replace_structural, text)
    assert logs._redact_structural(text) == full


def test_configured_secrets_are_exact_substrings() -> None:
    text = f"calling upstream with {UPSTREAM_SECRET}xyz and {UPSTREAM_SECRET}"
    assert redact(text, [UPSTREAM_SECRET]) == f"calling upstream with {REDACTED}xyz and {REDACTED}"


def test_longest_configured_secret_wins() -> None:
    assert redact("abcdefgh12345678", ["abcdefgh", "abcdefgh12345678"]) == REDACTED


def test_short_configured_secrets_are_ignored() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    assert redact(f"value {short} here", [short, "", "        "]) == f"value {short} here"
    redactor = Redactor()
    assert redactor.add_secret(short) is False
    assert redactor.secrets == frozenset()
    assert redactor.add_secret("long-enough") is True
    assert redactor.redact("a long-enough b") == f"a {REDACTED} b"


def test_configured_secret_is_never_cut_in_half() -> None:
    # The secret starts like a query value: the secret pass runs first and takes it whole.
    secret = "abc&tail-of-the-secret"
    assert redact(f"token={secret}", [secret]) == f"token={REDACTED}"


# --- structured data and field names ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("authorization", True),
        ("Authorization", True),
        ("proxy-authorization", True),
        ("cookie", True),
        ("Set-Cookie", True),
        ("x-api-key", True),
        ("api_key", True),
        ("apiKey", True),
        ("token", True),
        ("access_token", True),
        ("refresh-token", True),
        ("client_secret", True),
        ("password", True),
        ("wardgate_session", True),
        ("token_id", False),
        ("token_kind", False),
        ("device", False),
        ("reason", False),
        ("keys", False),
    ],
)
def test_credential_field_names(name: str, credential: bool) -> None:
    assert is_credential_field_name(name) is credential


def test_redact_data_masks_credential_keys_and_redacts_strings() -> None:
    data = {
        "headers": {"Authorization": "Bearer opaque-upstream", "Accept": "*/*"},
        "token": SESSION_TOKEN,
        "api_key": 12345,
        "cookie": None,
        "note": f"saw {API_KEY}",
        "list": [f"?token={PAIRING_TOKEN}", 3, 2.5, True, None],
        "tuple": ("a", "b"),
        SESSION_TOKEN: "token as a key",
        7: object,
    }
    redacted = redact_data(data)
    assert redacted == {
        "headers": {"Authorization": REDACTED, "Accept": "*/*"},
        "token": "wgs_[REDACTED]",
        "api_key": REDACTED,
        "cookie": None,
        "note": "saw wgk_[REDACTED]",
        "list": ["?token=[REDACTED]", 3, 2.5, True, None],
        "tuple": ["a", "b"],
        "wgs_[REDACTED]": "token as a key",
        "7": "<class 'object'>",
    }
    assert redact_data("x Authorization: y", [UPSTREAM_SECRET]) == f"x Authorization: {REDACTED}"


# --- logging through configure_logging ----------------------------------------------------------


ConfigureLogging = Callable[..., tuple[RedactingFilter, io.StringIO]]


@pytest.fixture
def configured() -> Iterator[ConfigureLogging]:
    """configure_logging into a StringIO; redaction also on the handlers already on root
    (conftest's suite-wide capture, pytest's), and everything restored afterwards."""
    root = logging.getLogger()
    level = root.level
    touched: list[tuple[logging.Handler, RedactingFilter]] = []

    def configure(
        level: str = "debug", fmt: Literal["json", "console"] = "json", **kwargs: Any
    ) -> tuple[RedactingFilter, io.StringIO]:
        stream = io.StringIO()
        redacting_filter = configure_logging(level, fmt, stream=stream, **kwargs)
        install_redaction_on_root_handlers(redacting_filter)
        touched.extend((handler, redacting_filter) for handler in root.handlers)
        return redacting_filter, stream

    yield configure
    for handler in list(root.handlers):
        if isinstance(handler, WardgateLogHandler):
            root.removeHandler(handler)
            handler.close()
    for handler, redacting_filter in touched:
        handler.removeFilter(redacting_filter)
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_message_arguments_are_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured()
    logging.getLogger("wardgate.test").info("issued %s to %s", SESSION_TOKEN, "dev_1")
    [line] = json_lines(stream)
    assert line["msg"] == "issued wgs_[REDACTED] to dev_1"
    assert_no_secret(stream.getvalue())


def test_debug_lines_are_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured("debug")
    # seed 003 finding 1: the raw token logged at debug level
    logging.getLogger("wardgate.auth").debug(
        "Received auth token %s for client %s, decoded: %s",
        SESSION_TOKEN,
        "c1",
        json.dumps({"sub": "dev_1", "refresh": REFRESH_TOKEN}),
    )
    [line] = json_lines(stream)
    assert line["level"] == "debug"
    assert "wgs_[REDACTED]" in line["msg"]
    assert_no_secret(stream.getvalue())


def test_headers_dict_repr_is_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured()
    headers = {"Host": "h", "Authorization": f"Bearer {UPSTREAM_SECRET}", "X-API-Key": API_KEY}
    logging.getLogger("wardgate.proxy").warning("upstream refused, request headers %s", headers)
    assert_no_secret(stream.getvalue())
    assert "'Host': 'h'" in json_lines(stream)[0]["msg"]


def test_url_with_query_token_is_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "console")
    logging.getLogger("wardgate.server").info("upgrade /ws?token=%s&x=1", PAIRING_TOKEN)
    assert "/ws?token=[REDACTED]&x=1" in stream.getvalue()
    assert_no_secret(stream.getvalue())


def raise_with_token() -> None:
    try:
        raise KeyError(f"no such token {REFRESH_TOKEN}")
    except KeyError as exc:
        raise ValueError(f"refresh failed for {SESSION_TOKEN}") from exc


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_exceptions_and_tracebacks_are_redacted(
    configured: ConfigureLogging, fmt: Literal["json", "console"]
) -> None:
    _, stream = configured("info", fmt)
    try:
        raise_with_token()
    except ValueError:
        logging.getLogger("wardgate.test").exception("refresh of %s failed", API_KEY)
    output = stream.getvalue()
    assert_no_secret(output)
    assert "ValueError: refresh failed for wgs_[REDACTED]" in output
    assert "KeyError: 'no such token wgr_[REDACTED]'" in output
    if fmt == "json":
        [line] = json_lines(stream)
        assert line["msg"] == "refresh of wgk_[REDACTED] failed"
        assert line["exc"].startswith("Traceback (most recent call last):")


def test_aiohttp_server_exception_is_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured()
    try:
        raise RuntimeError(f"bad header Cookie: wardgate_session={UPSTREAM_SECRET}")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    assert_no_secret(stream.getvalue())


def test_stack_info_is_redacted() -> None:
    record = logging.makeLogRecord(
        {"msg": "m", "stack_info": f'Stack (most recent call last):\n  File "x", line 1\n    f("{API_KEY}")'}
    )
    RedactingFilter().filter(record)
    assert record.stack_info is not None
    assert API_KEY not in record.stack_info
    assert "wgk_[REDACTED]" in record.stack_info


def test_extra_fields_are_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured()
    logging.getLogger("wardgate.test").info(
        "handshake",
        extra={
            "url": f"/ws?token={PAIRING_TOKEN}",
            "protocol": f"wardgate.v1, wardgate.bearer.{SESSION_TOKEN}",
            "headers": {"authorization": f"Bearer {UPSTREAM_SECRET}", "origin": "https://a"},
            "token": REFRESH_TOKEN,
            "attempts": 3,
        },
    )
    [line] = json_lines(stream)
    assert line["url"] == "/ws?token=[REDACTED]"
    assert line["protocol"] == "wardgate.v1, wardgate.bearer.[REDACTED]"
    assert line["headers"] == {"authorization": REDACTED, "origin": "https://a"}
    assert line["token"] == "wgr_[REDACTED]"
    assert line["attempts"] == 3
    assert_no_secret(stream.getvalue())


def test_aiohttp_access_line_is_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "console")
    logging.getLogger("aiohttp.access").info(
        '%s [%s] "%s" %s %s',
        "127.0.0.1",
        "01/Jan/2025:00:00:00 +0000",
        f"GET /ws?token={PAIRING_TOKEN}&x=1 HTTP/1.1",
        101,
        0,
    )
    output = stream.getvalue()
    assert "aiohttp.access" in output
    assert "GET /ws?token=[REDACTED]&x=1 HTTP/1.1" in output
    assert_no_secret(output)


async def test_real_aiohttp_access_log_is_redacted(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "json")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ws", hello)
    async with TestClient(TestServer(app)) as client:
        response = await client.get(
            "/ws", params={"token": SESSION_TOKEN, "x": "1"}, headers={"Authorization": "Bearer zz"}
        )
        assert response.status == 200
        await asyncio.sleep(0)
    access = [line for line in json_lines(stream) if line["logger"] == "aiohttp.access"]
    assert access, stream.getvalue()
    assert "/ws?token=[REDACTED]&x=1" in access[0]["msg"]
    assert_no_secret(stream.getvalue())


def test_secret_added_after_startup_is_redacted(configured: ConfigureLogging) -> None:
    redacting_filter, stream = configured(secrets=["configured-at-start"])
    log = logging.getLogger("wardgate.proxy")
    learnt_later = "learnt-after-startup"  # not a registered secret: it is logged once, on purpose
    log.info("using configured-at-start and %s", learnt_later)
    assert redacting_filter.add_secret(learnt_later)
    assert not redacting_filter.add_secret("short")
    log.info("using %s", learnt_later)
    first, second = json_lines(stream)
    assert first["msg"] == f"using {REDACTED} and {learnt_later}"
    assert second["msg"] == f"using {REDACTED}"
    assert redacting_filter.secrets == frozenset({"configured-at-start", learnt_later})


def test_caplog_sees_redacted_records(configured: ConfigureLogging, caplog: pytest.LogCaptureFixture) -> None:
    redacting_filter, _ = configured()
    install_redaction_on_root_handlers(redacting_filter)  # a second call adds nothing
    assert caplog.handler.filters.count(redacting_filter) == 1
    logging.getLogger("wardgate.test").warning("token %s", SESSION_TOKEN)
    assert caplog.records[-1].getMessage() == "token wgs_[REDACTED]"
    assert_no_secret(caplog.text)


def test_bad_format_arguments_do_not_raise(configured: ConfigureLogging) -> None:
    _, stream = configured()
    logging.getLogger("wardgate.test").info("count %d", f"not a number {SESSION_TOKEN}")
    [line] = json_lines(stream)
    assert line["msg"].startswith("count %d (log arguments did not match the format")
    assert_no_secret(stream.getvalue())


def test_record_is_redacted_once_and_the_mark_is_not_a_field() -> None:
    redacting_filter = RedactingFilter()
    record = logging.makeLogRecord({"msg": "a %s", "args": (SESSION_TOKEN,)})
    assert redacting_filter.filter(record)
    assert (record.msg, record.args) == ("a wgs_[REDACTED]", None)
    redacted_msg = record.msg
    assert redacting_filter.filter(record)
    assert record.msg is redacted_msg
    assert "_wardgate_redacted_by" not in json.loads(JsonFormatter().format(record))
    # new secrets: the record is looked at again
    record.msg = f"now {UPSTREAM_SECRET}"
    redacting_filter.add_secret(UPSTREAM_SECRET)
    redacting_filter.filter(record)
    assert record.msg == f"now {REDACTED}"


# --- connection ids and formats -----------------------------------------------------------------

ISO_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_json_line_shape(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "json")
    with bind_connection_id("c_abc"):
        logging.getLogger("wardgate.ws").info(
            "closed", extra={"code": 1000, "ts": "shadow", "when": object, "ratio": 0.5}
        )
    logging.getLogger("wardgate.ws").warning("no connection")
    first, second = json_lines(stream)
    assert list(first) == ["ts", "level", "logger", "msg", "conn", "code", "extra.ts", "when", "ratio"]
    assert ISO_MS_UTC.fullmatch(first["ts"])
    assert first["level"] == "info"
    assert first["logger"] == "wardgate.ws"
    assert first["conn"] == "c_abc"
    assert first["code"] == 1000
    assert first["extra.ts"] == "shadow"
    assert first["when"] == "<class 'object'>"
    assert second["conn"] is None
    assert second["level"] == "warning"


def test_json_formatter_writes_any_extra_as_json() -> None:
    circular: list[object] = []
    circular.append(circular)
    record = logging.LogRecord("wardgate.test", logging.INFO, __file__, 1, "x", None, None)
    record.__dict__.update({"key": {("tuple", "key"): 1}, "huge": 10**30})
    assert json.loads(JsonFormatter().format(record)) | {"ts": None} == {
        "ts": None,
        "level": "info",
        "logger": "wardgate.test",
        "msg": "x",
        "conn": None,
        "key": {"('tuple', 'key')": 1},
        "huge": 10**30,
    }
    record.__dict__["circular"] = circular
    assert json.loads(JsonFormatter().format(record))["circular"] == "[[...]]"


def test_format_utc_timestamp() -> None:
    assert logs.format_utc_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert logs.format_utc_timestamp(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"


async def test_connection_id_follows_the_task(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "json")
    log = logging.getLogger("wardgate.ws")

    async def serve(conn: str) -> None:
        connection_id.set(conn)
        await asyncio.sleep(0)
        log.info("message")

    await asyncio.gather(serve("c_1"), serve("c_2"))
    log.info("outside")
    assert [line["conn"] for line in json_lines(stream)] == ["c_1", "c_2", None]


def test_explicit_conn_in_extra_wins(configured: ConfigureLogging) -> None:
    _, stream = configured()
    with bind_connection_id("c_ctx"):
        logging.getLogger("wardgate.ws").info("x", extra={"conn": "c_explicit"})
    assert json_lines(stream)[0]["conn"] == "c_explicit"
    assert connection_id.get() is None


def test_console_line_shape(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "console")
    with bind_connection_id("c_7"):
        logging.getLogger("wardgate.gate").warning(
            "rejected", extra={"reason": "origin_forbidden", "origin": "https://evil example", "n": 2}
        )
    logging.getLogger("wardgate.gate").info("plain")
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d WARNING wardgate\.gate \[c_7\] rejected "
        r'reason=origin_forbidden origin="https://evil example" n=2',
        first,
    )
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO  wardgate\.gate \[-\] plain", second)


def test_console_escapes_forged_lines_and_terminal_escapes(configured: ConfigureLogging) -> None:
    _, stream = configured("info", "console")
    # seed 003 finding 7: peer input quoted in a log message
    hostile = 'x"\n12:00:00 INFO  wardgate.auth [-] admin logged in\x1b[2J'
    logging.getLogger("wardgate.rpc").warning("failed to parse message %r", hostile, extra={"data": hostile})
    output = stream.getvalue()
    assert output.count("\n") == 1
    assert "\x1b" not in output
    assert "\\x1b[2J" in output


def test_console_traceback_is_indented() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    lines = ConsoleFormatter().format(record).splitlines()
    assert lines[1] == "  Traceback (most recent call last):"
    assert lines[-1] == "  ValueError: boom"


# --- configure_logging --------------------------------------------------------------------------


def test_configure_logging_replaces_its_own_handler(configured: ConfigureLogging) -> None:
    _, first_stream = configured("info")
    _, second_stream = configured("warning")
    root = logging.getLogger()
    assert sum(isinstance(handler, WardgateLogHandler) for handler in root.handlers) == 1
    assert root.level == logging.WARNING
    logging.getLogger("wardgate.test").warning("once")
    logging.getLogger("wardgate.test").info("filtered out")
    assert first_stream.getvalue() == ""
    assert [line["msg"] for line in json_lines(second_stream)] == ["once"]


def test_configure_logging_attaches_the_filter_to_the_handler(configured: ConfigureLogging) -> None:
    redacting_filter, _ = configured()
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h, WardgateLogHandler)]
    assert redacting_filter in handler.filters
    assert any(isinstance(f, logs.ConnectionIdFilter) for f in handler.filters)


@pytest.mark.parametrize("level", ["DEBUG", "Info", "warn", "error", "critical"])
def test_configure_logging_accepts_level_names(configured: ConfigureLogging, level: str) -> None:
    configured(level)


@pytest.mark.parametrize("level", ["verbose", "", "10", "notset"])
def test_configure_logging_rejects_unknown_levels(level: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(level))):
        configure_logging(level)


def test_configure_logging_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="'xml'"):
        configure_logging("info", "xml")  # type: ignore[arg-type]
