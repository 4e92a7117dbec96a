"""Operations end to end: no secret in any log or audit line at debug level, the audit CLI and
its tamper detection, and metrics that count what happened."""

from __future__ import annotations

import json
import re

import aiohttp

from tests.conftest import DaemonFactory, remember, scan_for_secrets
from tests.e2e.helpers import Rpc, exchange, handshake, post, refusal

SCENARIO_CONFIG = "security:\n  allow_query_token: true\n  trusted_proxies: [127.0.0.1/32]\n"


async def _scenario(d: object) -> dict[str, str]:
    """Pairing, exchange, refresh, failures, query-token use and proxy headers, at debug level."""
    from tests.conftest import Daemon

    assert isinstance(d, Daemon)
    issued: dict[str, str] = {}
    issued["pairing"] = d.pairing_token()
    creds = await exchange(d, issued["pairing"])
    issued["session"], issued["refresh"] = creds["sessionToken"], creds["refreshToken"]
    status, rotated = await post(d, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    assert status == 200
    issued["session2"], issued["refresh2"] = rotated["sessionToken"], rotated["refreshToken"]
    remember(*issued.values())
    query_token = d.pairing_token()
    issued["query"] = query_token
    assert (await handshake(d, path=f"/ws?token={query_token}", protocols=("wardgate.v1",)))[0] == 101
    proxy_headers = {
        "X-Forwarded-For": "203.0.113.50",
        "Authorization": f"Bearer {issued['session2']}",
        "Cookie": f"wardgate_session={issued['refresh2']}; theme=dark",
        "X-API-Key": issued["session"],
    }
    assert (await handshake(d, proxy_headers, protocols=("wardgate.v1",)))[0] == 101
    # Failures: garbage, the used refresh token again (revokes the device), a wrong-kind token.
    await refusal(d, {"Authorization": "Bearer wgs_garbage.garbage"})
    await post(d, "/api/auth/refresh", {"refreshToken": creds["refreshToken"]})
    await refusal(d, {"Authorization": f"Bearer {issued['refresh2']}"})
    return issued


async def test_no_secret_in_any_log_or_audit_line_at_debug_level(wardgate: DaemonFactory) -> None:
    d = wardgate(SCENARIO_CONFIG)
    issued = await _scenario(d)
    d.stop()
    audit = (d.home / "audit.log").read_text()
    logs = d.logs()
    assert " DEBUG " in logs
    assert "203.0.113.50" in audit  # the forwarded address was recorded, the credentials were not
    assert scan_for_secrets({"daemon log": logs, "audit log": audit}, set(issued.values())) == []
    # Not even a fragment long enough to matter.
    for token in issued.values():
        assert token[4:24] not in logs + audit


async def test_audit_events_cli_and_tamper_detection(wardgate: DaemonFactory) -> None:
    d = wardgate(SCENARIO_CONFIG)
    issued = await _scenario(d)
    creds = await exchange(d, d.pairing_token())
    d.cli("devices", "revoke", creds["deviceId"])
    events = [json.loads(line) for line in d.cli("security", "audit", "--json").stdout.splitlines()]
    kinds = {e["event"] for e in events}
    assert {
        "pairing.issued",
        "pairing.redeemed",
        "token.refreshed",
        "auth.failed",
        "connection.accepted",
        "connection.rejected",
        "device.revoked",
    } <= kinds
    rejected = [e for e in events if e["event"] == "connection.rejected"]
    assert all(e["ip"] == "127.0.0.1" and e["reason"] for e in rejected)
    revoked = [e for e in events if e["event"] == "device.revoked"]
    assert revoked[-1]["device"] == creds["deviceId"]
    by_device = d.cli("security", "audit", "--json", "--device", creds["deviceId"]).stdout.splitlines()
    assert by_device
    assert all(json.loads(line)["device"] == creds["deviceId"] for line in by_device)
    only = d.cli("security", "audit", "--json", "--type", "auth.failed", "--since", "1h").stdout.splitlines()
    assert only
    assert {json.loads(line)["event"] for line in only} == {"auth.failed"}
    assert "OK" in d.cli("security", "audit", "--verify").stdout
    assert not any(t in d.cli("security", "audit").stdout for t in issued.values())

    # Edit one field of line 3: --verify fails and names line 4, whose prev no longer matches.
    path = d.home / "audit.log"
    lines = path.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["event"] = "nothing.happened"
    lines[2] = json.dumps(record, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    result = d.cli("security", "audit", "--verify", check=False)
    assert result.returncode == 1
    assert re.search(r"audit\.log line 4\b", result.stderr), result.stderr


async def test_metrics_count_what_happened(wardgate: DaemonFactory) -> None:
    d = wardgate()
    creds = await exchange(d, d.pairing_token())
    for _ in range(3):
        await refusal(d, {"Authorization": "Bearer wgs_garbage.garbage"})
    await refusal(d, {"Origin": "https://evil.example"})
    rpc = await Rpc.open(d, creds["sessionToken"])
    try:
        await rpc.initialize()
        for _ in range(5):
            await rpc.call("status/get")
        async with aiohttp.ClientSession() as http, http.get(d.http + "/metrics") as response:
            text = await response.text()
    finally:
        await rpc.close()

    def value(sample: str) -> float:
        match = re.search(re.escape(sample) + r" ([0-9.e+]+)", text)
        assert match, sample
        return float(match.group(1))

    assert value('wardgate_handshakes_total{outcome="rejected",reason="invalid_token"}') == 3
    assert value('wardgate_handshakes_total{outcome="rejected",reason="origin_forbidden"}') == 1
    assert value('wardgate_handshakes_total{outcome="accepted",reason="ok"}') == 1
    assert value('wardgate_auth_failures_total{reason="invalid_token"}') == 3
    assert value("wardgate_connections_open") == 1
    assert value('wardgate_messages_total{direction="in"}') == 6
    assert value('wardgate_method_seconds_count{method="status/get"}') == 5
