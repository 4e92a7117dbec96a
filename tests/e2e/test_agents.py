"""Agents end to end: a real daemon runs a real stand-in agent (``tests/fixtures/fake_agent.py``).

Run, stream, respond, stop (the whole process group), crash, the running-agent limit, catching
up after a disconnect without losing or duplicating a line, a stalled watcher that slows
nothing, a hostile prompt that stays one literal argument, roles, and output that survives a
daemon restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, DaemonFactory, store_url_for
from tests.e2e.helpers import Rpc, exchange

FAKE_AGENT = Path(__file__).resolve().parent.parent / "fixtures" / "fake_agent.py"
AGENT = [sys.executable, str(FAKE_AGENT), "{prompt}"]
ALLOWLIST = ["PATH", "HOME", "AGENT_ALLOWED"]
GRACE = 1.0
PREAMBLE = 4
"""Lines the fake agent prints before obeying its prompt (ARGV, PROC, CWD, ENV)."""
TERMINAL = {"exited", "killed", "failed"}


def agent_config(*, workspace: dict[str, Any] | None = None, extra: str = "") -> str:
    settings: dict[str, Any] = {
        "agent": {"command": AGENT},
        "agents": {
            "crashy": {"command": [sys.executable, str(FAKE_AGENT), "--exit", "7", "{prompt}"]},
            "missing": {"command": ["/nonexistent/wardgate-test-agent", "{prompt}"]},
        },
        "stop_grace": GRACE,
        "env_allowlist": ALLOWLIST,
    }
    settings.update(workspace or {})
    return "workspace: " + json.dumps(settings) + "\n" + extra


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """One daemon for the tests that keep the default limits (one running agent)."""
    factory = DaemonFactory(tmp_path_factory.mktemp("agents"), store_url_for(request))
    yield factory(agent_config(), env={"AGENT_ALLOWED": "visible", "AGENT_SECRET": "hidden"})
    factory.stop_all()


_CREDS: dict[tuple[int, str], dict[str, Any]] = {}


async def connect(d: Daemon, role: str = "operator") -> Rpc:
    """An initialized JSON-RPC connection of a device with ``role`` (one device per role)."""
    key = (id(d), role)
    if key not in _CREDS:
        _CREDS[key] = await exchange(d, d.pairing_token(role), name=f"{role} device")
    rpc = await Rpc.open(d, _CREDS[key]["sessionToken"])
    response = await rpc.initialize()
    assert "result" in response, response
    return rpc


async def call_ok(rpc: Rpc, method: str, params: Any = None) -> Any:
    response = await rpc.call(method, params)
    assert "result" in response, response
    return response["result"]


async def call_error(rpc: Rpc, method: str, params: Any = None) -> dict[str, Any]:
    response = await rpc.call(method, params)
    assert "error" in response, response
    error: dict[str, Any] = response["error"]
    return error


async def start(rpc: Rpc, prompt: str, **params: Any) -> str:
    result = await call_ok(rpc, "agent/run", {"prompt": prompt, **params})
    assert result["status"] == "started"
    session_id: str = result["session_id"]
    assert session_id.startswith("ses_")
    return session_id


class Events:
    """The ``event/agent_*`` notifications of one session, as a connection receives them."""

    def __init__(self, rpc: Rpc, session_id: str) -> None:
        self.rpc = rpc
        self.session_id = session_id
        self.output: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []

    def _take(self, message: Any) -> None:
        if not isinstance(message, dict) or message.get("params", {}).get("session_id") != self.session_id:
            return
        if message["method"] == "event/agent_output":
            self.output.append(message["params"])
        elif message["method"] == "event/agent_status":
            self.statuses.append(message["params"])

    def _drain_collected(self) -> None:
        collected, self.rpc.notifications = self.rpc.notifications, []
        for message in collected:
            self._take(message)

    @property
    def ended(self) -> bool:
        return bool(self.statuses) and self.statuses[-1]["status"] in TERMINAL

    async def until(self, predicate: Any, timeout: float = 10.0) -> None:
        self._drain_collected()
        deadline = time.monotonic() + timeout
        while not predicate(self):
            message = await self.rpc.receive(max(0.01, deadline - time.monotonic()))
            self._take(message)

    async def until_line(self, prefix: str, timeout: float = 10.0) -> dict[str, Any]:
        await self.until(lambda e: any(o["line"].startswith(prefix) for o in e.output), timeout)
        return next(o for o in self.output if o["line"].startswith(prefix))

    async def until_end(self, timeout: float = 10.0) -> dict[str, Any]:
        await self.until(lambda e: e.ended, timeout)
        return self.statuses[-1]

    def lines(self, stream: str | None = None) -> list[str]:
        return [o["line"] for o in self.output if stream is None or o["stream"] == stream]

    def value(self, prefix: str) -> str:
        return next(line for line in self.lines() if line.startswith(prefix + " "))[len(prefix) + 1 :]


async def all_output(rpc: Rpc, session_id: str, after_seq: int = 0, limit: int = 1000) -> dict[str, Any]:
    """Page through ``session/get``; return the last page with ``output`` holding every line."""
    lines: list[dict[str, Any]] = []
    while True:
        page = await call_ok(
            rpc, "session/get", {"session_id": session_id, "after_seq": after_seq, "limit": limit}
        )
        lines += page["output"]
        if not page["output"] or page["complete"]:
            page["output"] = lines
            return dict(page)
        after_seq = page["next_seq"]


def live_group_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies awaiting their reaper excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


async def group_vanishes(pgid: int, timeout: float = 10.0) -> bool:
    """Whether the group disappears entirely (its zombies reaped by init) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


# --- run and stream -------------------------------------------------------------------------------


async def test_run_streams_numbered_output_and_status(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        session_id = await start(rpc, "out=3 err=2")
        events = Events(rpc, session_id)
        end = await events.until_end()
        assert [s["status"] for s in events.statuses] == ["running", "exited"]
        assert (end["exit_code"], end["signal"], end["last_seq"]) == (0, None, PREAMBLE + 5)
        assert [o["seq"] for o in events.output] == list(range(1, PREAMBLE + 6))
        assert events.lines("stdout")[PREAMBLE:] == ["out 1", "out 2", "out 3"]
        assert events.lines("stderr") == ["err 1", "err 2"]
        # In the workspace, with the allowlisted environment and nothing else.
        assert Path(events.value("CWD")) == daemon.workspace.resolve()
        env = set(json.loads(events.value("ENV")))
        assert "AGENT_ALLOWED" in env
        assert "AGENT_SECRET" not in env
        assert env <= {*ALLOWLIST, "LC_CTYPE"}  # Python may coerce the C locale itself

        page = await call_ok(rpc, "session/get", {"session_id": session_id})
        assert page["output"] == [{k: o[k] for k in ("seq", "stream", "line")} for o in events.output]
        assert (page["next_seq"], page["skipped"], page["complete"]) == (PREAMBLE + 5, 0, True)
        session = page["session"]
        assert session["status"] == "exited"
        assert session["agent_type"] == "default"
        assert session["command"] == Path(sys.executable).name  # a name, never a path
        assert "prompt" not in session  # security.audit.log_prompts is off
        listed = (await call_ok(rpc, "session/list"))["sessions"]
        assert listed[0]["session_id"] == session_id
        assert listed[0]["exit_code"] == 0
        status = await call_ok(rpc, "status/get")
        assert status["agent"]["state"] == "idle"
    finally:
        await rpc.close()


async def test_hostile_prompt_reaches_the_agent_as_one_literal_argument(daemon: Daemon) -> None:
    marker = Path("/tmp") / f"wardgate-pwned-{secrets.token_hex(4)}"
    prompt = f"$(touch pwned); rm -rf / ; `ls` | && > {marker} \"'` \n {{prompt}} $HOME %s \\ *"
    rpc = await connect(daemon)
    try:
        events = Events(rpc, await start(rpc, prompt))
        await events.until_end()
        assert json.loads(events.value("ARGV")) == [prompt]
        assert events.statuses[-1]["status"] == "exited"
        assert not (daemon.workspace / "pwned").exists()
        assert not marker.exists()
        # A prompt that would be read as an option is refused (configure "--" to allow one).
        error = await call_error(rpc, "agent/run", {"prompt": "--dangerously-skip-permissions"})
        assert error["code"] == -32602
        for bad in ("", "   ", "a\x00b", "x" * 100_001):
            assert (await call_error(rpc, "agent/run", {"prompt": bad}))["code"] == -32602
    finally:
        await rpc.close()


async def test_respond_writes_lines_to_the_agent_stdin(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        session_id = await start(rpc, "echo=2 out=1")
        events = Events(rpc, session_id)
        await events.until_line("ENV")
        result = await call_ok(rpc, "agent/respond", {"input": "hello $(id) `x`"})
        assert (result["session_id"], result["written"]) == (session_id, len("hello $(id) `x`\n"))
        await call_ok(rpc, "agent/respond", {"session_id": session_id, "input": "world\n"})
        await events.until_end()
        assert events.lines()[PREAMBLE:] == ["echo: hello $(id) `x`", "echo: world", "out 1"]
        error = await call_error(rpc, "agent/respond", {"session_id": session_id, "input": "late"})
        assert error["code"] == -32013
        assert (await call_error(rpc, "agent/respond", {"input": "nobody"}))["code"] == -32013
    finally:
        await rpc.close()


async def test_close_stdin_and_eof_for_agents_that_read_until_the_end(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        # With close_stdin the agent reads end-of-file at once (claude -p needs this).
        events = Events(rpc, await start(rpc, "echo=1", close_stdin=True))
        await events.until_end()
        assert events.lines()[PREAMBLE:] == ["echo: "]
        session_id = await start(rpc, "echo=2")
        events = Events(rpc, session_id)
        await events.until_line("ENV")
        await call_ok(rpc, "agent/respond", {"input": "only", "eof": True})
        await events.until_end()
        assert events.lines()[PREAMBLE:] == ["echo: only", "echo: "]
    finally:
        await rpc.close()


# --- stop -----------------------------------------------------------------------------------------


async def test_stop_kills_the_whole_process_group(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        # The agent ignores SIGTERM and has a child that ignores it too: only SIGKILL to the
        # group, after the grace period, ends both.
        session_id = await start(rpc, "ignore-term child wait")
        events = Events(rpc, session_id)
        await events.until_line("CHILD")
        pid, pgid = map(int, events.value("PROC").split())
        child = int(events.value("CHILD"))
        assert pgid == pid
        assert set(live_group_members(pgid)) >= {pid, child}
        began = time.monotonic()
        result = await call_ok(rpc, "agent/stop", {"session_id": session_id})
        elapsed = time.monotonic() - began
        assert (result["status"], result["signal"]) == ("killed", "SIGKILL")
        assert GRACE - 0.1 <= elapsed < GRACE + 3
        assert live_group_members(pgid) == []  # already, when agent/stop answers
        assert await group_vanishes(pgid)
        await events.until_end()
        assert [s["status"] for s in events.statuses] == ["running", "stopping", "killed"]
        assert (await call_error(rpc, "agent/stop", {"session_id": session_id}))["code"] == -32013
    finally:
        await rpc.close()


async def test_stop_is_prompt_when_the_agent_obeys_sigterm(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        events = Events(rpc, await start(rpc, "wait"))
        await events.until_line("ENV")
        pgid = int(events.value("PROC").split()[1])
        began = time.monotonic()
        result = await call_ok(rpc, "agent/stop")  # the one running agent
        assert time.monotonic() - began < GRACE * 0.8
        assert (result["status"], result["exit_code"], result["signal"]) == ("killed", -15, "SIGTERM")
        assert live_group_members(pgid) == []
        assert (await call_error(rpc, "agent/stop"))["code"] == -32013
    finally:
        await rpc.close()


async def test_leftover_processes_of_an_agent_that_exits_are_ended(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        events = Events(rpc, await start(rpc, "child out=1"))
        await events.until_end()
        assert events.statuses[-1]["status"] == "exited"
        pgid = int(events.value("PROC").split()[1])
        assert live_group_members(pgid) == []
    finally:
        await rpc.close()


# --- failures and limits --------------------------------------------------------------------------


async def test_crash_and_unusable_agents_are_reported(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        events = Events(rpc, await start(rpc, "out=1 crash"))
        end = await events.until_end()
        assert (end["status"], end["exit_code"]) == ("failed", 1)
        assert any("RuntimeError" in line for line in events.lines("stderr"))

        events = Events(rpc, await start(rpc, "out=1", agent_type="crashy"))
        end = await events.until_end()
        assert (end["status"], end["exit_code"]) == ("failed", 7)
        assert json.loads(events.value("ARGV")) == ["--exit", "7", "out=1"]

        events = Events(rpc, await start(rpc, "exit=3"))
        assert (await events.until_end())["exit_code"] == 3

        error = await call_error(rpc, "agent/run", {"prompt": "hi", "agent_type": "missing"})
        assert error["code"] == -32011
        assert "nonexistent" not in json.dumps(error)  # no path in errors
        assert (await call_ok(rpc, "session/list"))["sessions"][0]["status"] == "failed"

        error = await call_error(rpc, "agent/run", {"prompt": "hi", "agent_type": "nope"})
        assert error["code"] == -32011
        assert error["data"]["agent_types"] == ["default", "crashy", "missing"]
        assert (await call_error(rpc, "agent/run", {"prompt": "hi", "agent_type": "../x"}))["code"] == -32602
    finally:
        await rpc.close()


async def test_second_run_is_refused_while_one_runs(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        first = await start(rpc, "wait")
        error = await call_error(rpc, "agent/run", {"prompt": "out=1"})
        assert (error["code"], error["data"]["reason"]) == (-32012, "agent_busy")
        status = await call_ok(rpc, "status/get")
        assert status["agent"]["state"] == "running"
        assert status["agent"]["running"] == [first]
        await call_ok(rpc, "agent/stop", {"session_id": first})
        events = Events(rpc, await start(rpc, "out=1"))  # the slot is free again
        await events.until_end()
    finally:
        await rpc.close()


async def test_viewer_cannot_run_stop_or_respond_but_can_read(daemon: Daemon) -> None:
    operator = await connect(daemon)
    viewer = await connect(daemon, "viewer")
    try:
        for method, params in (
            ("agent/run", {"prompt": "out=1"}),
            ("agent/stop", {}),
            ("agent/respond", {"input": "x"}),
        ):
            assert (await call_error(viewer, method, params))["code"] == -32004
        session_id = await start(operator, "sleep=0.3 out=2")
        watch = await call_ok(viewer, "session/watch", {"session_id": session_id})
        assert watch["watching"] is True
        events = Events(viewer, session_id)
        await events.until_end()
        assert events.lines()[-2:] == ["out 1", "out 2"]
        assert (await all_output(viewer, session_id))["complete"] is True
        assert (await call_error(viewer, "agent/stop", {"session_id": session_id}))["code"] == -32004
    finally:
        await viewer.close()
        await operator.close()


async def test_session_method_errors(daemon: Daemon) -> None:
    rpc = await connect(daemon)
    try:
        unknown = "ses_" + "0" * 24
        for method in ("session/get", "session/watch", "session/unwatch"):
            assert (await call_error(rpc, method, {"session_id": unknown}))["code"] == -32014
            assert (await call_error(rpc, method, {"session_id": "../../etc"}))["code"] == -32602
        assert (await call_error(rpc, "agent/stop", {"session_id": unknown}))["code"] == -32014
        assert (await call_error(rpc, "session/get", {"session_id": unknown, "after_seq": -1}))[
            "code"
        ] == -32602
        assert (await call_error(rpc, "agent/run", {"prompt": "x", "shell": True}))["code"] == -32602
    finally:
        await rpc.close()


# --- catching up ----------------------------------------------------------------------------------


async def test_watcher_that_disconnects_mid_run_catches_up_exactly(daemon: Daemon) -> None:
    total = PREAMBLE + 150
    first = await connect(daemon)
    session_id = await start(first, "pace=150:0.01")
    events = Events(first, session_id)
    await events.until(lambda e: len(e.output) >= 40)
    seen = [o["seq"] for o in events.output]
    await first.close()  # the phone loses its connection mid-run

    await asyncio.sleep(0.2)
    second = await connect(daemon)
    try:
        # Watch first: every line after last_seq will come as an event; fetch exactly the gap.
        watch = await call_ok(second, "session/watch", {"session_id": session_id})
        assert watch["watching"] is True
        last_seq = watch["last_seq"]
        assert last_seq > seen[-1]  # lines were produced while nobody listened
        gap: list[int] = []
        after = seen[-1]
        while after < last_seq:
            page = await call_ok(
                second,
                "session/get",
                {"session_id": session_id, "after_seq": after, "limit": min(25, last_seq - after)},
            )
            assert page["skipped"] == 0
            gap += [o["seq"] for o in page["output"]]
            after = page["next_seq"]
        live = Events(second, session_id)
        await live.until_end()
        combined = seen + gap + [o["seq"] for o in live.output]
        assert combined == list(range(1, total + 1))  # nothing lost, nothing twice, in order
        full = await all_output(second, session_id, limit=37)
        assert [o["seq"] for o in full["output"]] == list(range(1, total + 1))
        assert [o["line"] for o in full["output"]][PREAMBLE:] == [f"line {i}" for i in range(1, 151)]
    finally:
        await second.close()


# --- more than one agent --------------------------------------------------------------------------


async def test_two_runs_are_allowed_when_configured(wardgate: DaemonFactory) -> None:
    d = wardgate(agent_config(workspace={"max_running_agents": 2}))
    rpc = await connect(d)
    other = await connect(d)
    try:
        a = await start(rpc, "wait")
        b = await start(other, "wait")
        assert (await call_error(rpc, "agent/run", {"prompt": "wait"}))["code"] == -32012
        assert (await call_error(rpc, "agent/stop"))["code"] == -32602  # which one?
        listed = (await call_ok(rpc, "session/list"))["sessions"]
        assert {s["session_id"] for s in listed if s["status"] == "running"} == {a, b}
        results = await asyncio.gather(
            call_ok(rpc, "agent/stop", {"session_id": b}), call_ok(other, "agent/stop", {"session_id": a})
        )
        assert [r["status"] for r in results] == ["killed", "killed"]
    finally:
        await other.close()
        await rpc.close()


# --- a stalled watcher ----------------------------------------------------------------------------


class StalledClient:
    """A WebSocket client on a raw socket with a tiny receive buffer that stops reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.next_id = 0

    @classmethod
    async def open(cls, d: Daemon, token: str) -> StalledClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", d.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: wardgate.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def call(self, method: str, params: Any = None) -> Any:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        assert len(payload) < 126
        self.writer.write(
            bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        )
        while True:
            opcode, data = await self.frame()
            if opcode == 1 and json.loads(data).get("id") == self.next_id:
                return json.loads(data)

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(length)

    async def close_code(self, timeout: float = 15.0) -> tuple[int | None, int]:
        """Read everything the server managed to send; return (close code, output events read)."""
        events = 0

        async def read() -> int | None:
            nonlocal events
            while True:
                try:
                    opcode, data = await self.frame()
                except asyncio.IncompleteReadError:
                    return None
                if opcode == 8:
                    return int.from_bytes(data[:2], "big")
                events += 1

        code = await asyncio.wait_for(read(), timeout)
        return code, events

    def close(self) -> None:
        self.writer.close()


async def test_stalled_watcher_slows_nothing_and_is_disconnected(wardgate: DaemonFactory) -> None:
    count, width = 4000, 2000  # about 8 MB of events: more than the stalled path can buffer
    d = wardgate(agent_config(extra="limits: {send_queue_messages: 100}\n"))
    fast = await connect(d)
    try:
        # Alone, for the baseline.
        events = Events(fast, await start(fast, f"flood={count}:{width}"))
        await events.until_end(timeout=30)
        baseline = float(events.value("FLOOD").split()[1])

        stalled = await StalledClient.open(d, _CREDS[(id(d), "operator")]["sessionToken"])
        try:
            assert "result" in await stalled.call("initialize", {"protocolVersion": "2025-06-18"})
            session_id = await start(fast, f"sleep=0.3 flood={count}:{width}")
            assert (await stalled.call("session/watch", {"session_id": session_id}))["result"]["watching"]
            # From here on the stalled client reads nothing.
            began = time.monotonic()
            events = Events(fast, session_id)
            await events.until_end(timeout=30)
            wall = time.monotonic() - began
            with_stalled = float(events.value("FLOOD").split()[1])
            # The fast watcher got every line, in order, and the agent was not held back.
            assert [o["seq"] for o in events.output] == list(range(1, PREAMBLE + count + 2))
            assert events.statuses[-1]["status"] == "exited"
            assert with_stalled < baseline * 3 + 1.0, (baseline, with_stalled)
            assert wall < 20
            code, received = await stalled.close_code()
            assert code == 1008  # disconnected as a slow consumer
            assert received < count
        finally:
            stalled.close()
    finally:
        await fast.close()


# --- persistence ----------------------------------------------------------------------------------


async def test_output_survives_a_daemon_restart(wardgate: DaemonFactory) -> None:
    d = wardgate(agent_config(workspace={"history_lines": 10, "max_line_bytes": 1000}))
    rpc = await connect(d)
    try:
        session_id = await start(rpc, "out=30 long=2500")
        events = Events(rpc, session_id)
        await events.until_end()
        expected = [{k: o[k] for k in ("seq", "stream", "line")} for o in events.output]
        assert [len(line) for line in events.lines()[-3:]] == [1000, 1000, 500]  # a long line, split
        # Only the last 10 lines are in memory: the rest comes from the store.
        assert (await all_output(rpc, session_id, limit=7))["output"] == expected
        running = await start(rpc, "wait")  # still running when the daemon stops
        await Events(rpc, running).until_line("ENV")
    finally:
        await rpc.close()
    d.restart()
    rpc = await connect(d)
    try:
        page = await all_output(rpc, session_id)
        assert page["output"] == expected
        assert page["session"]["status"] == "exited"
        assert page["complete"] is True
        listed = {s["session_id"]: s for s in (await call_ok(rpc, "session/list"))["sessions"]}
        assert listed[session_id]["last_seq"] == len(expected)
        assert listed[running]["status"] == "killed"  # stopped with the daemon, group and all
        watch = await call_ok(rpc, "session/watch", {"session_id": session_id})
        assert watch == {"session_id": session_id, "watching": False, "status": "exited", "last_seq": 37}
    finally:
        with contextlib.suppress(Exception):
            await rpc.close()
