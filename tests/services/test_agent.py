"""The pure parts of the agent service, and the store's agent-session records.

Argument lists (hostile prompts included), the run state machine, the output history and
catch-up arithmetic, line splitting and decoding, process-group checks, SQLite persistence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wardgate.config import AgentSettings, Config, WorkspaceSettings
from wardgate.errors import AgentBusy, AgentNotConfigured, InternalError, InvalidParams
from wardgate.rpc.registry import convert_params
from wardgate.services.agent import (
    LIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    AgentManager,
    AgentRespondParams,
    AgentRunParams,
    OutputHistory,
    RunEvent,
    RunState,
    SessionGetParams,
    SessionListParams,
    SessionWatchParams,
    TransitionError,
    agent_environment,
    build_argv,
    command_name,
    configured_agent_types,
    describe_session,
    exit_event,
    group_alive,
    line_cost,
    new_session_id,
    next_state,
    output_page,
    read_lines,
    resolve_agent,
    signal_group,
    signal_name,
    take_page,
    validate_prompt,
)
from wardgate.store.base import AgentOutputLine, AgentSessionRecord
from wardgate.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection

PREAMBLE_LINES = 4
"""Lines the stand-in agent prints before obeying its prompt."""

HOSTILE = [
    "$(touch pwned); rm -rf / ; `ls` | && > /tmp/x \"'`",
    "'; DROP TABLE agent_sessions; --",
    "a\nb\r\nc",
    "{prompt}",
    "{prompt}{prompt}",
    "${IFS}cat${IFS}/etc/passwd",
    "x" * 100_000,
    "\u202e unicode ✓ 漢字 🙂",
    " -starts with a space",
    "* ? [a-z] ~ !! %PATH% \\",
]


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", HOSTILE)
def test_hostile_prompt_is_exactly_one_argument(prompt: str) -> None:
    assert build_argv(["claude", "-p", "{prompt}"], prompt) == ["claude", "-p", prompt]
    assert build_argv(["codex", "exec", "{prompt}"], prompt)[2] == prompt


@given(st.text(min_size=1).filter(lambda p: not p.startswith("-")))
@settings(max_examples=300)
def test_any_prompt_is_one_argument_never_expanded_again(prompt: str) -> None:
    argv = build_argv(["agent", "--flag", "{prompt}", "tail"], prompt)
    assert argv == ["agent", "--flag", prompt, "tail"]
    assert build_argv(["agent", "--prompt={prompt}!"], prompt) == ["agent", f"--prompt={prompt}!"]


def test_placeholder_forms() -> None:
    assert build_argv(["a", "{prompt}", "{prompt}"], "p") == ["a", "p", "p"]
    assert build_argv(["agent", "run"], "do it") == ["agent", "run", "do it"]  # appended
    assert build_argv(["agent", "--", "{prompt}"], "-x") == ["agent", "--", "-x"]
    assert build_argv(["agent", "--", "run"], "-x") == ["agent", "--", "run", "-x"]
    assert build_argv(["agent", "--prompt={prompt}"], "-x") == ["agent", "--prompt=-x"]
    with pytest.raises(AgentNotConfigured):
        build_argv([], "p")


@pytest.mark.parametrize("command", [["claude", "-p", "{prompt}"], ["agent"], ["--", "{prompt}"]])
def test_prompt_that_would_be_an_option_is_refused(command: list[str]) -> None:
    with pytest.raises(InvalidParams) as info:
        build_argv(command, "--dangerously-skip-permissions")
    assert "dangerously" not in str(info.value.rpc_error())  # the input is never echoed


@pytest.mark.parametrize(
    ("prompt", "hint"),
    [("", "empty"), (" \n\t", "empty"), ("a\x00b", "NUL"), ("x" * 100_001, "longer"), ("\ud800", "Unicode")],
)
def test_invalid_prompts(prompt: str, hint: str) -> None:
    with pytest.raises(InvalidParams) as info:
        validate_prompt(prompt)
    assert hint in (info.value.hint or "")


def test_valid_prompts() -> None:
    for prompt in HOSTILE:
        validate_prompt(prompt.replace("\x00", ""))
    validate_prompt("x" * 10, max_chars=10)


def test_params_refuse_unknown_fields_and_bad_types() -> None:
    with pytest.raises(InvalidParams):
        convert_params(AgentRunParams, {"prompt": "x", "shell": True})
    with pytest.raises(InvalidParams):
        convert_params(AgentRunParams, {"prompt": 1})
    with pytest.raises(InvalidParams):
        convert_params(AgentRunParams, {"prompt": "x", "agent_type": "../../bin/sh"})
    params = convert_params(AgentRunParams, ["fix it", "codex"])
    assert (params.prompt, params.agent_type, params.close_stdin) == ("fix it", "codex", False)


def test_environment_is_only_the_allowlist() -> None:
    environ = {"PATH": "/bin", "HOME": "/h", "ANTHROPIC_API_KEY": "secret", "AWS_SECRET": "s"}
    assert agent_environment(["PATH", "HOME", "LANG"], environ) == {"PATH": "/bin", "HOME": "/h"}
    assert agent_environment([], environ) == {}


def test_command_name_is_never_a_path() -> None:
    assert command_name("/home/me/.local/bin/claude") == "claude"
    assert command_name("codex") == "codex"
    assert command_name("") == "agent"


def test_agent_types() -> None:
    settings = WorkspaceSettings(
        agent=AgentSettings(command=["claude", "-p", "{prompt}"]),
        agents={"codex": AgentSettings(command=["codex", "exec", "{prompt}"]), "off": AgentSettings()},
    )
    assert configured_agent_types(settings) == ["default", "codex"]
    assert resolve_agent(settings, None) == ("default", ["claude", "-p", "{prompt}"])
    assert resolve_agent(settings, "default")[1][0] == "claude"
    assert resolve_agent(settings, "codex") == ("codex", ["codex", "exec", "{prompt}"])
    for missing in ("off", "nope"):
        with pytest.raises(AgentNotConfigured) as info:
            resolve_agent(settings, missing)
        assert info.value.data["agent_types"] == ["default", "codex"]
    with pytest.raises(AgentNotConfigured):
        resolve_agent(WorkspaceSettings(), None)
    only_named = WorkspaceSettings(agents={"default": AgentSettings(command=["x"])})
    assert resolve_agent(only_named, None) == ("default", ["x"])


def test_session_ids_are_random_and_prefixed() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("ses_") and len(i) == 28 for i in ids)


# --- the state machine ---------------------------------------------------------------------------------


def test_transition_table() -> None:
    path = [RunEvent.SPAWNED, RunEvent.STOP, RunEvent.STOP, RunEvent.EXIT_ERROR]
    state = RunState.STARTING
    seen = [state]
    for event in path:
        state = next_state(state, event)
        seen.append(state)
    assert seen == [
        RunState.STARTING,
        RunState.RUNNING,
        RunState.STOPPING,
        RunState.STOPPING,
        RunState.KILLED,
    ]
    assert next_state(RunState.RUNNING, RunEvent.EXIT_OK) is RunState.EXITED
    assert next_state(RunState.RUNNING, RunEvent.EXIT_ERROR) is RunState.FAILED
    assert next_state(RunState.STARTING, RunEvent.SPAWN_FAILED) is RunState.FAILED
    assert next_state(RunState.STOPPING, RunEvent.EXIT_OK) is RunState.KILLED


@pytest.mark.parametrize("state", list(RunState))
@pytest.mark.parametrize("event", list(RunEvent))
def test_every_pair_is_either_in_the_table_or_refused(state: RunState, event: RunEvent) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[state, event]
        return
    with pytest.raises(TransitionError) as info:
        next_state(state, event)
    assert event.name in str(info.value)
    assert state.name in str(info.value)
    assert isinstance(info.value, InternalError)
    assert info.value.rpc_error()["message"] == "Internal error"  # nothing internal on the wire


def test_terminal_states_have_no_way_out_and_live_states_end() -> None:
    assert not any(state in TERMINAL_STATES for state, _ in TRANSITIONS)
    assert set(RunState) == LIVE_STATES | TERMINAL_STATES
    for state in LIVE_STATES - {RunState.STARTING}:
        assert TRANSITIONS[state, RunEvent.EXIT_OK] in TERMINAL_STATES
        assert TRANSITIONS[state, RunEvent.EXIT_ERROR] in TERMINAL_STATES


def test_exit_status() -> None:
    assert exit_event(0) is RunEvent.EXIT_OK
    assert exit_event(3) is RunEvent.EXIT_ERROR
    assert exit_event(-9) is RunEvent.EXIT_ERROR
    assert signal_name(-9) == "SIGKILL"
    assert signal_name(-15) == "SIGTERM"
    assert signal_name(0) is None
    assert signal_name(None) is None
    assert signal_name(-200) == "SIG200"


# --- history and catching up ----------------------------------------------------------------------------


def test_history_numbers_from_one_and_keeps_the_last_lines() -> None:
    history = OutputHistory(3)
    assert (history.first_seq, history.last_seq) == (1, 0)
    assert history.covers(0)
    items = [history.append("stdout", f"l{i}") for i in range(1, 6)]
    assert [i.seq for i in items] == [1, 2, 3, 4, 5]
    assert (len(history), history.first_seq, history.last_seq) == (3, 3, 5)
    assert not history.covers(0)
    assert not history.covers(1)
    assert history.covers(2)
    assert history.covers(9)
    assert [line.seq for line in history.after(2, 10)] == [3, 4, 5]
    assert [line.seq for line in history.after(3, 1)] == [4]
    assert history.after(5, 10) == []
    assert history.after(2, 0) == []


def test_history_byte_budget_and_zero_lines() -> None:
    history = OutputHistory(100, max_bytes=3 * (10 + 64))
    for i in range(10):
        history.append("stderr", f"{i:010d}")
    assert len(history) == 3
    history.append("stdout", "y" * 10_000)  # alone over the budget: still kept (the newest)
    assert len(history) == 1
    none = OutputHistory(0)
    none.append("stdout", "x")
    assert (len(none), none.last_seq, none.first_seq) == (0, 1, 2)
    assert none.covers(1)
    assert not none.covers(0)


def test_page_budget_always_advances() -> None:
    lines = [AgentOutputLine(i, "stdout", "x" * 100) for i in range(1, 11)]
    assert len(take_page(lines, max_bytes=3 * line_cost(lines[0]))) == 3
    assert len(take_page(lines, max_bytes=1)) == 1
    assert take_page([], max_bytes=1) == []


def test_output_page() -> None:
    lines = [AgentOutputLine(i, "stdout", str(i)) for i in (4, 5)]
    page = output_page(lines, after_seq=3, last_seq=9, ended=True)
    assert (page["next_seq"], page["skipped"], page["complete"]) == (5, 0, False)
    assert page["output"][0] == {"seq": 4, "stream": "stdout", "line": "4"}
    page = output_page(lines, after_seq=1, last_seq=5, ended=True)
    assert (page["next_seq"], page["skipped"], page["complete"]) == (5, 2, True)
    page = output_page([], after_seq=5, last_seq=5, ended=False)
    assert (page["next_seq"], page["skipped"], page["complete"]) == (5, 0, False)
    page = output_page([], after_seq=2, last_seq=5, ended=True)  # all dropped by retention
    assert (page["next_seq"], page["skipped"], page["complete"]) == (5, 3, True)


@given(
    total=st.integers(0, 300),
    history_lines=st.integers(0, 50),
    disconnect_at=st.integers(0, 300),
    watch_at=st.integers(0, 300),
    limits=st.lists(st.integers(1, 40), min_size=1, max_size=5),
)
@settings(max_examples=200, deadline=None)
def test_catching_up_loses_and_duplicates_nothing(
    total: int, history_lines: int, disconnect_at: int, watch_at: int, limits: list[int]
) -> None:
    """A client sees lines until it disconnects, watches again later, fetches the gap in pages of
    varying size (memory when it holds them, else the store) and then receives live lines."""
    disconnect_at = min(disconnect_at, total)
    watch_at = min(max(watch_at, disconnect_at), total)
    history = OutputHistory(history_lines)
    stored: list[AgentOutputLine] = []
    seen: list[int] = []
    last_seq_at_watch = 0
    for n in range(1, total + 1):
        if n - 1 == watch_at:
            last_seq_at_watch = history.last_seq
        item = history.append("stdout", str(n))
        stored.append(item)
        if n <= disconnect_at:
            seen.append(item.seq)
    if watch_at == total:
        last_seq_at_watch = history.last_seq
    after = seen[-1] if seen else 0
    gap: list[int] = []
    pages = 0
    while after < last_seq_at_watch:
        limit = min(limits[pages % len(limits)], last_seq_at_watch - after)
        if history.covers(after):
            lines = history.after(after, limit)
        else:
            lines = [line for line in stored if line.seq > after][:limit]
        page = output_page(take_page(lines), after_seq=after, last_seq=history.last_seq, ended=False)
        assert page["skipped"] == 0
        gap += [o["seq"] for o in page["output"]]
        after = page["next_seq"]
        pages += 1
    live = [line.seq for line in stored if line.seq > last_seq_at_watch]
    assert seen + gap + live == list(range(1, total + 1))


def test_describe_session_hides_the_prompt_unless_allowed() -> None:
    record = AgentSessionRecord(
        id="ses_1", agent_type="default", status="killed", started_at=1.0, exit_code=-9, prompt="secret plan"
    )
    shown = describe_session(record, show_prompt=False)
    assert "prompt" not in shown
    assert (shown["signal"], shown["session_id"]) == ("SIGKILL", "ses_1")
    assert describe_session(record, show_prompt=True)["prompt"] == "secret plan"


# --- reading lines ----------------------------------------------------------------------------------------


async def lines_of(chunks: list[bytes], max_bytes: int = 8) -> list[str]:
    reader = asyncio.StreamReader(limit=max_bytes)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return [line async for line in read_lines(reader, max_bytes)]


async def test_lines_are_split_at_newlines() -> None:
    assert await lines_of([b"a\nb", b"c\r\n\n", b"last"]) == ["a", "bc", "", "last"]
    assert await lines_of([]) == []
    assert await lines_of([b"only\n"]) == ["only"]


async def test_overlong_lines_come_in_pieces() -> None:
    assert await lines_of([b"0123456789abcdefghij\nxy\n"], max_bytes=8) == [
        "01234567",
        "89abcdef",
        "ghij",
        "xy",
    ]


async def test_utf8_is_decoded_across_pieces_and_garbage_replaced() -> None:
    text = "ééééé\n"  # 2 bytes each: 3-byte pieces cut characters in half, decoding keeps them whole
    assert "".join(await lines_of([text.encode()], max_bytes=3)) == "ééééé"
    assert await lines_of([b"ok \xff\xfe end\n"], max_bytes=64) == ["ok \ufffd\ufffd end"]
    assert await lines_of([b"cut \xe2\x82"], max_bytes=64) == ["cut \ufffd"]


async def test_a_slow_producer_is_read_as_it_writes() -> None:
    reader = asyncio.StreamReader(limit=64)
    got: list[str] = []

    async def consume() -> None:
        async for line in read_lines(reader, 64):
            got.append(line)

    task = asyncio.create_task(consume())
    reader.feed_data(b"one\ntw")
    await asyncio.sleep(0.01)
    assert got == ["one"]
    reader.feed_data(b"o\n")
    reader.feed_eof()
    await task
    assert got == ["one", "two"]


# --- process groups ---------------------------------------------------------------------------------------


def test_signal_group_never_signals_our_own_group() -> None:
    assert signal_group(os.getpgrp(), 0) is False
    assert signal_group(0, signal.SIGTERM) is False
    assert signal_group(1, signal.SIGTERM) is False


def test_group_alive_follows_a_real_group() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert group_alive(proc.pid)
        assert signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert not group_alive(proc.pid)
        assert signal_group(proc.pid, signal.SIGKILL) is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the store ----------------------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "wardgate.db")
    await s.open()
    yield s
    await s.close()


def record(i: int, **over: Any) -> AgentSessionRecord:
    base = AgentSessionRecord(
        id=f"ses_{i}",
        agent_type="default",
        status="running",
        started_at=1000.0 + i,
        device_id="dev_1",
        command="claude",
    )
    return dataclasses.replace(base, **over)


def out(seqs: range, stream: str = "stdout") -> list[AgentOutputLine]:
    return [AgentOutputLine(seq, stream, f"line {seq}") for seq in seqs]


async def test_store_session_records(store: SqliteStore) -> None:
    await store.save_agent_session(record(1))
    await store.save_agent_session(record(2, prompt="p"))
    assert await store.get_agent_session("ses_1") == record(1)
    assert await store.get_agent_session("ses_9") is None
    await store.save_agent_session(record(1, status="exited", ended_at=1005.0, exit_code=0, last_seq=7))
    await store.save_agent_session(record(1, status="exited", ended_at=1005.0, exit_code=0, last_seq=3))
    saved = await store.get_agent_session("ses_1")
    assert saved is not None
    assert (saved.status, saved.exit_code, saved.last_seq) == ("exited", 0, 7)  # never backwards
    assert [r.id for r in await store.list_agent_sessions(limit=10)] == ["ses_2", "ses_1"]
    assert [r.id for r in await store.list_agent_sessions(limit=1)] == ["ses_2"]


async def test_store_output_batches_pages_and_retention(store: SqliteStore) -> None:
    await store.save_agent_session(record(1))
    await store.append_agent_output("ses_1", [])
    await store.append_agent_output("ses_1", out(range(1, 201)))
    await store.append_agent_output("ses_1", out(range(201, 251), "stderr"))
    page = await store.agent_output("ses_1", after_seq=195, limit=10)
    assert [line.seq for line in page] == list(range(196, 206))
    assert page[-1] == AgentOutputLine(205, "stderr", "line 205")
    saved = await store.get_agent_session("ses_1")
    assert saved is not None
    assert saved.last_seq == 250  # appends raise last_seq
    await store.append_agent_output("ses_1", out(range(251, 261)), keep_last=100)
    kept = await store.agent_output("ses_1", after_seq=0, limit=1000)
    assert [line.seq for line in kept] == list(range(161, 261))
    assert await store.agent_output("ses_2", after_seq=0, limit=10) == []


async def test_store_prunes_old_sessions_with_their_output(store: SqliteStore) -> None:
    for i in range(1, 6):
        await store.save_agent_session(record(i))
        await store.append_agent_output(f"ses_{i}", out(range(1, 4)))
    assert await store.prune_agent_sessions(keep=2) == 3
    assert [r.id for r in await store.list_agent_sessions(limit=10)] == ["ses_5", "ses_4"]
    assert await store.agent_output("ses_1", after_seq=0, limit=10) == []
    assert len(await store.agent_output("ses_5", after_seq=0, limit=10)) == 3
    assert await store.prune_agent_sessions(keep=2) == 0


async def test_store_agent_sessions_survive_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "db")
    await first.open()
    await first.save_agent_session(record(1, status="exited", exit_code=0))
    await first.append_agent_output("ses_1", out(range(1, 4)))
    await first.close()
    second = SqliteStore(tmp_path / "db")
    await second.open()
    try:
        assert [line.line for line in await second.agent_output("ses_1", after_seq=1, limit=5)] == [
            "line 2",
            "line 3",
        ]
    finally:
        await second.close()


# --- the manager in-process (real subprocesses of the stand-in agent) ------------------------------------

FAKE_AGENT = Path(__file__).resolve().parent.parent / "fixtures" / "fake_agent.py"


class FakeConnection:
    """What the manager uses of a connection: identity, and a non-blocking ``post``."""

    def __init__(self, name: str, *, accepts: int = 1_000_000) -> None:
        self.id = f"c_{name}"
        self.device_id = f"dev_{name}"
        self.client_ip = "127.0.0.1"
        self.accepts = accepts
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def post(self, data: bytes) -> bool:
        if len(self.received) >= self.accepts:
            return False  # the queue is full: the connection disconnects itself
        self.received.append(json.loads(data))
        self.arrived.set()
        return True

    async def until_line(self, prefix: str) -> None:
        while not any(line.startswith(prefix) for line in self.lines()):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)

    def lines(self) -> list[str]:
        return [m["params"]["line"] for m in self.received if m["method"] == "event/agent_output"]

    def statuses(self) -> list[str]:
        return [m["params"]["status"] for m in self.received if m["method"] == "event/agent_status"]


class FakeGateway:
    def __init__(self, config: Config, store: SqliteStore, workspace: Path) -> None:
        self.config = config
        self.store = store
        self.workspace = workspace
        self.audited: list[tuple[str, dict[str, Any]]] = []

    def audit(self, event: str, **fields: Any) -> None:
        self.audited.append((event, {k: v for k, v in fields.items() if v is not None}))

    def events(self, prefix: str = "agent.") -> list[str]:
        return [event for event, _ in self.audited if event.startswith(prefix)]


@pytest.fixture
async def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[FakeGateway]:
    audit = getattr(request, "param", {})
    config = msgspec.convert(
        {
            "workspace": {
                "agent": {"command": [sys.executable, str(FAKE_AGENT), "{prompt}"]},
                "stop_grace": 0.5,
                "env_allowlist": ["PATH"],
            },
            "security": {"audit": audit},
        },
        Config,
    )
    store = SqliteStore(tmp_path / "db")
    await store.open()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    yield FakeGateway(config, store, workspace)
    await store.close()


def manager_for(gateway: FakeGateway) -> AgentManager:
    return AgentManager(cast("Gateway", gateway))


def as_conn(conn: FakeConnection) -> Connection:
    return cast("Connection", conn)


async def no_other_tasks() -> bool:
    await asyncio.sleep(0)
    return all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())


@pytest.mark.parametrize("gateway", [{"log_prompts": True}], indirect=True)
async def test_manager_run_respond_audit_and_slow_watcher(gateway: FakeGateway) -> None:
    manager = manager_for(gateway)
    owner, slow = FakeConnection("owner"), FakeConnection("slow", accepts=2)
    started = await manager.run(as_conn(owner), AgentRunParams(prompt="echo=1 out=2 secret-plan"))
    session = manager.sessions[started["session_id"]]
    watched = await manager.watch(as_conn(slow), SessionWatchParams(session_id=session.id))
    assert watched["watching"] is True
    await manager.respond(as_conn(owner), AgentRespondParams(input="hi"))
    await asyncio.wait_for(session.done.wait(), 10)
    assert owner.lines()[PREAMBLE_LINES:] == ["echo: hi", "out 1", "out 2"]
    assert owner.statuses() == ["running", "exited"]
    assert as_conn(slow) not in session.watchers  # dropped when its queue filled; the owner got everything
    assert [m["params"]["seq"] for m in owner.received if "seq" in m["params"]] == list(range(1, 8))
    assert gateway.events() == ["agent.started", "agent.input", "agent.exited"]
    fields = dict(gateway.audited)
    assert fields["agent.started"]["prompt"] == "echo=1 out=2 secret-plan"  # log_prompts is on
    assert fields["agent.started"]["command"] == Path(sys.executable).name
    assert fields["agent.input"]["bytes"] == 3
    assert "input" not in fields["agent.input"]
    assert fields["agent.exited"]["exit_code"] == 0
    listed = await manager.list_sessions(SessionListParams())
    assert listed["sessions"][0]["prompt"] == "echo=1 out=2 secret-plan"
    stored = await gateway.store.get_agent_session(session.id)
    assert stored is not None
    assert (stored.status, stored.last_seq, stored.prompt) == ("exited", 7, "echo=1 out=2 secret-plan")
    await manager.shutdown()
    assert await no_other_tasks()


async def test_manager_keeps_prompts_out_of_audit_and_store_by_default(gateway: FakeGateway) -> None:
    manager = manager_for(gateway)
    started = await manager.run(as_conn(FakeConnection("a")), AgentRunParams(prompt="out=1 private"))
    await asyncio.wait_for(manager.sessions[started["session_id"]].done.wait(), 10)
    assert "prompt" not in dict(gateway.audited)["agent.started"]
    assert dict(gateway.audited)["agent.started"]["prompt_chars"] == len("out=1 private")
    stored = await gateway.store.get_agent_session(started["session_id"])
    assert stored is not None
    assert stored.prompt is None
    await manager.shutdown()


@pytest.mark.parametrize("gateway", [{"log_commands": False}], indirect=True)
async def test_manager_audits_nothing_when_commands_are_not_logged(gateway: FakeGateway) -> None:
    manager = manager_for(gateway)
    started = await manager.run(as_conn(FakeConnection("a")), AgentRunParams(prompt="out=1"))
    await asyncio.wait_for(manager.sessions[started["session_id"]].done.wait(), 10)
    assert gateway.events() == []
    await manager.shutdown()


async def test_manager_shutdown_kills_running_agents_and_leaves_no_task(gateway: FakeGateway) -> None:
    manager = manager_for(gateway)
    conn = FakeConnection("a")
    started = await manager.run(as_conn(conn), AgentRunParams(prompt="ignore-term child wait"))
    session = manager.sessions[started["session_id"]]
    await conn.until_line("CHILD")
    assert manager.summary() == {"state": "running", "running": [session.id], "sessions": 1}
    await manager.shutdown()
    assert session.state is RunState.KILLED
    assert session.exit_code == -signal.SIGKILL
    assert not group_alive(session.pgid)
    assert manager.summary()["state"] == "idle"
    assert await no_other_tasks()
    with pytest.raises(AgentBusy):
        await manager.run(as_conn(conn), AgentRunParams(prompt="out=1"))
    assert gateway.events() == ["agent.started", "agent.stopped", "agent.exited", "agent.refused"]


async def test_manager_catch_up_reads_memory_then_store(gateway: FakeGateway) -> None:
    gateway.config.workspace.history_lines = 5
    manager = manager_for(gateway)
    started = await manager.run(as_conn(FakeConnection("a")), AgentRunParams(prompt="out=40"))
    session = manager.sessions[started["session_id"]]
    await asyncio.wait_for(session.done.wait(), 10)
    assert len(session.history) == 5
    total = PREAMBLE_LINES + 40
    seqs: list[int] = []
    after = 0
    while True:
        page = await manager.get(SessionGetParams(session_id=session.id, after_seq=after, limit=9))
        seqs += [line["seq"] for line in page["output"]]
        after = page["next_seq"]
        if page["complete"]:
            break
    assert seqs == list(range(1, total + 1))
    page = await manager.get(SessionGetParams(session_id=session.id, after_seq=total - 2))
    assert [line["line"] for line in page["output"]] == ["out 39", "out 40"]
    await manager.shutdown()
