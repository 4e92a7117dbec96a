"""Structured logging with one redaction layer.

Every log line wardgate writes passes through :class:`RedactingFilter`, attached
to the handler that :func:`configure_logging` installs on the root logger, so
records from every logger (wardgate's own, ``aiohttp.access``,
``aiohttp.server``, libraries) are redacted in one place before any formatter
sees them (DESIGN.md, "Operations"; seed 003, findings 1 and 7).

What :func:`redact` removes
---------------------------

* anything shaped like a wardgate token, keeping the prefix so the kind stays
  visible: ``wgs_abc.def`` becomes ``wgs_[REDACTED]`` (prefixes ``wgp_``,
  ``wgs_``, ``wgr_``, ``wgk_``; the dot part is optional);
* JWT-shaped strings (``eyJ...`` ``.`` ``eyJ...``), as identity providers issue;
* the value of the ``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie`` and ``X-API-Key`` headers in the forms they take in text: an
  HTTP header line (``Authorization: Bearer x``, up to the end of the line),
  the repr of a dict or multidict (``'Authorization': 'Bearer x'``), a JSON dump
  (``"authorization": "x"``, also escaped inside another JSON string), a tuple
  (``('Cookie', 'a=1')``) and ``key=value``. An auth scheme is kept
  (``Bearer [REDACTED]``);
* query and form values of credential-named parameters, case-insensitively:
  ``token``, ``access_token`` and any ``*_token``/``*-token``, ``apiKey``,
  ``api_key``, ``x-api-key``, ``*_secret``, ``password``, and the session cookie
  ``wardgate_session=...``; in ``name=value`` form and in quoted JSON/dict form
  (``"access_token": "x"``), but not in prose such as ``token: expired``;
* the token in the ``Sec-WebSocket-Protocol`` entry ``wardgate.bearer.<token>``;
* every configured secret, as an exact substring. Configured secrets shorter
  than :data:`MIN_SECRET_LENGTH` (8) characters are ignored: redacting every
  occurrence of a short string such as ``"admin"`` would destroy the logs
  while protecting nothing worth protecting.

Redaction is idempotent (``redact(redact(x)) == redact(x)``), so a record that
passes through several handlers carrying the filter is safe, and text without
secrets passes through byte-identical. It errs on the side of removing too much:
an unquoted header value is cut to the end of the line.

A header whose key is quoted but whose value is not a string (``'Cookie':
['a', 'b']``) is cut to the end of the line, except ``None``/``null``.

The structural patterns are one precompiled regular expression applied in one
pass, skipped for ASCII text containing none of its trigger words (about 2 us
per typical line instead of tens); configured secrets are a second
precompiled alternation applied first (only when secrets are configured).

Lines also carry the id of the connection they concern (``conn``), taken from
the :data:`connection_id` context variable, so one connection's story can be
read out of a busy log.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Final, Literal, TextIO

import msgspec

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "ConnectionIdFilter",
    "ConsoleFormatter",
    "JsonFormatter",
    "RedactingFilter",
    "Redactor",
    "WardgateLogHandler",
    "bind_connection_id",
    "configure_logging",
    "connection_id",
    "format_utc_timestamp",
    "install_redaction_on_root_handlers",
    "is_credential_field_name",
    "redact",
    "redact_data",
]

REDACTED: Final = "[REDACTED]"
"""What a removed value is replaced with."""

MIN_SECRET_LENGTH: Final = 8
"""Configured secrets shorter than this are ignored (see the module docstring)."""

connection_id: ContextVar[str | None] = ContextVar("wardgate_connection_id", default=None)
"""The id of the connection the current task is serving; every log line carries it as ``conn``."""

# --- the patterns -------------------------------------------------------------------------------

_B64URL = r"[A-Za-z0-9_-]"
_HEADER_NAMES = r"(?i:(?:proxy-)?authorization|(?:set-)?cookie|x-api-key)"
_PARAM_NAMES = (
    r"(?i:(?:[a-z0-9]+[_-])*(?:token|secret|password|passwd)"
    r"|(?:x[_-])?api[_-]?key|wardgate_session)"
)


_IN_TUPLE = r"(?:(?:(?<=\(['\"])|(?<=\(b['\"]))(?P<{group}_in_tuple>))?"
"""Sets ``<group>_in_tuple`` when the name opens a tuple, ``('Cookie', 'a=1')``: only there may a
comma separate name and value (elsewhere ``"token", "x"`` is just two strings in a list)."""


def _quoted_value(group: str) -> str:
    """A quoted value: optional ``b`` prefix, quotes possibly backslash-escaped (JSON in JSON).

    The content runs to the matching closing quote (at the same escaping level)
    or, when that is missing, to the end of the line. Backslash escapes inside
    are skipped, so a repr such as ``'it\\'s'`` is read as one value.
    """
    return (
        rf"(?P<{group}_open>b?(?P<{group}_esc>\\*)(?P<{group}_q>['\"]))"
        rf"(?P<{group}_content>(?:(?!(?P={group}_esc)(?P={group}_q))(?:\\.|[^\r\n]))*)"
        rf"(?P<{group}_close>(?P={group}_esc)(?P={group}_q))?"
    )


_STRUCTURAL_PATTERN: Final = re.compile(
    # A credential header and its value.
    rf"(?P<header>(?<![\w]){_IN_TUPLE.format(group='header')}(?P<header_name>{_HEADER_NAMES})(?![\w-])"
    r"(?P<header_key_quote>\\*['\"])?"
    r"(?P<header_sep>[ \t]*(?:[:=]|(?(header_in_tuple),|(?!)))[ \t]*)"
    rf"(?:{_quoted_value('header_value')}"
    r"|(?(header_key_quote)(?!(?:None|null)\b))(?P<header_bare>[^\s][^\r\n]*)))"
    # A credential-named parameter: name=value, or a quoted key with a quoted value.
    rf"|(?P<param>(?<![A-Za-z0-9_-]){_IN_TUPLE.format(group='param')}"
    rf"(?P<param_name>{_PARAM_NAMES})(?![A-Za-z0-9_-])"
    r"(?P<param_key_quote>\\*['\"])?"
    r"(?P<param_sep>(?(param_key_quote)[ \t]*(?:[:=]|(?(param_in_tuple),|(?!)))[ \t]*|=))"
    rf"(?:{_quoted_value('param_value')}"
    r"|(?(param_key_quote)(?!)|(?P<param_bare>[^\s&#;,'\"<>]+))))"
    # The browser subprotocol carrying a token.
    r"|(?P<subprotocol>(?P<subprotocol_prefix>(?i:wardgate\.bearer\.))[^\s,;'\"]+)"
    # A wardgate token: keep the prefix.
    rf"|(?P<token>(?P<token_prefix>wg[psrkc]_){_B64URL}+(?:\.{_B64URL}+)*)"
    # A JWT (header and payload are base64url JSON objects, so both start with eyJ).
    rf"|(?P<jwt>eyJ{_B64URL}{{5,}}\.eyJ{_B64URL}{{5,}}(?:\.{_B64URL}*)*)"
)

_AUTH_SCHEME: Final = re.compile(r"(?i:bearer|basic|digest|negotiate|ntlm|token|dpop|apikey)[ \t]+(?=\S)")

_CREDENTIAL_FIELD_NAME: Final = re.compile(
    r"(?:proxy_)?authorization|(?:set_)?cookies?|(?:x_)?api_?key"
    r"|(?:[a-z0-9]+_)*(?:token|secret|password|passwd)|wardgate_session"
)

_TOKEN_SHAPE: Final = re.compile(rf"(wg[psrkc]_){_B64URL}+(?:\.{_B64URL}+)*")

_REDACTION_ROUND_LIMIT: Final = 4
"""At most this many rounds of redaction with configured secrets (see ``_redact_text``)."""


def _mask_credential(value: str) -> str:
    """Replace a credential value, keeping a leading auth scheme (``Bearer [REDACTED]``)."""
    scheme = _AUTH_SCHEME.match(value)
    if scheme is not None:
        return scheme.group(0) + REDACTED
    return REDACTED


def _replace_quoted_or_bare(match: re.Match[str], group: str) -> str:
    """Rebuild ``name<key quote><separator><value>`` with the value masked."""
    head = (
        match.group(f"{group}_name") + (match.group(f"{group}_key_quote") or "") + match.group(f"{group}_sep")
    )
    content = match.group(f"{group}_value_content")
    if content is not None:
        if not content:
            return match.group(0)
        return (
            head
            + match.group(f"{group}_value_open")
            + _mask_credential(content)
            + (match.group(f"{group}_value_close") or "")
        )
    return head + _mask_credential(match.group(f"{group}_bare"))


def _replace_structural(match: re.Match[str]) -> str:
    """The replacement for one match of :data:`_STRUCTURAL_PATTERN`."""
    if match.group("header") is not None:
        return _replace_quoted_or_bare(match, "header")
    if match.group("param") is not None:
        return _replace_quoted_or_bare(match, "param")
    if match.group("subprotocol") is not None:
        return match.group("subprotocol_prefix") + REDACTED
    if match.group("token") is not None:
        return match.group("token_prefix") + REDACTED
    return REDACTED


def _usable_secrets(secrets: Collection[str]) -> frozenset[str]:
    """The configured secrets that are long enough to redact (see :data:`MIN_SECRET_LENGTH`)."""
    return frozenset(
        secret
        for secret in secrets
        if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH and secret.strip()
    )


@functools.lru_cache(maxsize=64)
def _compile_secrets(secrets: frozenset[str]) -> re.Pattern[str] | None:
    """One alternation of the secrets, longest first so a longer secret wins over its prefix."""
    if not secrets:
        return None
    ordered = sorted(secrets, key=lambda secret: (-len(secret), secret))
    return re.compile("|".join(re.escape(secret) for secret in ordered))


_TRIGGER_WORDS: Final = ("authoriz", "cookie", "key", "token", "secret", "passw", "wardgate", "wg", "eyj")
"""Every structural match contains one of these (lower-cased). Non-ASCII text always takes the full
pass, because regex case-insensitivity maps a few non-ASCII letters (Kelvin sign, long s, dotless i)
onto ASCII ones."""


def _redact_structural(text: str) -> str:
    """The structural pass, skipped for ASCII text that holds none of the trigger words.

    The check costs about a microsecond on a typical line; the full regular
    expression costs tens.
    """
    if text.isascii():
        lowered = text.lower()
        if not any(word in lowered for word in _TRIGGER_WORDS):
            return text
    return _STRUCTURAL_PATTERN.sub(_replace_structural, text)


def _redact_text(text: str, secrets_pattern: re.Pattern[str] | None) -> str:
    """Remove configured secrets, then everything credential-shaped.

    Secrets go first so that a structural match can never cut a secret in two
    and leave half of it. A contrived secret that overlaps a replacement (say
    ``"wardgate.bearer.["``) can be formed by a replacement, so with secrets
    configured the passes repeat while the result still holds a secret (a
    few rounds at most; normally one). The structural pass is idempotent on
    its own, so a result without secrets is a fixed point.
    """
    if secrets_pattern is None:
        return _redact_structural(text)
    for _ in range(_REDACTION_ROUND_LIMIT):
        text = _redact_structural(secrets_pattern.sub(REDACTED, text))
        if secrets_pattern.search(text) is None:
            break
    return text


def redact(text: str, secrets: Collection[str] = ()) -> str:
    """Return ``text`` with every credential removed (see the module docstring for what counts).

    ``secrets`` are extra exact strings to remove; those shorter than
    :data:`MIN_SECRET_LENGTH` are ignored. Idempotent, and text without secrets
    comes back unchanged.
    """
    return _redact_text(text, _compile_secrets(_usable_secrets(secrets)) if secrets else None)


def is_credential_field_name(name: str) -> bool:
    """Whether a field (an ``extra=`` key, an audit field, a dict key) names a credential.

    ``authorization``, ``cookie``, ``set-cookie``, ``x-api-key``, ``api_key``,
    ``token``, ``access_token``, ``client_secret``, ``password``,
    ``wardgate_session``... Case-insensitive; ``-`` counts as ``_``. Names that
    merely mention tokens (``token_id``, ``token_kind``) do not count.
    """
    return _CREDENTIAL_FIELD_NAME.fullmatch(name.lower().replace("-", "_")) is not None


def _mask_field(value: object) -> object:
    """The value of a credential-named field: ``None`` stays, a token keeps its prefix."""
    if value is None:
        return None
    if isinstance(value, str):
        shape = _TOKEN_SHAPE.fullmatch(value)
        return shape.group(1) + REDACTED if shape is not None else REDACTED
    return REDACTED


def _redact_data(value: object, secrets_pattern: re.Pattern[str] | None) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _redact_text(value, secrets_pattern)
    if isinstance(value, Mapping):
        redacted: dict[str, object] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            redacted[_redact_text(name, secrets_pattern)] = (
                _mask_field(item) if is_credential_field_name(name) else _redact_data(item, secrets_pattern)
            )
        return redacted
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_data(item, secrets_pattern) for item in value]
    return _redact_text(str(value), secrets_pattern)


def redact_data(value: object, secrets: Collection[str] = ()) -> object:
    """A redacted, JSON-ready copy of structured data (an extra field, an audit field).

    Strings pass through :func:`redact`; mappings are copied with their keys
    redacted and the values of credential-named keys
    (:func:`is_credential_field_name`) masked whole, so ``{"Authorization":
    "Bearer x"}`` loses ``x`` even though ``"Bearer x"`` alone does not look
    like a credential; lists, tuples and sets become lists; ``None``, booleans
    and numbers stay; anything else becomes its redacted ``str()``.
    """
    return _redact_data(value, _compile_secrets(_usable_secrets(secrets)) if secrets else None)


_REDACTOR_GENERATIONS: Final = itertools.count(1)


class Redactor:
    """:func:`redact` and :func:`redact_data` bound to a set of secrets that can grow.

    Thread-safe: the secrets and their compiled pattern are replaced together,
    atomically, when a secret is added.
    """

    def __init__(self, secrets: Collection[str] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets = _usable_secrets(secrets)
        self._pattern = _compile_secrets(self._secrets)
        self._generation = next(_REDACTOR_GENERATIONS)

    @property
    def generation(self) -> int:
        """Changes whenever the secrets change; unique across redactors in this process."""
        return self._generation

    @property
    def secrets(self) -> frozenset[str]:
        """The configured secrets that are redacted (short ones are not kept)."""
        return self._secrets

    def add_secret(self, secret: str) -> bool:
        """Redact ``secret`` from now on; False (and ignored) if shorter than 8 characters."""
        usable = _usable_secrets((secret,))
        if not usable:
            return False
        with self._lock:
            secrets = self._secrets | usable
            self._pattern, self._secrets = _compile_secrets(secrets), secrets
            self._generation = next(_REDACTOR_GENERATIONS)
        return True

    def redact(self, text: str) -> str:
        """:func:`redact` with this redactor's secrets."""
        return _redact_text(text, self._pattern)

    def redact_data(self, value: object) -> object:
        """:func:`redact_data` with this redactor's secrets."""
        return _redact_data(value, self._pattern)

    def redact_field(self, name: str, value: object) -> object:
        """Redact the value of a field called ``name`` (masked whole if the name is a credential's)."""
        if is_credential_field_name(name):
            return _mask_field(value)
        return _redact_data(value, self._pattern)


def add_secrets(secrets: Iterable[str]) -> None:
    """Redact ``secrets`` (resolved upstream credentials, the Redis password) from every line
    the root log handlers write from now on."""
    for handler in logging.getLogger().handlers:
        for log_filter in handler.filters:
            if isinstance(log_filter, RedactingFilter):
                for secret in secrets:
                    log_filter.add_secret(secret)


# --- records ------------------------------------------------------------------------------------

_RECORD_ATTRIBUTES: Final = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "conn",
}
"""LogRecord attributes that are not ``extra=`` fields (``conn`` is set by ConnectionIdFilter)."""

_REDACTED_MARK: Final = "_wardgate_redacted_by"
"""Record attribute holding the redactor generation a record was redacted with (skips a second pass)."""

_TRACEBACK_FORMATTER: Final = logging.Formatter()


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields passed with ``extra=`` (private ``_names`` are not fields)."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


def _record_message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or a readable fallback when the arguments do not fit the format."""
    try:
        return record.getMessage()
    except Exception:  # a bad format string must not lose the line, nor raise into the caller
        return f"{record.msg!s} (log arguments did not match the format: {record.args!r})"


class RedactingFilter(logging.Filter):
    """The redaction layer: attach it to a handler and nothing that handler writes carries a secret.

    For each record it formats the message (``record.getMessage()``), redacts
    it and stores it in ``record.msg`` with ``record.args`` cleared; formats the
    exception into ``record.exc_text`` (which formatters use instead of
    formatting ``exc_info`` again) and redacts it; redacts ``stack_info``; and
    replaces every ``extra=`` field with its :func:`redact_data` form. Records
    are shared between handlers, so the redaction is visible to all of them.
    Never drops a record.
    """

    def __init__(self, secrets: Collection[str] = ()) -> None:
        super().__init__()
        self.redactor = Redactor(secrets)

    @property
    def secrets(self) -> frozenset[str]:
        """The configured secrets that are redacted."""
        return self.redactor.secrets

    def add_secret(self, secret: str) -> bool:
        """Redact ``secret`` from now on (an upstream credential, a key...); False if too short."""
        return self.redactor.add_secret(secret)

    def redact(self, text: str) -> str:
        """Redact ``text`` with this filter's secrets."""
        return self.redactor.redact(text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; always keep it."""
        redactor = self.redactor
        generation = redactor.generation
        if record.__dict__.get(_REDACTED_MARK) == generation:
            return True  # already redacted by this filter (for another handler) with these secrets
        record.msg = redactor.redact(_record_message(record))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        for key, value in _extra_fields(record).items():
            record.__dict__[key] = redactor.redact_field(key, value)
        record.__dict__[_REDACTED_MARK] = generation
        return True


class ConnectionIdFilter(logging.Filter):
    """Stamps ``record.conn`` with the current :data:`connection_id` (unless ``extra=`` set it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add ``conn``; always keep the record."""
        if "conn" not in record.__dict__:
            record.__dict__["conn"] = connection_id.get()
        return True


@contextlib.contextmanager
def bind_connection_id(conn_id: str | None) -> Iterator[None]:
    """Set :data:`connection_id` for the ``with`` block, restoring the previous value after."""
    reset_token = connection_id.set(conn_id)
    try:
        yield
    finally:
        connection_id.reset(reset_token)


def _record_connection_id(record: logging.LogRecord) -> str | None:
    conn = record.__dict__.get("conn", None)
    if conn is None:
        return connection_id.get()
    return str(conn)


def format_utc_timestamp(epoch_seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds: ``2025-01-31T12:34:56.789Z``."""
    moment = datetime.datetime.fromtimestamp(epoch_seconds, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_text:
        return record.exc_text
    if record.exc_info:
        return _TRACEBACK_FORMATTER.formatException(record.exc_info)
    return None


_JSON_ENCODER: Final = msgspec.json.Encoder(enc_hook=str)
_TOP_LEVEL_KEYS: Final = frozenset({"ts", "level", "logger", "msg", "conn", "exc", "stack"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line.

    Keys, in order: ``ts`` (ISO 8601 UTC, ms), ``level`` (lower case),
    ``logger``, ``msg``, ``conn``, then each ``extra=`` field (one that collides
    with a key above is written as ``extra.<name>``), then ``exc`` (the
    traceback) and ``stack`` when present. Encoded with msgspec; values and
    keys that JSON cannot represent are written as their ``str()``. Control
    characters are escaped, so a message cannot forge a second line.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        document: dict[str, object] = {
            "ts": format_utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _record_message(record),
            "conn": _record_connection_id(record),
        }
        for key, value in _extra_fields(record).items():
            document[f"extra.{key}" if key in _TOP_LEVEL_KEYS else key] = value
        exception = _exception_text(record)
        if exception:
            document["exc"] = exception
        if record.stack_info:
            document["stack"] = record.stack_info
        try:
            return _JSON_ENCODER.encode(document).decode("utf-8")
        except Exception:  # a circular structure, a __str__ that raises...: the line must still go out
            flat = {
                key: value if _is_json_scalar(value) else _safe_str(value) for key, value in document.items()
            }
            return _JSON_ENCODER.encode(flat).decode("utf-8")


def _is_json_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


_CONTROL_CHARACTERS: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]|\n")
_BARE_CONSOLE_VALUE: Final = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f-\x9f]+")


def _escape_control(match: re.Match[str]) -> str:
    character = match.group(0)
    return "\\n" if character == "\n" else f"\\x{ord(character):02x}"


def _console_safe(text: str) -> str:
    """Escape newlines and control characters (log line forging, terminal escape injection)."""
    return _CONTROL_CHARACTERS.sub(_escape_control, text)


def _console_value(value: object) -> str:
    if isinstance(value, str) and _BARE_CONSOLE_VALUE.fullmatch(value):
        return value
    try:
        rendered = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        rendered = json.dumps(str(value), ensure_ascii=False)
    return _console_safe(rendered)


class ConsoleFormatter(logging.Formatter):
    """A readable single line: ``HH:MM:SS LEVEL logger [conn] msg key=value...``.

    The time is local. Newlines and control characters in the message and the
    fields are escaped (``\\n``, ``\\x1b``) so that input quoted in a message
    cannot forge log lines or drive the terminal. A traceback follows on
    indented lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one console line (plus an indented traceback, if any)."""
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        conn = _record_connection_id(record) or "-"
        line = (
            f"{clock} {record.levelname:<5} {record.name} [{_console_safe(conn)}] "
            f"{_console_safe(_record_message(record))}"
        )
        fields = _extra_fields(record)
        if fields:
            line += "".join(f" {_console_safe(key)}={_console_value(value)}" for key, value in fields.items())
        trailer = [text for text in (_exception_text(record), record.stack_info) if text]
        for text in trailer:
            line += "".join(f"\n  {_console_safe(part)}" for part in text.splitlines())
        return line


class WardgateLogHandler(logging.StreamHandler[TextIO]):
    """The root handler :func:`configure_logging` installs (a distinct class, so it can be replaced)."""


_LEVEL_NAMES: Final = ("debug", "info", "warning", "error", "critical")


def _parse_level(level: str) -> int:
    name = level.strip().lower() if isinstance(level, str) else ""
    if name == "warn":
        name = "warning"
    if name not in _LEVEL_NAMES:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(_LEVEL_NAMES)}")
    return logging.getLevelNamesMapping()[name.upper()]


def configure_logging(
    level: str = "info",
    fmt: Literal["json", "console"] = "console",
    *,
    secrets: Collection[str] = (),
    stream: TextIO | None = None,
) -> RedactingFilter:
    """Send every log record to ``stream`` (default stderr), redacted, one line per event.

    Installs one :class:`WardgateLogHandler` on the root logger, replacing any
    this function installed before (so it may be called repeatedly), with a
    :class:`ConnectionIdFilter` and a :class:`RedactingFilter` holding
    ``secrets`` attached to the handler: every logger's records pass through it,
    including ``aiohttp.access`` and ``aiohttp.server``. Sets the root level.
    Other root handlers are left alone (see
    :func:`install_redaction_on_root_handlers`). Returns the filter, so that
    secrets learnt later can be added with :meth:`RedactingFilter.add_secret`.

    Raises ``ValueError`` naming an unknown ``level`` or ``fmt``.
    """
    numeric_level = _parse_level(level)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    elif fmt == "console":
        formatter = ConsoleFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected 'json' or 'console'")
    redacting_filter = RedactingFilter(secrets)
    handler = WardgateLogHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(ConnectionIdFilter())
    handler.addFilter(redacting_filter)
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, WardgateLogHandler)]:
        root.removeHandler(previous)
        previous.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    return redacting_filter


def install_redaction_on_root_handlers(redacting_filter: RedactingFilter) -> None:
    """Attach ``redacting_filter`` to every handler now on the root logger that lacks it.

    For handlers someone else installed: pytest's ``caplog`` and log capture,
    an embedding application's own handlers.
    """
    for handler in logging.getLogger().handlers:
        if redacting_filter not in handler.filters:
            handler.addFilter(redacting_filter)
