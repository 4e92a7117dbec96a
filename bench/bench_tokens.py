"""Token verification cost against one HMAC-SHA256 over the token (DESIGN.md target: <= 3x).

Side by side in one run: each repetition times a batch of the baseline
(``hmac.digest(key, token, "sha256")``), then a batch of ``tokens.verify`` on the
same token, then ``Authority.verify_session`` (verify + revocation snapshot), in
turn, so drift on a noisy machine hits every row alike. Reported: the median
ns/op over the repetitions and the median of the per-repetition ratios.

Exits non-zero only if something crashes; a missed target prints MISS.

    .venv/bin/python bench/bench_tokens.py [--reps 15] [--iterations 20000]
"""

from __future__ import annotations

import argparse
import hmac
import platform
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from wardgate import tokens
from wardgate.authority import Authority
from wardgate.keys import KeyRing, key_id
from wardgate.store.sqlite import SqliteStore
from wardgate.tokens import TokenKind

TARGET_RATIO = 3.0


def _time_batch(fn: Callable[[], object], iterations: int) -> float:
    """ns per call of ``fn`` over ``iterations`` calls (loop overhead included, same for every row)."""
    start = time.perf_counter_ns()
    for _ in range(iterations):
        fn()
    return (time.perf_counter_ns() - start) / iterations


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    parser.add_argument("--iterations", type=int, default=20_000, help="calls per batch (default 20000)")
    args = parser.parse_args()

    key = secrets.token_bytes(32)
    kid = key_id(key)
    ring = KeyRing(server_id=str(uuid.uuid4()), active_kid=kid, keys={kid: key})
    # The store is never touched by issue_session / verify_session (pure, in memory).
    authority = Authority(
        keys=ring,
        store=SqliteStore(Path("/nonexistent/wardgate-bench.db")),
        pairing_ttl=3600,
        session_ttl=300,
        refresh_ttl=30 * 86400,
    )
    # A realistic session token, exactly as the daemon mints one after pairing.
    device_id = "dev_" + tokens.new_token_id()
    family_id = "fam_" + tokens.new_token_id()
    token, claims = authority.issue_session(device_id, "operator", family_id)
    token_bytes = token.encode()
    keys = ring.keys
    server_id = ring.server_id
    now = time.time()

    # Sanity: every row does the real work and succeeds.
    assert tokens.verify(token, TokenKind.SESSION, keys, server_id=server_id, now=now) == claims
    assert authority.verify_session(token) == claims
    assert hmac.compare_digest(
        hmac.digest(key, token_bytes, "sha256"), hmac.digest(key, token_bytes, "sha256")
    )

    rows: dict[str, Callable[[], object]] = {
        "baseline: hmac.digest(key, token, sha256)": lambda: hmac.digest(key, token_bytes, "sha256"),
        "tokens.verify": lambda: tokens.verify(token, TokenKind.SESSION, keys, server_id=server_id, now=now),
        "Authority.verify_session": lambda: authority.verify_session(token),
    }
    names = list(rows)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}

    for fn in rows.values():  # warm-up
        _time_batch(fn, args.iterations // 10 or 1)
    for rep in range(args.reps):
        # Alternate the order each repetition (A/B/C, C/B/A) so no row always runs first.
        order = names if rep % 2 == 0 else names[::-1]
        measured = {name: _time_batch(rows[name], args.iterations) for name in order}
        for name, ns in measured.items():
            samples[name].append(ns)
        for name in names[1:]:
            ratios[name].append(measured[name] / measured[names[0]])

    print(f"bench_tokens: {args.reps} interleaved repetitions x {args.iterations} calls")
    print(f"machine: {_machine()}")
    print(f"token: {len(token)} characters (session token with sub, fam, role)")
    print()
    print(f"{'row':<44} {'ns/op (median)':>15} {'min':>8} {'max':>8} {'ratio':>7}")
    base = statistics.median(samples[names[0]])
    for name in names:
        med = statistics.median(samples[name])
        ratio = f"{statistics.median(ratios[name]):.2f}x" if name in ratios else "1.00x"
        print(f"{name:<44} {med:>15.0f} {min(samples[name]):>8.0f} {max(samples[name]):>8.0f} {ratio:>7}")
    print()
    print(f"baseline median: {base:.0f} ns/op")
    verdict = "PASS" if statistics.median(ratios["tokens.verify"]) <= TARGET_RATIO else "MISS"
    session = statistics.median(ratios["Authority.verify_session"])
    print(
        f"target: tokens.verify <= {TARGET_RATIO:.1f}x one HMAC-SHA256 over the token: "
        f"{statistics.median(ratios['tokens.verify']):.2f}x {verdict} "
        f"(with revocation check: {session:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
