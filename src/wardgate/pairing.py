"""The pairing payload: what a QR code or a pairing link carries (seed 000's shape).

``{"ws", "http", "session", "repo", "token"}`` plus ``certSha256`` when wardgate
serves its own certificate (the client pins it) and ``expiresAt``. A browser
pairing link carries the token in the URL *fragment*, which browsers never send
to a server, so it cannot end up in an access log or a Referer header.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from wardgate.config import Config
from wardgate.server.ws import iso8601

RUNTIME_FILE = "daemon.json"
"""Written by a running daemon in the data directory: its pid and the address it really bound."""


def write_runtime_file(config: Config, http_url: str) -> None:
    path = config.home / RUNTIME_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "http": http_url}))
    os.replace(tmp, path)


def remove_runtime_file(config: Config) -> None:
    path = config.home / RUNTIME_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def running_daemon_url(config: Config) -> str | None:
    """The address of the daemon running on this data directory, if one is."""
    try:
        info = json.loads((config.home / RUNTIME_FILE).read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["http"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def base_urls(config: Config) -> tuple[str, str]:
    """The (http, ws) base URLs clients should use: public_url, the running daemon, or the config."""
    running = running_daemon_url(config)
    if config.server.public_url:
        http = config.server.public_url.rstrip("/")
    elif running:
        http = running
    else:
        scheme = "https" if config.tls_enabled else "http"
        host = config.server.host
        if host in ("0.0.0.0", "::"):  # noqa: S104 - naming, not binding
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        http = f"{scheme}://{host}:{config.server.port}"
    ws = "ws" + http[4:] if http.startswith("http") else http
    return http, ws


def pairing_payload(config: Config, server_id: str, token: str, expires_at: int) -> dict[str, Any]:
    http, ws = base_urls(config)
    payload: dict[str, Any] = {
        "ws": f"{ws}/ws",
        "http": http,
        "session": server_id,
        "repo": Path(config.workspace.root).expanduser().resolve().name,
        "token": token,
        "expiresAt": iso8601(expires_at),
    }
    fingerprint = current_fingerprint(config)
    if fingerprint:
        payload["certSha256"] = fingerprint
    return payload


def current_fingerprint(config: Config) -> str | None:
    """The SHA-256 of the certificate wardgate serves, if it serves one it can read."""
    from wardgate.tls import AUTO_CERT_FILE_NAME, TLS_DIR_NAME, fingerprint_from_file

    tls = config.security.tls
    if tls.auto_cert:
        path = config.home / TLS_DIR_NAME / AUTO_CERT_FILE_NAME
    elif tls.enabled and tls.cert_file:
        path = Path(tls.cert_file).expanduser()
    else:
        return None
    try:
        return fingerprint_from_file(path)
    except (OSError, ValueError):
        return None


def browser_pairing_url(payload: dict[str, Any]) -> str:
    return f"{payload['http']}/pair#token={quote(payload['token'], safe='')}"
