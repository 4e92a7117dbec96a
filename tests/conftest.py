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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ISSUED: set[str] = set()
LOG_FILES: list[Path] = []
_IN_PROCESS_LOG = io.StringIO()
TOKEN_SHAPE = re.compile(r"wg[psrk]_[A-Za-z0-9_-]{8,}")


def remember(*secrets: str | None) -> None:
    """Register secrets that must never appear in any log."""
    for secret in secrets:
        if secret:
            ISSUED.add(secret)


def pytest_configure(config: pytest.Config) -> None:
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
    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []

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
        extra.update(env or {})
        daemon = Daemon(home=home, workspace=workspace, env=_clean_env(home, extra))
        self.daemons.append(daemon)
        return daemon.start() if start else daemon

    def stop_all(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


@pytest.fixture
def wardgate(tmp_path: Path) -> Iterator[DaemonFactory]:
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.stop_all()
    # Collect now, so a socket a test left open is reported against that test, not a later one.
    gc.collect()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with default settings for tests that do not change configuration."""
    factory = DaemonFactory(tmp_path_factory.mktemp("shared"))
    yield factory()
    factory.stop_all()
