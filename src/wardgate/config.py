"""Settings: embedded defaults, then the YAML file, then ``WARDGATE_*`` env vars, then flags.

The file is ``$WARDGATE_HOME/config.yaml`` (``WARDGATE_HOME`` defaults to
``~/.wardgate``) unless ``--config`` names another. Every setting can also come
from an env var named after its path: ``security.token.session_expiry`` is
``WARDGATE_SECURITY_TOKEN_SESSION_EXPIRY``; values are read as YAML scalars (text settings verbatim)
(``true``, ``8766``, ``[a, b]``). An unknown key in the file or an unknown
``WARDGATE_<SECTION>_...`` variable is an error, so a typo cannot silently
leave a default in force.

``validate`` applies the rules of each security mode (DESIGN.md, "Modes"): a
configuration that contradicts its mode refuses to start, and the message
names the setting to change.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

from wardgate.errors import ConfigError

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8766
HOME_ENV: Final = "WARDGATE_HOME"
ENV_PREFIX: Final = "WARDGATE_"
MIB: Final = 1024 * 1024


class Mode(StrEnum):
    LOCAL = "local"
    AUTHENTICATED = "authenticated"
    REMOTE = "remote"
    ENTERPRISE = "enterprise"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    public_url: str = ""
    """Base URL clients use to reach wardgate (a tunnel URL, say); goes into pairing QR codes."""


class TokenSettings(_Section):
    pairing_expiry: int | None = None
    """Seconds a pairing token is valid: 3600, or 1800 in remote/enterprise modes."""
    session_expiry: int = 300
    refresh_expiry: int | None = None
    """Seconds a refresh (device) token is valid: 30 days, or 7 days in remote/enterprise."""
    auto_refresh: bool = True


class OriginSettings(_Section):
    allow_all: bool = False
    allowed: list[str] | None = None
    """Origin patterns; default: loopback origins in local and authenticated modes, none otherwise."""
    allow_missing: bool = True
    """Whether a request without an Origin header (non-browser clients) may pass."""


class TlsSettings(_Section):
    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    auto_cert: bool = False
    terminated_by_proxy: bool = False


class AuditSettings(_Section):
    enabled: bool | None = None
    """Default: on outside local mode."""
    log_file: str = ""
    log_connections: bool = True
    log_commands: bool = True
    log_prompts: bool = False
    max_bytes: int = 10 * MIB
    backups: int = 5


class RejectStyle(StrEnum):
    HTTP = "http"
    """Refuse a WebSocket upgrade with an HTTP status and a JSON body (the default)."""
    CLOSE = "close"
    """Accept the upgrade, then close with 1008 and the reason: for clients that cannot read
    an HTTP status (browsers). Only authentication and permission refusals; rate limits and
    capacity stay HTTP 429/503, so a flood never costs an upgrade."""


class CookieSettings(_Section):
    idle_ttl: int = 8 * 3600
    """Seconds a browser session cookie lives without use; every use extends it (sliding)."""
    max_ttl: int = 7 * 86400
    """Seconds after login when the cookie session ends however active it is."""
    path: str = "/"
    """The cookie's Path attribute."""
    secure: bool | None = None
    """The Secure attribute; default: on when wardgate serves TLS or a proxy terminates it."""


class SecuritySettings(_Section):
    mode: Mode = Mode.AUTHENTICATED
    require_auth: bool | None = None
    allow_query_token: bool = False
    reject_style: RejectStyle = RejectStyle.HTTP
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    ip_allow: list[str] = msgspec.field(default_factory=list)
    ip_deny: list[str] = msgspec.field(default_factory=list)
    token: TokenSettings = msgspec.field(default_factory=TokenSettings)
    origins: OriginSettings = msgspec.field(default_factory=OriginSettings)
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)
    cookie: CookieSettings = msgspec.field(default_factory=CookieSettings)


class UpstreamSettings(_Section):
    """One backend wardgate relays to (DESIGN.md, "Gateway proxy"). Only configuration names
    upstreams; a client can never supply or alter an upstream URL (seed 003, finding 5)."""

    url: str
    """The upstream's base, ``http://host:port/prefix`` or ``https://...``; the relayed path is
    appended to it. WebSocket relays use ``ws://``/``wss://`` derived from it."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Sent to the upstream on every request. A value may reference ``${ENV_VAR}`` or be
    ``@/path/to/file`` (the file's content, stripped), so a secret need not sit in the config."""
    allow_paths: list[str] = msgspec.field(default_factory=lambda: ["/**"])
    """Glob patterns over the relayed path (``*`` one segment, ``**`` any number)."""
    allow_methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "HEAD"])
    """HTTP methods the ``http`` relay passes; WebSocket and SSE relays are always GET."""
    max_connections_per_user: int = 10
    """Open relays (WebSocket and SSE) per principal to this upstream."""
    splice: bool = False
    """WebSocket frames pass without per-message checks (no message rate limit, no scrubbing of
    upstream frames): for upstreams that need none. Close reasons are still scrubbed."""
    timeout: float = 30.0
    """Seconds to connect to the upstream and, for the http relay, to receive its response."""
    max_body_bytes: int = 10 * MIB
    """Largest request body the http relay forwards."""
    ca_file: str = ""
    """https upstreams: a PEM file of the certificate authorities to trust for this upstream
    instead of the system's (a private CA, a self-signed development certificate). Host names
    are still checked."""


class StoreSettings(_Section):
    backend: str = "sqlite"
    """``sqlite`` (one machine) or ``redis`` (several instances acting as one)."""
    path: str = ""
    """SQLite file; default ``<data dir>/wardgate.db``."""
    url: str = ""
    """Redis: ``redis://host:6379/0`` or ``rediss://`` (TLS). Better without a password in it."""
    password: str = ""
    """Redis password: ``${ENV_VAR}`` or ``@/path/to/file`` (a literal works but sits in clear)."""
    prefix: str = "wardgate:"
    """Redis key prefix: instances sharing one prefix act as one gateway."""
    lease_ttl: float = 15.0
    """Redis: seconds before the connection slots of an instance that stopped renewing them
    (it died) free themselves; renewed every third of it."""
    poll_interval: float = 0.25
    """Seconds between checks for revocations made by other processes (with Redis, pub/sub
    delivers them at once and this poll is the reconciliation)."""


class LimitSettings(_Section):
    init_timeout: float = 10.0
    """Seconds a client has to send ``initialize`` after the upgrade (close 4408)."""
    max_message_bytes: int = MIB
    """Largest WebSocket message accepted, checked before any parsing (close 1009)."""
    heartbeat: float = 20.0
    """Seconds between pings; a peer that does not answer is disconnected. Relays: a side idle
    this long is pinged, and dropped if still silent a heartbeat later."""
    compression: bool = False
    """permessage-deflate on wardgate's JSON-RPC socket (relays never negotiate it). Off by
    default; when on, ``max_message_bytes`` caps the DECOMPRESSED size (a small compressed frame
    cannot expand past it)."""
    handshake_timeout: float = 10.0
    """Seconds a client has to send a complete HTTP request head (slow-header attacks); also
    how long an idle keep-alive HTTP connection stays open."""
    idle_timeout: float = 600.0
    """Seconds without a message from the client before the WebSocket is closed (0: never)."""
    max_connections: int = 1000
    """WebSocket connections open at once, in total (then 503 / close 1013)."""
    max_connections_per_ip: int = 50
    max_connections_per_principal: int = 20
    """Per paired device, API key or pairing code."""
    handshakes_per_ip: int = 120
    """Upgrade and auth API requests per client address per ``handshake_window`` (then 429)."""
    handshake_window: float = 60.0
    http_requests_per_ip: int = 1200
    """Requests through the HTTP relays (``/proxy/<name>/http/...``) per client address per
    ``handshake_window`` (then 429): pages make many, so they have their own budget."""
    auth_failures_per_ip: int = 10
    """Failed authentications per address per ``auth_failure_window`` before a lockout."""
    auth_failure_window: float = 300.0
    auth_lockout: float = 60.0
    """First lockout in seconds; it doubles while failures go on, up to ``auth_lockout_max``."""
    auth_lockout_max: float = 3600.0
    messages_per_principal: int = 2000
    """JSON-RPC messages per device/key per ``message_window``, summed over all its connections."""
    message_window: float = 10.0
    send_queue_messages: int = 1024
    """Messages queued for one connection before it counts as a slow consumer (close 1008)."""
    send_queue_bytes: int = 8 * MIB
    """Bytes queued for one connection before it counts as a slow consumer (close 1008)."""


class LoggingSettings(_Section):
    level: str = "info"
    format: str = "console"


class AgentSettings(_Section):
    command: list[str] = msgspec.field(default_factory=list)
    """Argument list run without a shell; ``{prompt}`` is replaced by the prompt as ONE argument,
    e.g. ``["claude", "-p", "{prompt}"]``. Empty: no agent can be run."""


DEFAULT_DENY: Final = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    ".git/config",
    ".git-credentials",
    ".netrc",
    ".npmrc",
    ".pypirc",
    "id_rsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".ssh/*",
    ".aws/*",
    ".docker/config.json",
    "credentials*",
    "secrets.*",
)
DEFAULT_AGENT_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "USER", "LOGNAME", "TMPDIR")


class WorkspaceSettings(_Section):
    root: str = "."
    agent: AgentSettings = msgspec.field(default_factory=AgentSettings)
    """The default agent (``agent_type`` omitted or ``"default"``)."""
    agents: dict[str, AgentSettings] = msgspec.field(default_factory=dict)
    """More named agents, chosen by ``agent/run``'s ``agent_type``."""
    max_running_agents: int = 1
    stop_grace: float = 5.0
    """Seconds between SIGTERM and SIGKILL when an agent is stopped."""
    env_allowlist: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_AGENT_ENV))
    """Environment variables passed to agents; nothing else from wardgate's environment is."""
    history_lines: int = 10_000
    """Output lines kept per agent session for catching up (``session/get``)."""
    max_line_bytes: int = 64 * 1024
    deny: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_DENY))
    """Glob patterns (relative to the workspace) that are never read, even inside it."""
    max_file_bytes: int = MIB
    max_list_entries: int = 5000


class Config(_Section):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    security: SecuritySettings = msgspec.field(default_factory=SecuritySettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    logging: LoggingSettings = msgspec.field(default_factory=LoggingSettings)
    workspace: WorkspaceSettings = msgspec.field(default_factory=WorkspaceSettings)
    upstreams: dict[str, UpstreamSettings] = msgspec.field(default_factory=dict)
    data_dir: str = ""
    """Where keys, the store and the audit log live; default ``$WARDGATE_HOME``."""

    @property
    def home(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def require_auth(self) -> bool:
        value = self.security.require_auth
        return self.security.mode is not Mode.LOCAL if value is None else value

    @property
    def audit_enabled(self) -> bool:
        value = self.security.audit.enabled
        return self.security.mode is not Mode.LOCAL if value is None else value

    @property
    def strict_mode(self) -> bool:
        return self.security.mode in (Mode.REMOTE, Mode.ENTERPRISE)

    @property
    def pairing_expiry(self) -> int:
        value = self.security.token.pairing_expiry
        return (1800 if self.strict_mode else 3600) if value is None else value

    @property
    def refresh_expiry(self) -> int:
        value = self.security.token.refresh_expiry
        return (7 if self.strict_mode else 30) * 86400 if value is None else value

    @property
    def origin_patterns(self) -> list[str]:
        if self.security.origins.allowed is not None:
            return self.security.origins.allowed
        if self.strict_mode:
            return []
        from wardgate.gate.origin import LOOPBACK_ORIGIN_PATTERNS

        return list(LOOPBACK_ORIGIN_PATTERNS)

    @property
    def store_path(self) -> Path:
        return Path(self.store.path).expanduser() if self.store.path else self.home / "wardgate.db"

    @property
    def audit_path(self) -> Path:
        log_file = self.security.audit.log_file
        return Path(log_file).expanduser() if log_file else self.home / "audit.log"

    @property
    def tls_enabled(self) -> bool:
        return self.security.tls.enabled or self.security.tls.auto_cert

    @property
    def cookie_secure(self) -> bool:
        value = self.security.cookie.secure
        if value is None:
            return self.tls_enabled or self.security.tls.terminated_by_proxy
        return value


def default_home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(HOME_ENV) or "~/.wardgate").expanduser()


def _leaf_paths(
    struct_type: type[msgspec.Struct], prefix: tuple[str, ...] = ()
) -> dict[str, tuple[str, ...]]:
    """Map ``WARDGATE_SECTION_KEY`` names to setting paths, from the schema itself."""
    out: dict[str, tuple[str, ...]] = {}
    for info in msgspec.structs.fields(struct_type):
        path = (*prefix, info.name)
        sub = info.type
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            out.update(_leaf_paths(sub, path))
        else:
            out[ENV_PREFIX + "_".join(path).upper()] = path
    return out


ENV_SETTINGS: Final = _leaf_paths(Config)


def _string_paths(struct_type: type[msgspec.Struct], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of settings typed ``str``: their env values are taken verbatim, not read as YAML
    (``WARDGATE_STORE_PREFIX=app:`` is the string ``app:``, not a mapping)."""
    out: set[tuple[str, ...]] = set()
    for info in msgspec.structs.fields(struct_type):
        path = (*prefix, info.name)
        if isinstance(info.type, type) and issubclass(info.type, msgspec.Struct):
            out |= _string_paths(info.type, path)
        elif info.type is str:
            out.add(path)
    return out


_STRING_SETTINGS: Final = _string_paths(Config)
_SECTIONS: Final = {name.upper() for name in Config.__struct_fields__}
# Variables that are not settings but share the prefix.
_NOT_SETTINGS: Final = {HOME_ENV, "WARDGATE_SIGNING_KEYS", "WARDGATE_SERVER_ID", "WARDGATE_CONFIG"}


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings given as ``WARDGATE_*`` env vars, as a nested dict."""
    tree: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        path = ENV_SETTINGS.get(name)
        if path is None:
            section = name[len(ENV_PREFIX) :].split("_", 1)[0]
            if section in _SECTIONS:
                raise ConfigError(
                    f"{name} is not a wardgate setting (see the README's configuration reference)"
                )
            continue
        if path in _STRING_SETTINGS:
            _set_path(tree, path, text)
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"{name}: the value is not a valid YAML scalar") from None
        _set_path(tree, path, value)
    return tree


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of settings")
    return data


def load_config(
    *,
    config_file: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration and check it against its mode."""
    env = os.environ if environ is None else environ
    home = default_home(env)
    path = config_file or (
        Path(env["WARDGATE_CONFIG"]) if env.get("WARDGATE_CONFIG") else home / "config.yaml"
    )
    if config_file is not None and not config_file.exists():
        raise ConfigError(f"config file {config_file} does not exist")
    tree: dict[str, Any] = {"data_dir": str(home)}
    tree = _merge(tree, read_config_file(path))
    tree = _merge(tree, env_overrides(env))
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_path(tree, tuple(dotted.split(".")), value)
    try:
        config = msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_describe(exc)}") from None
    validate(config)
    return config


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says e.g. "Expected `int`, got `str` - at `$.server.port`"; show the setting path.
    text = str(exc)
    message, _, where = text.partition(" - at `$.")
    if where:
        return f"{where.rstrip('`').replace('[', ' [')}: {message}"
    return message


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(config: Config) -> None:
    """Refuse a configuration that contradicts its mode, naming the setting to change."""
    sec = config.security
    mode = sec.mode
    if not 0 <= config.server.port < 65536:
        raise ConfigError(f"server.port {config.server.port} is not a TCP port (0-65535; 0 picks a free one)")
    if mode in (Mode.LOCAL, Mode.AUTHENTICATED) and not is_loopback_host(config.server.host):
        raise ConfigError(
            f"server.host {config.server.host!r} is not a loopback address, but security.mode "
            f"{mode.value!r} only listens on loopback; set security.mode: remote (with TLS) to "
            "accept connections from other machines"
        )
    if not config.require_auth and mode is not Mode.LOCAL:
        raise ConfigError(
            f"security.require_auth: false is only allowed in security.mode: local (mode is {mode.value!r})"
        )
    if sec.origins.allow_all and mode is not Mode.LOCAL:
        raise ConfigError(
            "security.origins.allow_all: true is only allowed in security.mode: local; "
            "list the allowed origins in security.origins.allowed instead"
        )
    if sec.tls.enabled and not sec.tls.auto_cert and not (sec.tls.cert_file and sec.tls.key_file):
        raise ConfigError(
            "security.tls.enabled needs security.tls.cert_file and security.tls.key_file, "
            "or security.tls.auto_cert: true"
        )
    if config.strict_mode:
        if not config.tls_enabled and not sec.tls.terminated_by_proxy:
            raise ConfigError(
                f"security.mode {mode.value!r} requires TLS: set security.tls.enabled: true "
                "(with security.tls.auto_cert: true or cert_file/key_file), or "
                "security.tls.terminated_by_proxy: true if a reverse proxy terminates TLS"
            )
        if not config.origin_patterns:
            raise ConfigError(
                f"security.mode {mode.value!r} requires an explicit origin list: "
                "set security.origins.allowed (e.g. ['https://*.devtunnels.ms'])"
            )
    if mode is Mode.ENTERPRISE and not config.audit_enabled:
        raise ConfigError("security.mode 'enterprise' requires security.audit.enabled: true")
    if config.store.backend not in ("sqlite", "redis"):
        raise ConfigError(f"store.backend {config.store.backend!r} is not one of: sqlite, redis")
    if config.store.backend == "redis" and not config.store.url:
        raise ConfigError("store.backend: redis needs store.url (redis:// or rediss://)")
    for name, value in (
        ("security.token.session_expiry", sec.token.session_expiry),
        ("security.token.pairing_expiry", config.pairing_expiry),
        ("security.token.refresh_expiry", config.refresh_expiry),
        ("security.cookie.idle_ttl", sec.cookie.idle_ttl),
        ("security.cookie.max_ttl", sec.cookie.max_ttl),
    ):
        if value <= 0:
            raise ConfigError(f"{name} must be positive")
    for name in LimitSettings.__struct_fields__:
        value = getattr(config.limits, name)
        if isinstance(value, bool):
            continue
        if value < 0 or (value == 0 and name != "idle_timeout"):
            raise ConfigError(f"limits.{name} must be positive")
    if not sec.cookie.path.startswith("/") or any(c in sec.cookie.path for c in ";, \t\r\n"):
        raise ConfigError("security.cookie.path must be a URL path starting with '/'")
    if config.logging.format not in ("console", "json"):
        raise ConfigError(f"logging.format {config.logging.format!r} is not one of: console, json")
    _validate_policies(config)
    from wardgate.proxy.upstream import validate_upstreams

    validate_upstreams(config.upstreams)


def _validate_policies(config: Config) -> None:
    """Parse origin patterns, host names and networks once so errors show at start."""
    from wardgate.gate.host import HostPolicy
    from wardgate.gate.network import parse_networks
    from wardgate.gate.origin import OriginPolicy

    sec = config.security
    for setting, build in (
        ("security.origins.allowed", lambda: OriginPolicy(config.origin_patterns)),
        ("security.allowed_hosts", lambda: HostPolicy(allowed_host_names(config))),
        ("security.trusted_proxies", lambda: parse_networks(sec.trusted_proxies)),
        ("security.ip_allow", lambda: parse_networks(sec.ip_allow)),
        ("security.ip_deny", lambda: parse_networks(sec.ip_deny)),
    ):
        try:
            build()
        except ValueError as exc:
            raise ConfigError(f"{setting}: {exc}") from None


def allowed_host_names(config: Config) -> list[str]:
    """Host header names accepted: loopback names, the bind address, the public URL's host, and the list."""
    from urllib.parse import urlsplit

    from wardgate.gate.host import DEFAULT_ALLOWED_HOSTS

    names = list(DEFAULT_ALLOWED_HOSTS)
    if config.server.host not in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        names.append(config.server.host)
    if config.server.public_url:
        public_host = urlsplit(config.server.public_url).hostname
        if public_host:
            names.append(public_host)
    names.extend(config.security.allowed_hosts)
    return list(dict.fromkeys(name.lower() for name in names))
