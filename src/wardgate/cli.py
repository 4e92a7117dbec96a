"""The ``wardgate`` command line: serve, pair, token, devices, security, doctor.

Every command reads the same configuration (file, env vars, flags) and works
on the same store as a running daemon; a revocation made here reaches the
daemon's live sockets within about a second (it polls the store's revision).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from wardgate import __version__
from wardgate.config import Config, Mode, load_config
from wardgate.errors import ConfigError, WardgateError

app = typer.Typer(
    name="wardgate",
    help="A secure WebSocket gateway: drive your coding agents from a phone, guard any backend.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Refresh tokens (one per paired device session).", no_args_is_help=True)
devices_app = typer.Typer(help="Paired devices.", no_args_is_help=True)
security_app = typer.Typer(help="Security status and the audit log.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (wgk_...) for services and scripts.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")
app.add_typer(keys_app, name="keys")
app.add_typer(security_app, name="security")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (default $WARDGATE_HOME/config.yaml).")
]


def _load(config_file: Path | None, **flags: Any) -> Config:
    try:
        return load_config(config_file=config_file, flags=flags)
    except ConfigError as exc:
        err.print(f"[red]wardgate: configuration error:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except WardgateError as exc:
        err.print(
            f"wardgate: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), highlight=False, markup=False
        )
        raise typer.Exit(1) from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- serve ------------------------------------------------------------------------------------


@app.command()
def serve(
    config_file: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8766; 0 picks a free one).")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Security mode.")] = None,
    workspace: Annotated[Path | None, typer.Option(help="Workspace directory (default: current).")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error.")] = None,
) -> None:
    """Run the daemon."""
    config = _load(
        config_file,
        **{
            "server.host": host,
            "server.port": port,
            "security.mode": mode.value if mode else None,
            "workspace.root": str(workspace) if workspace else None,
            "logging.level": log_level,
        },
    )
    from wardgate.logs import configure_logging

    configure_logging(config.logging.level, "json" if config.logging.format == "json" else "console")
    try:
        _serve_forever(config)
    except ConfigError as exc:
        err.print(f"wardgate: configuration error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(
            f"wardgate: cannot listen on {config.server.host}:{config.server.port}: {exc.strerror}",
            markup=False,
        )
        raise typer.Exit(1) from None


def _serve_forever(config: Config) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on supported platforms
        runner = asyncio.Runner()
    with runner:
        runner.run(_serve(config))


async def _serve(config: Config) -> None:
    import logging

    from aiohttp import web

    from wardgate.pairing import remove_runtime_file, write_runtime_file
    from wardgate.server.app import build_app, create_gateway
    from wardgate.server.tlsctx import server_ssl_for

    gateway = await create_gateway(config)
    ssl_context, fingerprint = server_ssl_for(config)
    app = build_app(gateway)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access"),
        handle_signals=False,
        # aiohttp arms this timer when a connection opens and closes it if no complete request
        # head arrived in time: the defence against slow-header (slowloris) clients.
        keepalive_timeout=config.limits.handshake_timeout,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context)
        await site.start()
        bound_port = runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        host = config.server.host if ":" not in config.server.host else f"[{config.server.host}]"
        print(
            f"wardgate {__version__} listening on {scheme}://{host}:{bound_port} "
            f"(mode {config.security.mode.value}, workspace {gateway.workspace})",
            flush=True,
        )
        write_runtime_file(config, f"{scheme}://{host}:{bound_port}")
        if fingerprint:
            print(f"TLS certificate SHA-256: {fingerprint}", flush=True)
        if config.require_auth:
            print("Pair a device with: wardgate pair", flush=True)
        await stop.wait()
    finally:
        remove_runtime_file(config)
        await runner.cleanup()


# --- pair -------------------------------------------------------------------------------------


@app.command()
def pair(
    config_file: ConfigOption = None,
    role: Annotated[str, typer.Option(help="Role of the device: viewer, operator or admin.")] = "operator",
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Invalidate every outstanding pairing code first.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the QR payload as JSON only.")] = False,
    ttl: Annotated[int | None, typer.Option(help="Seconds the code stays valid.")] = None,
) -> None:
    """Print a single-use pairing code: a QR code for a phone, a URL for a browser."""
    from wardgate.roles import Role

    if role not in {r.value for r in Role}:
        err.print(f"wardgate: --role must be one of: {', '.join(r.value for r in Role)}", markup=False)
        raise typer.Exit(2)
    config = _load(config_file)

    async def issue() -> dict[str, Any]:
        from wardgate.pairing import pairing_payload

        async with _authority(config) as authority:
            if refresh:
                await authority.store.bump_pairing_generation()
            token, claims = await authority.issue_pairing(role, ttl=ttl)
            _audit(config, "pairing.issued", role=role, refresh=refresh, expires=claims.exp)
            return pairing_payload(config, authority.keys.server_id, token, claims.exp)

    payload = _run(issue)
    if as_json:
        print(json.dumps(payload))
        return
    import segno

    from wardgate.pairing import browser_pairing_url

    qr = segno.make(json.dumps(payload, separators=(",", ":")), error="m")
    qr.terminal(compact=True)
    out.print(
        f"Scan with the wardgate app, or open in a browser:\n  {browser_pairing_url(payload)}",
        highlight=False,
    )
    out.print(
        f"Server: {payload['ws']}   role: {role}   valid until {payload['expiresAt']} (single use)",
        highlight=False,
    )
    if refresh:
        out.print("Every earlier pairing code is now invalid.")


# --- token / devices ----------------------------------------------------------------------------


class _AuthorityContext:
    def __init__(self, config: Config) -> None:
        self.config = config

    async def __aenter__(self) -> Any:
        from wardgate.authority import Authority
        from wardgate.server.app import load_keys, open_store

        self.store = open_store(self.config)
        await self.store.open()
        return Authority(
            keys=await load_keys(self.config, self.store),
            store=self.store,
            pairing_ttl=self.config.pairing_expiry,
            session_ttl=self.config.security.token.session_expiry,
            refresh_ttl=self.config.refresh_expiry,
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()


def _authority(config: Config) -> _AuthorityContext:
    return _AuthorityContext(config)


def _audit(config: Config, event: str, **fields: Any) -> None:
    if config.audit_enabled:
        from wardgate.audit import AuditLog

        AuditLog(
            config.audit_path,
            max_bytes=config.security.audit.max_bytes,
            backups=config.security.audit.backups,
        ).append(event, actor="cli", **fields)


@token_app.command("list")
def token_list(
    config_file: ConfigOption = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List active refresh tokens (one per device session), never their values."""
    config = _load(config_file)

    async def families() -> list[Any]:
        async with _authority(config) as authority:
            return list(await authority.store.list_families())

    rows = _run(families)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": f.id,
                        "device": f.device_id,
                        "created": f.created_at,
                        "lastUsed": f.last_used_at,
                        "expires": f.expires_at,
                    }
                    for f in rows
                ]
            )
        )
        return
    table = Table("ID", "Device", "Created", "Last used", "Expires")
    for f in rows:
        table.add_row(f.id, f.device_id, _when(f.created_at), _when(f.last_used_at), _when(f.expires_at))
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, config_file: ConfigOption = None) -> None:
    """Revoke one refresh token and every session derived from it."""
    config = _load(config_file)

    async def revoke() -> bool:
        async with _authority(config) as authority:
            return bool(await authority.store.revoke_family(token_id, now=time.time()))

    if not _run(revoke):
        err.print(f"wardgate: no active token {token_id!r}", markup=False)
        raise typer.Exit(1)
    _audit(config, "token.revoked", family=token_id)
    out.print(f"Revoked {token_id}; its live sessions close within a second.", highlight=False)


@token_app.command("revoke-all")
def token_revoke_all(config_file: ConfigOption = None) -> None:
    """Revoke every token and pairing code; every device must pair again."""
    config = _load(config_file)

    async def revoke_all() -> int:
        async with _authority(config) as authority:
            return int(await authority.store.revoke_all(now=time.time()))

    count = _run(revoke_all)
    _audit(config, "token.revoked_all", count=count)
    out.print(f"Revoked {count} token(s) and every outstanding pairing code.")


@devices_app.command("list")
def devices_list(
    config_file: ConfigOption = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List paired devices with their role and status."""
    config = _load(config_file)

    async def devices() -> list[Any]:
        async with _authority(config) as authority:
            return list(await authority.store.list_devices())

    rows = _run(devices)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": d.id,
                        "name": d.name,
                        "role": d.role,
                        "created": d.created_at,
                        "lastSeen": d.last_seen,
                        "lastIp": d.last_ip,
                        "revoked": d.revoked_at is not None,
                    }
                    for d in rows
                ]
            )
        )
        return
    table = Table("ID", "Name", "Role", "Paired", "Last seen", "Last IP", "Status")
    for d in rows:
        status = "[red]revoked[/red]" if d.revoked_at else "[green]active[/green]"
        table.add_row(d.id, d.name, d.role, _when(d.created_at), _when(d.last_seen), d.last_ip or "-", status)
    out.print(table)


@devices_app.command("revoke")
def devices_revoke(device_id: str, config_file: ConfigOption = None) -> None:
    """Revoke a device: its tokens die and its live connections close."""
    config = _load(config_file)

    async def revoke() -> bool:
        async with _authority(config) as authority:
            return bool(await authority.store.revoke_device(device_id, now=time.time()))

    if not _run(revoke):
        err.print(f"wardgate: no active device {device_id!r}", markup=False)
        raise typer.Exit(1)
    _audit(config, "device.revoked", device=device_id, by="cli")
    out.print(f"Revoked {device_id}; its live connections close within a second.", highlight=False)


# --- API keys -----------------------------------------------------------------------------------

_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h``, ``30d`` or ``2w`` as seconds (positive)."""
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:], 0)
    number = value[:-1] if unit else value
    if not (number.isascii() and number.isdigit()) or int(number) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration such as 3600, 30m, 12h, 30d or 2w")
    return int(number) * (unit or 1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="What the key is for (shown in 'keys list').")],
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")] = "operator",
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime such as 30d or 12h (default: until revoked).")
    ] = None,
    config_file: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an API key. It is printed once; only its hash is stored."""
    from wardgate.roles import Role

    if role not in {r.value for r in Role}:
        raise typer.BadParameter(f"{role!r} is not one of: viewer, operator, admin", param_hint="--role")
    ttl = parse_duration(expires) if expires is not None else None
    config = _load(config_file)

    async def create() -> tuple[str, Any]:
        async with _authority(config) as authority:
            return tuple(await authority.create_api_key(name, role, ttl=ttl))

    secret, key = _run(create)
    _audit(config, "apikey.created", key=key.id, role=key.role)
    if as_json:
        print(
            json.dumps(
                {"id": key.id, "name": key.name, "role": key.role, "expires": key.expires_at, "key": secret}
            )
        )
        return
    err.print(
        f"Created API key {key.id} ({key.name}, {key.role}). It is shown once; store it now:",
        highlight=False,
        markup=False,
    )
    print(secret)


@keys_app.command("list")
def keys_list(
    config_file: ConfigOption = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List API keys, never their values."""
    config = _load(config_file)

    async def keys() -> list[Any]:
        async with _authority(config) as authority:
            return list(await authority.store.list_api_keys(include_revoked=include_revoked))

    rows = _run(keys)
    now = time.time()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "name": k.name,
                        "role": k.role,
                        "created": k.created_at,
                        "lastUsed": k.last_used_at,
                        "expires": k.expires_at,
                        "revoked": k.revoked_at is not None,
                    }
                    for k in rows
                ]
            )
        )
        return
    table = Table("ID", "Name", "Role", "Created", "Last used", "Expires", "Status")
    for k in rows:
        if k.revoked_at is not None:
            status = "[red]revoked[/red]"
        elif not k.usable(now):
            status = "[yellow]expired[/yellow]"
        else:
            status = "[green]active[/green]"
        table.add_row(
            k.id, k.name, k.role, _when(k.created_at), _when(k.last_used_at), _when(k.expires_at), status
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config_file: ConfigOption = None) -> None:
    """Revoke an API key: it stops working and connections using it close."""
    config = _load(config_file)

    async def revoke() -> bool:
        async with _authority(config) as authority:
            return bool(await authority.revoke_api_key(key_id))

    if not _run(revoke):
        err.print(f"wardgate: no active API key {key_id!r}", markup=False)
        raise typer.Exit(1)
    _audit(config, "apikey.revoked", key=key_id, by="cli")
    out.print(f"Revoked {key_id}; its live connections close within a second.", highlight=False)


# --- security -----------------------------------------------------------------------------------


@security_app.command("status")
def security_status(config_file: ConfigOption = None) -> None:
    """Show the effective security configuration."""
    config = _load(config_file)

    async def counts() -> tuple[int, int, str]:
        async with _authority(config) as authority:
            devices = [d for d in await authority.store.list_devices() if d.revoked_at is None]
            families = await authority.store.list_families()
            return len(devices), len(families), authority.keys.active_kid

    devices, families, kid = _run(counts)
    sec = config.security
    table = Table("Setting", "Value", show_header=False)
    rows = [
        ("mode", sec.mode.value),
        ("listen", f"{config.server.host}:{config.server.port}"),
        ("authentication", "required" if config.require_auth else "off (local mode)"),
        (
            "TLS",
            "on" if config.tls_enabled else ("terminated by proxy" if sec.tls.terminated_by_proxy else "off"),
        ),
        ("allowed origins", ", ".join(config.origin_patterns) or "-"),
        ("requests without Origin", "allowed" if sec.origins.allow_missing else "refused"),
        ("query-string tokens", "enabled" if sec.allow_query_token else "disabled"),
        ("trusted proxies", ", ".join(sec.trusted_proxies) or "-"),
        ("audit log", str(config.audit_path) if config.audit_enabled else "off"),
        ("data directory", str(config.home)),
        ("signing key id", kid),
        (
            "token lifetimes",
            f"pairing {config.pairing_expiry}s, session {sec.token.session_expiry}s, "
            f"refresh {config.refresh_expiry}s",
        ),
        ("paired devices", str(devices)),
        ("active refresh tokens", str(families)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


@security_app.command("audit")
def security_audit(
    config_file: ConfigOption = None,
    since: Annotated[
        str | None, typer.Option(help="Only events after this: ISO time, or 30m / 12h / 7d ago.")
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", help="Only this event type, e.g. auth.failed.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Only events of this device id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the hash chain; name the first broken line.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many (newest) events.")] = 200,
) -> None:
    """Show security events from the tamper-evident audit log, or verify its chain."""
    from wardgate.audit import read_audit, verify_audit

    config = _load(config_file)
    path = config.audit_path
    if verify:
        result = verify_audit(path)
        if result.ok:
            out.print(
                f"[green]OK[/green]: {result.lines} line(s), the hash chain is intact ({path}).",
                highlight=False,
            )
            return
        where = (
            f"{result.first_bad.file.name} line {result.first_bad.line_number}" if result.first_bad else "?"
        )
        err.print(f"wardgate: audit log TAMPERED at {where}: {result.detail}", markup=False, highlight=False)
        raise typer.Exit(1)
    try:
        threshold = _parse_since(since) if since else None
    except ValueError:
        err.print("wardgate: --since takes an ISO 8601 time or a duration like 30m, 12h, 7d", markup=False)
        raise typer.Exit(2) from None
    events = list(read_audit(path, since=threshold, event=event_type, device=device))[-limit:]
    if as_json:
        for record in events:
            print(json.dumps(record, separators=(",", ":")))
        return
    table = Table("Time", "Event", "Device", "Address", "Details")
    skip = {"ts", "seq", "event", "prev", "device", "ip"}
    for record in events:
        details = " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
        table.add_row(
            str(record.get("ts", "")),
            str(record.get("event", "")),
            str(record.get("device", "-")),
            str(record.get("ip", "-")),
            details,
        )
    out.print(table)
    if not events:
        out.print(f"No matching events in {path}.", highlight=False)


def _parse_since(text: str) -> datetime:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.fromtimestamp(time.time() - int(text[:-1]) * units[text[-1]], UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- doctor -----------------------------------------------------------------------------------------


@app.command()
def doctor(
    config_file: ConfigOption = None,
    origin: Annotated[
        str | None, typer.Option(help="The Origin header the client sends (omit: none).")
    ] = None,
    host: Annotated[str, typer.Option(help="The Host header the client sends.")] = "127.0.0.1:8766",
    ip: Annotated[
        str, typer.Option(help="The address wardgate sees the connection come from.")
    ] = "127.0.0.1",
    forwarded_for: Annotated[
        str | None, typer.Option("--forwarded-for", help="The X-Forwarded-For header, if a proxy adds one.")
    ] = None,
    token: Annotated[str | None, typer.Option(help="A token to verify (never printed).")] = None,
    cookie: Annotated[
        bool, typer.Option("--cookie", help="Pretend the token comes in the session cookie.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the gate on a described request, without a network, and say which check decides."""
    from wardgate.gate.credentials import SESSION_COOKIE
    from wardgate.gate.decide import GatePolicy, HandshakeFacts, Verdict, precheck

    config = _load(config_file)
    headers: dict[str, str] = {}
    if token:
        headers["Cookie" if cookie else "Authorization"] = (
            f"{SESSION_COOKIE}={token}" if cookie else f"Bearer {token}"
        )
    from multidict import CIMultiDict

    facts = HandshakeFacts(
        peer=ip,
        host=host,
        origin=origin,
        forwarded_for=forwarded_for,
        headers=CIMultiDict(headers),
        scheme="https" if config.tls_enabled else "http",
    )
    check = precheck(facts, GatePolicy.from_config(config))
    verdicts = list(check.verdicts)
    failure = check.failure
    if failure is None:
        if check.credential is None:
            if config.require_auth:
                failure = _authentication_required()
                verdicts.append(
                    Verdict("authentication", False, "no credential, and authentication is required")
                )
            else:
                verdicts.append(Verdict("authentication", True, "not required (local mode)"))
        else:
            credential = check.credential

            async def verify() -> str:
                async with _authority(config) as authority:
                    await authority.reload_revocations()
                    principal = await authority.authenticate(credential.token)
                    return f"valid {principal.kind} token, role {principal.role}"

            try:
                verdicts.append(Verdict("authentication", True, asyncio.run(verify())))
            except WardgateError as exc:
                failure = exc
                verdicts.append(Verdict("authentication", False, exc.hint or exc.message))
    if as_json:
        print(
            json.dumps(
                {
                    "allowed": failure is None,
                    "reason": failure.reason if failure else None,
                    "status": failure.http_status if failure else 101,
                    "clientIp": str(check.client_ip) if check.client_ip else None,
                    "checks": [
                        {"check": v.check, "allowed": v.allowed, "detail": v.detail} for v in verdicts
                    ],
                    "hint": failure.hint if failure else None,
                }
            )
        )
    else:
        table = Table("Check", "Verdict", "Why")
        for v in verdicts:
            table.add_row(v.check, "[green]pass[/green]" if v.allowed else "[red]refuse[/red]", v.detail)
        out.print(table)
        if failure is None:
            out.print("[green]Allowed[/green]: the upgrade would proceed (101).")
        else:
            out.print(
                f"[red]Refused[/red] with HTTP {failure.http_status} [bold]{failure.reason}[/bold]"
                + (f": {failure.hint}" if failure.hint else ""),
                highlight=False,
            )
    if failure is not None:
        raise typer.Exit(1)


def _authentication_required() -> WardgateError:
    from wardgate.errors import AuthenticationRequired

    return AuthenticationRequired(
        hint="send a token (Authorization: Bearer, or the wardgate.bearer subprotocol)"
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)
