"""RSS per idle authenticated connection, against a plain aiohttp WebSocket echo server.

DESIGN.md target: <= 16 KiB of RSS per idle authenticated connection (nginx is near
20 KiB). Reported side by side with ``bench/baseline_ws_server.py``, the minimal
aiohttp server wardgate's per-connection cost can be compared to.

Each round starts a fresh ``wardgate serve`` (authenticated mode, audit off, limits
raised, ``limits.idle_timeout: 0``) and a fresh baseline server, both on loopback.
For each server in turn (the order alternates between rounds): warm up with a few
connections opened and closed, read VmRSS from /proc/<pid>/status, open N
connections (wardgate: ``Authorization: Bearer <session token>``, then
``initialize`` answered; baseline: one echoed message), wait for the process to
settle, read VmRSS again, close them all. KiB per connection = the RSS growth / N.

The open-file limit is raised to its hard limit before the servers are spawned
(they inherit it). Exits non-zero only if something crashes.

    .venv/bin/python bench/bench_idle.py [--connections 2000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from bench_handshake import BENCH_ENV, INITIALIZE, BenchDaemon, machine

TARGET_KIB = 16.0
HERE = Path(__file__).resolve().parent
IDLE_ENV = {
    **BENCH_ENV,
    "WARDGATE_LIMITS_MAX_CONNECTIONS": "100000",
    "WARDGATE_LIMITS_IDLE_TIMEOUT": "0",
    # Sessions outlive the run (the default 300 s would end them during a long one).
    "WARDGATE_SECURITY_TOKEN_SESSION_EXPIRY": "3600",
}
OPENING_CONCURRENCY = 32
SETTLE_SECONDS = 2.0


class BaselineServer(BenchDaemon):
    """``bench/baseline_ws_server.py`` as a subprocess."""

    def command(self, workspace: Path) -> list[str]:
        return [sys.executable, str(HERE / "baseline_ws_server.py"), "--port", "0"]


async def _open(http: aiohttp.ClientSession, server: BenchDaemon) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(server.ws, protocols=("wardgate.v1",), headers=server.headers())
    await ws.send_str(INITIALIZE)
    reply = await ws.receive_json(timeout=30)
    echo = isinstance(server, BaselineServer)
    if (reply != json.loads(INITIALIZE)) if echo else ("result" not in reply):
        await ws.close()
        raise RuntimeError(f"{server.name}: unexpected first reply: {reply}")
    return ws


async def _open_many(
    http: aiohttp.ClientSession, server: BenchDaemon, count: int
) -> list[aiohttp.ClientWebSocketResponse]:
    gate = asyncio.Semaphore(OPENING_CONCURRENCY)

    async def one() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await _open(http, server)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _close_all(sockets: list[aiohttp.ClientWebSocketResponse]) -> None:
    gate = asyncio.Semaphore(256)

    async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
        async with gate:
            await ws.close()

    await asyncio.gather(*(one(ws) for ws in sockets))


async def measure(http: aiohttp.ClientSession, server: BenchDaemon, count: int) -> tuple[float, int, float]:
    """(KiB of RSS per connection, RSS with the connections open in KiB, seconds to open them)."""
    await _close_all(await _open_many(http, server, 50))  # warm-up: imports, first allocations
    await asyncio.sleep(SETTLE_SECONDS)
    before = server.rss_kib()
    started = time.monotonic()
    sockets = await _open_many(http, server, count)
    opened_in = time.monotonic() - started
    await asyncio.sleep(SETTLE_SECONDS)
    after = server.rss_kib()
    if any(ws.closed for ws in sockets):
        raise RuntimeError(f"{server.name}: connections were closed while idle")
    await _close_all(sockets)
    return (after - before) / count, after, opened_in


async def one_round(args: argparse.Namespace, root: Path, rnd: int) -> dict[str, tuple[float, int, float]]:
    servers: list[BenchDaemon] = [
        BenchDaemon(f"wardgate-{rnd}", root, env=dict(IDLE_ENV)),
        BaselineServer(f"baseline-{rnd}", root),
    ]
    if rnd % 2:
        servers.reverse()
    results: dict[str, tuple[float, int, float]] = {}
    try:
        for server in servers:
            server.start()
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for server in servers:
                if not isinstance(server, BaselineServer):
                    await server.obtain_session(http)
                kind = "baseline" if isinstance(server, BaselineServer) else "wardgate"
                results[kind] = await measure(http, server, args.connections)
                per, rss, secs = results[kind]
                print(
                    f"  round {rnd + 1} {kind:<9} {per:6.2f} KiB/conn  "
                    f"(RSS {rss / 1024:.1f} MiB with {args.connections} open, opened in {secs:.1f} s)"
                )
    finally:
        for server in servers:
            server.stop()
    return results


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(f"the open-file limit is {soft}; --connections needs about {needed}: use fewer")
    return soft


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000, help="idle connections (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds with fresh servers (default 2)")
    args = parser.parse_args()
    limit = raise_fd_limit(args.connections + 256)
    print(f"bench_idle: {args.connections} idle connections per server, {args.rounds} rounds")
    print(f"machine: {machine()}; open-file limit {limit}")
    with tempfile.TemporaryDirectory(prefix="wardgate-bench-") as tmp:
        rounds = [asyncio.run(one_round(args, Path(tmp), rnd)) for rnd in range(args.rounds)]
    ward = statistics.median(r["wardgate"][0] for r in rounds)
    base = statistics.median(r["baseline"][0] for r in rounds)
    print()
    print(f"{'server':<34} {'KiB/conn (median)':>18} {'ratio':>7}")
    print(f"{'baseline (plain aiohttp echo)':<34} {base:>18.2f} {1.0:>6.2f}x")
    print(f"{'wardgate (authenticated, idle)':<34} {ward:>18.2f} {ward / base:>6.2f}x")
    print()
    verdict = "PASS" if ward <= TARGET_KIB else "MISS"
    print(f"target: <= {TARGET_KIB:g} KiB per idle authenticated connection: {ward:.2f} KiB {verdict}")
    print(f"(wardgate adds {ward - base:.2f} KiB per connection over plain aiohttp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
