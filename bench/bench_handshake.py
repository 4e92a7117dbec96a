"""Authenticated handshake + ``initialize`` rate against the same server with auth off.

DESIGN.md target: authenticated >= 0.9x unauthenticated.

Three real ``wardgate serve`` daemons run at once on loopback, each with its own
``WARDGATE_HOME``, rate and connection limits raised so nothing is throttled:

* ``auth``: the default ``authenticated`` mode; the client holds a session token
  (``wardgate pair --json`` then ``POST /api/auth/exchange``) and sends it as
  ``Authorization: Bearer``; audit log off;
* ``noauth``: ``security: {mode: local, require_auth: false}``, no token; audit log off;
* ``auth+audit`` (unless ``--no-audit-row``): as ``auth`` with the audit log on;
* ``auth+redis`` (with ``--redis URL``): as ``auth`` with ``store.backend: redis`` on that
  server (a fresh key prefix, deleted afterwards): handshake limits, the connection lease and
  its release become Redis round trips.

One client process runs N concurrent workers, each looping: open the WebSocket
(subprotocol ``wardgate.v1``), send ``initialize``, await its result, close.
Rounds alternate between the daemons (A/B/C, A/B/C, ...) for a fixed duration
each; reported are the median handshakes/s, the median ratio of each round to the
``noauth`` round next to it, and the daemon's CPU time per handshake (from
/proc/<pid>/stat), which does not depend on how fast the client is.

The client and the daemons share the machine's cores (2 on the reference box), so
the rate is bounded by client and server together; the CPU-per-handshake column is
the server-only view. Exits non-zero only if something crashes.

    .venv/bin/python bench/bench_handshake.py [--workers 8] [--rounds 8] [--seconds 3]
        [--no-audit-row] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

TARGET_RATIO = 0.9
INITIALIZE = json.dumps({"jsonrpc": "2.0", "method": "initialize", "params": {}, "id": 1})
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Limits raised so the benchmark measures work, not throttling (every client is 127.0.0.1).
BENCH_ENV = {
    "WARDGATE_LIMITS_HANDSHAKES_PER_IP": "100000000",
    "WARDGATE_LIMITS_MAX_CONNECTIONS_PER_IP": "100000",
    "WARDGATE_LIMITS_MAX_CONNECTIONS_PER_PRINCIPAL": "100000",
    "WARDGATE_LIMITS_MESSAGES_PER_PRINCIPAL": "100000000",
    "WARDGATE_SECURITY_AUDIT_ENABLED": "false",
    "WARDGATE_LOGGING_LEVEL": "warning",
}
NOAUTH_CONFIG = "security:\n  mode: local\n  require_auth: false\n"


def machine() -> str:
    """``N cores, <model name>, Python x.y.z`` for the report."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


@dataclass
class BenchDaemon:
    """A real ``wardgate serve --port 0`` subprocess (the approach of tests/conftest.py)."""

    name: str
    root: Path
    config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    token: str | None = None

    @property
    def home(self) -> Path:
        return self.root / f"home-{self.name}"

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.name}.log"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def full_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WARDGATE_")}
        env["WARDGATE_HOME"] = str(self.home)
        env.update(self.env)
        return env

    def command(self, workspace: Path) -> list[str]:
        return [sys.executable, "-m", "wardgate", "serve", "--port", "0", "--workspace", str(workspace)]

    def start(self, timeout: float = 30.0) -> BenchDaemon:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        workspace = self.root / f"workspace-{self.name}"
        workspace.mkdir(exist_ok=True)
        if self.config:
            (self.home / "config.yaml").write_text(self.config)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(workspace),
                env=self.full_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workspace,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = re.search(r"listening on https?://[^ ]+:(\d+)", text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: wardgate exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: wardgate did not start in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def obtain_session(self, http: aiohttp.ClientSession) -> str:
        """A session token: ``wardgate pair --json``, then ``POST /api/auth/exchange``."""
        pair = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wardgate",
            "pair",
            "--json",
            env=self.full_env(),
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(pair.communicate(), 60)
        if pair.returncode != 0:
            raise RuntimeError(f"{self.name}: wardgate pair failed ({pair.returncode})")
        pairing = json.loads(stdout)["token"]
        body = {"token": pairing, "deviceName": f"bench-{self.name}"}
        async with http.post(f"{self.http}/api/auth/exchange", json=body) as response:
            response.raise_for_status()
            self.token = str((await response.json())["sessionToken"])
        return self.token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc/<pid>/status")


async def _handshake(http: aiohttp.ClientSession, daemon: BenchDaemon) -> None:
    async with http.ws_connect(daemon.ws, protocols=("wardgate.v1",), headers=daemon.headers()) as ws:
        await ws.send_str(INITIALIZE)
        reply = await ws.receive_json(timeout=10)
        if "result" not in reply:
            raise RuntimeError(f"{daemon.name}: initialize failed: {reply.get('error')}")


async def run_round(
    http: aiohttp.ClientSession, daemon: BenchDaemon, workers: int, seconds: float
) -> tuple[float, float]:
    """(handshakes per second, daemon CPU microseconds per handshake) over one round."""
    count = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < stop_at:
            await _handshake(http, daemon)
            count += 1

    cpu0 = daemon.cpu_seconds()
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.monotonic() - started
    # Let the daemon finish the last closes before reading its CPU time.
    await asyncio.sleep(0.2)
    cpu = daemon.cpu_seconds() - cpu0
    return count / elapsed, cpu / max(count, 1) * 1e6


async def bench(args: argparse.Namespace, root: Path) -> None:
    daemons = [
        BenchDaemon("auth", root, env=dict(BENCH_ENV)),
        BenchDaemon("noauth", root, config=NOAUTH_CONFIG, env=dict(BENCH_ENV)),
    ]
    if not args.no_audit_row:
        daemons.append(
            BenchDaemon("auth+audit", root, env={**BENCH_ENV, "WARDGATE_SECURITY_AUDIT_ENABLED": "true"})
        )
    prefix = f"wgbench:{uuid.uuid4().hex[:12]}:"
    if args.redis:
        redis_env = {
            "WARDGATE_STORE_BACKEND": "redis",
            "WARDGATE_STORE_URL": args.redis,
            "WARDGATE_STORE_PREFIX": prefix,
        }
        daemons.append(BenchDaemon("auth+redis", root, env={**BENCH_ENV, **redis_env}))
    try:
        for daemon in daemons:
            daemon.start()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for daemon in daemons:
                if daemon.name != "noauth":
                    await daemon.obtain_session(http)
            # Warm-up: imports, caches, the first connections of each daemon.
            for daemon in daemons:
                await run_round(http, daemon, args.workers, 1.0)
            rates: dict[str, list[float]] = {d.name: [] for d in daemons}
            cpu: dict[str, list[float]] = {d.name: [] for d in daemons}
            ratios: dict[str, list[float]] = {d.name: [] for d in daemons}
            cpu_ratios: dict[str, list[float]] = {d.name: [] for d in daemons}
            for rnd in range(args.rounds):
                order = daemons if rnd % 2 == 0 else daemons[::-1]
                this_round: dict[str, tuple[float, float]] = {}
                for daemon in order:
                    this_round[daemon.name] = await run_round(http, daemon, args.workers, args.seconds)
                    rate, us = this_round[daemon.name]
                    rates[daemon.name].append(rate)
                    cpu[daemon.name].append(us)
                    print(f"  round {rnd + 1} {daemon.name:<11} {rate:8.0f} handshakes/s {us:7.0f} µs CPU/hs")
                base_rate, base_cpu = this_round["noauth"]
                for name, (rate, us) in this_round.items():
                    ratios[name].append(rate / base_rate)
                    cpu_ratios[name].append(base_cpu / us)
            rss = {d.name: d.rss_kib() for d in daemons}
    finally:
        for daemon in daemons:
            daemon.stop()
        if args.redis:
            await delete_prefix(args.redis, prefix)

    print()
    head = f"{'daemon':<12} {'handshakes/s':>13} {'min':>7} {'max':>7} {'ratio':>7}"
    print(f"{head} {'server CPU/hs':>14} {'RSS':>9}")
    for daemon in daemons:
        name = daemon.name
        med_cpu = statistics.median(cpu[name])
        print(
            f"{name:<12} {statistics.median(rates[name]):>13.0f} {min(rates[name]):>7.0f} "
            f"{max(rates[name]):>7.0f} {statistics.median(ratios[name]):>6.2f}x "
            f"{med_cpu:>8.0f} µs ({statistics.median(cpu_ratios[name]):.2f}x) {rss[name]:>6} KiB"
        )
    print()
    ratio = statistics.median(ratios["auth"])
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"target: authenticated >= {TARGET_RATIO}x the rate with auth off: {ratio:.2f}x {verdict}")
    cpu_ratio = statistics.median(cpu_ratios["auth"])
    verdict = "PASS" if cpu_ratio >= TARGET_RATIO else "MISS"
    print(f"server-side view: noauth CPU per handshake / auth CPU per handshake: {cpu_ratio:.2f}x {verdict}")
    if "auth+audit" in ratios:
        print(
            f"with the audit log on: {statistics.median(ratios['auth+audit']):.2f}x the rate, "
            f"{statistics.median(cpu_ratios['auth+audit']):.2f}x by server CPU"
        )
    if "auth+redis" in ratios:
        by_rate = [r / a for r, a in zip(ratios["auth+redis"], ratios["auth"], strict=True)]
        by_cpu = [r / a for r, a in zip(cpu_ratios["auth+redis"], cpu_ratios["auth"], strict=True)]
        print(
            f"on Redis instead of SQLite (auth+redis / auth): {statistics.median(by_rate):.2f}x the rate, "
            f"{statistics.median(by_cpu):.2f}x by server CPU"
        )
    print("ratios are medians of per-round ratios (each round's row / the same round's noauth row)")


async def delete_prefix(url: str, prefix: str) -> None:
    """Remove the keys the Redis daemon wrote (its own prefix)."""
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8, help="concurrent client workers (default 8)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per daemon per round (default 3)")
    parser.add_argument("--no-audit-row", action="store_true", help="skip the auth+audit daemon")
    parser.add_argument("--redis", metavar="URL", help="add an auth+redis daemon on this Redis server")
    args = parser.parse_args()
    print(f"bench_handshake: {args.workers} workers, {args.rounds} rounds x {args.seconds:g} s per daemon")
    print(f"machine: {machine()} (client and daemons share these cores)")
    with tempfile.TemporaryDirectory(prefix="wardgate-bench-") as tmp:
        asyncio.run(bench(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
