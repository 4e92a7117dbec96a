"""Shared fixtures: real wardgate daemons in subprocesses, and the suite-wide secret scan.

Every token a test obtains is registered with ``remember``; when the session
ends, every line any daemon or in-process logger wrote during the whole run is
scanned, and the run fails if an issued secret, or anything shaped like an
unredacted wardgate token, appears in it.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import (  # noqa: F401 - fixtures for every test module
    delete_prefix,
    private_redis,
    private_redis_factory,
    redis_prefix,
    redis_url,
)
from wardgate.keys import KeyRing, load_key_ring, ring_from_json

ISSUED: set[str] = set()
LOG_FILES: list[Path] = []
_IN_PROCESS_LOG = io.StringIO()
TOKEN_SHAPE = re.compile(r"wg[psrkc]_[A-Za-z0-9_-]{8,}")


def remember(*secrets: str | None) -> None:
    """Register secrets that must never appear in any log."""
    for secret in secrets:
        if secret:
            ISSUED.add(secret)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-backend",
        choices=("sqlite", "redis"),
        default="sqlite",
        help="the store every daemon (and its CLI) of the end-to-end tests uses",
    )


STORE_BACKEND = "sqlite"
"""Set from ``--store-backend`` when the session starts."""


def pytest_configure(config: pytest.Config) -> None:
    global STORE_BACKEND
    STORE_BACKEND = str(config.getoption("--store-backend"))
    handler = logging.StreamHandler(_IN_PROCESS_LOG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)


def scan_for_secrets(texts: dict[str, str], secrets: set[str]) -> list[str]:
    """Findings (never the secret itself): which source leaked what kind of thing."""
    findings = []
    for source, text in texts.items():
        for secret in secrets:
            if secret in text:
                findings.append(f"{source}: contains an issued {secret[:4]} credential")
        for match in TOKEN_SHAPE.finditer(text):
            findings.append(f"{source}: contains an unredacted token-shaped string ({match.group()[:4]}...)")
    return findings


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    texts = {str(path): path.read_text(errors="replace") for path in LOG_FILES if path.exists()}
    texts["in-process logging"] = _IN_PROCESS_LOG.getvalue()
    findings = scan_for_secrets(texts, ISSUED)
    if findings:
        sys.stderr.write("\nSECRET SCAN FAILED:\n" + "\n".join(sorted(set(findings))[:50]) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif ISSUED:
        sys.stderr.write(f"\nsecret scan: {len(ISSUED)} issued credentials, {len(texts)} logs, no leak\n")


def _clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDGATE_")}
    env["WARDGATE_HOME"] = str(home)
    env.update(extra or {})
    return env


@dataclass
class Daemon:
    """A real ``wardgate serve`` process on a free loopback port."""

    home: Path
    workspace: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path | None = None
    starts: int = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> Daemon:
        self.starts += 1
        self.log_path = self.home.parent / f"daemon-{self.home.name}-{self.starts}.log"
        LOG_FILES.append(self.log_path)
        log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", "wardgate", "serve", "--port", str(self.port), "--log-level", "debug"]
        cmd += ["--workspace", str(self.workspace), *self.args]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workspace
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"listening on https?://[^ ]+:(\d+)", text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"wardgate exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError("wardgate did not start in time:\n" + self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def logs(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in LOG_FILES if p.name.startswith(f"daemon-{self.home.name}-")
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "wardgate", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.workspace,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"wardgate {args[0]} failed ({result.returncode}): {result.stderr}")
        return result

    def stored_bytes(self) -> bytes:
        """Everything the daemon's store holds, raw: the SQLite files, or every value under its
        Redis prefix (to show what is, and is not, kept)."""
        url = self.env.get("WARDGATE_STORE_URL")
        if url is None:
            db = self.home / "wardgate.db"
            return b"".join(p.read_bytes() for p in (db, db.with_name("wardgate.db-wal")) if p.exists())
        import redis

        client: Any = redis.Redis.from_url(url, socket_timeout=5)
        try:
            parts: list[bytes] = []
            for key in client.scan_iter(match=self.env["WARDGATE_STORE_PREFIX"] + "*", count=1000):
                kind = client.type(key)
                if kind == b"string":
                    parts.append(client.get(key) or b"")
                elif kind == b"hash":
                    parts.extend(k + b"=" + v for k, v in client.hgetall(key).items())
                elif kind == b"set":
                    parts.extend(client.smembers(key))
                elif kind == b"zset":
                    parts.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
                elif kind == b"list":
                    parts.extend(client.lrange(key, 0, -1))
                parts.append(key)
            return b"\n".join(parts)
        finally:
            client.close()

    def key_ring(self) -> KeyRing:
        """The daemon's signing keys (for tests that forge tokens): its key file, or Redis."""
        url = self.env.get("WARDGATE_STORE_URL")
        if url is None:
            return load_key_ring(self.home, environ={})
        import redis

        client: Any = redis.Redis.from_url(url, socket_timeout=5)
        try:
            return ring_from_json(client.get(self.env["WARDGATE_STORE_PREFIX"] + "keyring"), "test")
        finally:
            client.close()

    def pair_payload(self, role: str = "operator", *extra: str) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.cli("pair", "--json", "--role", role, *extra).stdout)
        remember(payload["token"])
        return payload

    def pairing_token(self, role: str = "operator") -> str:
        return str(self.pair_payload(role)["token"])


RELAXED_LIMITS = {
    "WARDGATE_LIMITS_AUTH_FAILURES_PER_IP": "100000",
    "WARDGATE_LIMITS_HANDSHAKES_PER_IP": "100000",
    "WARDGATE_LIMITS_MAX_CONNECTIONS_PER_IP": "10000",
}


class DaemonFactory:
    def __init__(self, root: Path, store_url: str | None = None) -> None:
        self.root = root
        self.redis_url = store_url
        """With the Redis backend: every daemon gets its own key prefix on this server."""
        self.daemons: list[Daemon] = []
        self.prefixes: list[str] = []

    def store_env(self) -> dict[str, str]:
        """The settings that put a daemon (and its CLI) on the session's store backend."""
        if self.redis_url is None:
            return {}
        prefix = f"wgtest:{uuid.uuid4().hex[:12]}:"
        self.prefixes.append(prefix)
        return {
            "WARDGATE_STORE_BACKEND": "redis",
            "WARDGATE_STORE_URL": self.redis_url,
            "WARDGATE_STORE_PREFIX": prefix,
        }

    def __call__(
        self, config: str = "", *, env: dict[str, str] | None = None, start: bool = True, relaxed: bool = True
    ) -> Daemon:
        """A daemon with ``config`` as its config file. ``relaxed`` lifts the per-address limits
        (every test client comes from 127.0.0.1); tests of those limits pass ``relaxed=False``."""
        home = self.root / f"home{len(self.daemons)}"
        home.mkdir(mode=0o700)
        workspace = self.root / f"workspace{len(self.daemons)}"
        workspace.mkdir()
        if config:
            (home / "config.yaml").write_text(config)
        extra = dict(RELAXED_LIMITS if relaxed else {})
        extra.update(self.store_env())
        extra.update(env or {})
        daemon = Daemon(home=home, workspace=workspace, env=_clean_env(home, extra))
        self.daemons.append(daemon)
        return daemon.start() if start else daemon

    def stop_all(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self.redis_url is not None:
            for prefix in self.prefixes:
                delete_prefix(self.redis_url, prefix)


def store_url_for(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL daemons use when this run is on the Redis backend (`--store-backend`)."""
    return str(request.getfixturevalue("redis_url")) if STORE_BACKEND == "redis" else None


@pytest.fixture
def wardgate(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path, store_url_for(request))
    yield factory
    factory.stop_all()
    # Collect now, so a socket a test left open is reported against that test, not a later one.
    gc.collect()


@pytest.fixture(scope="module")
def shared_daemon(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Daemon]:
    """One daemon with default settings for tests that do not change configuration."""
    factory = DaemonFactory(tmp_path_factory.mktemp("shared"), store_url_for(request))
    yield factory()
    factory.stop_all()
