"""Agents: run the configured agent CLI with a prompt, stream its output, keep it for catching up.

Methods (DESIGN.md, "Built-in workspace services"); the registry checks the scope:

=====================  ===============  ===================================================
``agent/run``          ``agent:run``    start an agent: ``{status: "started", session_id}``
``agent/stop``         ``agent:run``    SIGTERM, then SIGKILL, to its whole process group
``agent/respond``      ``agent:run``    write a line to its stdin
``session/list``       ``sessions:read`` recent sessions, newest first
``session/get``        ``sessions:read`` a session and a page of its output after a sequence number
``session/watch``      ``sessions:read`` receive its ``event/agent_output`` / ``event/agent_status``
``session/unwatch``    ``sessions:read`` stop receiving them
=====================  ===============  ===================================================

How an agent runs (seed 002, "Agent sandboxing"; seed 000's agent daemon):

* The command is an argument list from the configuration (``workspace.agent.command`` or
  ``workspace.agents.<name>.command``). ``{prompt}`` is replaced by the prompt, so the prompt is
  always exactly one argument, and no shell ever sees it (:func:`build_argv`).
* It runs in the workspace directory, in a new session (so a new process group), with only the
  environment variables named in ``workspace.env_allowlist`` (:func:`agent_environment`).
* Stopping signals the process GROUP: SIGTERM, then SIGKILL after ``workspace.stop_grace``
  seconds. Processes the agent leaves behind when it ends by itself are cleared the same way,
  so nothing the agent started outlives its run (a process that leaves the group with
  ``setsid`` escapes this; only an OS sandbox can prevent that).
* A run's state machine is one enum and one table (:data:`TRANSITIONS`).
* Output is read line by line (lines longer than ``workspace.max_line_bytes`` are split; bytes
  that are not UTF-8 become U+FFFD), numbered per session from 1, kept in a bounded in-memory
  history (:class:`OutputHistory`), written to the store in batches, and fanned out to the
  session's watchers with ``Connection.post``: it only queues, so a slow watcher never slows
  the agent or another watcher (its own bounded queue disconnects it).
* Catching up: ``session/watch`` answers the last sequence number produced so far; every later
  line arrives as an event. ``session/get`` with ``after_seq`` (and ``limit``) returns exactly
  the lines in between, from memory when the history still holds them, else from the store.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import enum
import itertools
import logging
import os
import secrets
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec

from wardgate.config import WorkspaceSettings
from wardgate.errors import (
    AgentBusy,
    AgentNotConfigured,
    AgentNotRunning,
    InternalError,
    InvalidParams,
    SessionNotFound,
    StoreUnavailable,
)
from wardgate.roles import Scope
from wardgate.rpc import jsonrpc
from wardgate.rpc.registry import Registry
from wardgate.store.base import AgentOutputLine, AgentSessionRecord

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection

log = logging.getLogger("wardgate.agent")

MIB: Final = 1024 * 1024
PROMPT_PLACEHOLDER: Final = "{prompt}"
DEFAULT_AGENT: Final = "default"
SESSION_PREFIX: Final = "ses_"
MAX_PROMPT_CHARS: Final = 100_000
MAX_INPUT_CHARS: Final = 64 * 1024
"""Largest ``agent/respond`` input, in characters."""
HISTORY_MAX_BYTES: Final = 32 * MIB
"""Output kept in memory per session, whatever ``workspace.history_lines`` says."""
STORED_LINES_PER_SESSION: Final = 100_000
"""Output lines the store keeps per session (the oldest go first)."""
STORED_SESSIONS: Final = 200
"""Sessions the store keeps (with their output); older ones are pruned."""
ENDED_SESSIONS_IN_MEMORY: Final = 20
"""Ended sessions kept in memory (older ones are served from the store)."""
FLUSH_INTERVAL: Final = 0.1
FLUSH_LINES: Final = 200
"""Output is written to the store every ``FLUSH_INTERVAL`` seconds or ``FLUSH_LINES`` lines."""
DEFAULT_PAGE_LINES: Final = 1000
MAX_PAGE_LINES: Final = 5000
MAX_PAGE_BYTES: Final = MIB
"""A ``session/get`` page holds at most this much line text (at least one line)."""
DEFAULT_LIST_SESSIONS: Final = 50
MAX_LIST_SESSIONS: Final = 500
GROUP_POLL_INTERVAL: Final = 0.05
PIPE_DRAIN_TIMEOUT: Final = 2.0
"""Seconds to wait for the output pipes to close once the whole process group is gone."""
INPUT_DRAIN_TIMEOUT: Final = 5.0
"""Seconds ``agent/respond`` waits for the agent to take its input."""
LINE_OVERHEAD: Final = 64
"""Bytes counted per line on top of its text (for the memory and page budgets)."""

STDOUT: Final = "stdout"
STDERR: Final = "stderr"


# --- the run state machine (pure) -----------------------------------------------------------------


class RunState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    """Ended by itself with status 0."""
    KILLED = "killed"
    """Ended after ``agent/stop`` (or the daemon stopping)."""
    FAILED = "failed"
    """Could not start, or ended by itself with a non-zero status or a signal."""


class RunEvent(enum.Enum):
    SPAWNED = "spawned"
    SPAWN_FAILED = "spawn_failed"
    STOP = "stop"
    EXIT_OK = "exit_ok"
    EXIT_ERROR = "exit_error"


TRANSITIONS: Final[Mapping[tuple[RunState, RunEvent], RunState]] = MappingProxyType(
    {
        (RunState.STARTING, RunEvent.SPAWNED): RunState.RUNNING,
        (RunState.STARTING, RunEvent.SPAWN_FAILED): RunState.FAILED,
        (RunState.RUNNING, RunEvent.STOP): RunState.STOPPING,
        (RunState.RUNNING, RunEvent.EXIT_OK): RunState.EXITED,
        (RunState.RUNNING, RunEvent.EXIT_ERROR): RunState.FAILED,
        (RunState.STOPPING, RunEvent.STOP): RunState.STOPPING,
        (RunState.STOPPING, RunEvent.EXIT_OK): RunState.KILLED,
        (RunState.STOPPING, RunEvent.EXIT_ERROR): RunState.KILLED,
    }
)
"""Every legal (state, event) pair and the state it leads to; any other pair is a bug."""

LIVE_STATES: Final = frozenset({RunState.STARTING, RunState.RUNNING, RunState.STOPPING})
"""States that hold one of the ``workspace.max_running_agents`` slots."""
TERMINAL_STATES: Final = frozenset({RunState.EXITED, RunState.KILLED, RunState.FAILED})


class TransitionError(InternalError):
    """An event the run's state does not allow: a wardgate bug, answered as -32603."""

    def __init__(self, event: RunEvent, state: RunState) -> None:
        super().__init__()
        self.event = event
        self.state = state
        self.args = (event, state)

    def __str__(self) -> str:
        return f"agent run event {self.event.name} is not allowed in state {self.state.name}"


def next_state(state: RunState, event: RunEvent) -> RunState:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise TransitionError(event, state) from None


def exit_event(returncode: int) -> RunEvent:
    return RunEvent.EXIT_OK if returncode == 0 else RunEvent.EXIT_ERROR


# --- the command line and the environment (pure) ---------------------------------------------------


def validate_prompt(prompt: str, *, max_chars: int = MAX_PROMPT_CHARS) -> None:
    """Refuse an empty, blank, oversized or NUL-carrying prompt (the hint never quotes it)."""
    if not prompt.strip():
        raise InvalidParams(hint="prompt must not be empty")
    if len(prompt) > max_chars:
        raise InvalidParams(hint=f"prompt is longer than {max_chars} characters")
    if "\x00" in prompt:
        raise InvalidParams(hint="prompt must not contain NUL characters")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams(hint="prompt must be valid Unicode text") from None


def build_argv(command: Sequence[str], prompt: str) -> list[str]:
    """The argument list to execute: each ``{prompt}`` in ``command`` becomes the prompt.

    The replacement is one pass over the configured text, so a prompt that itself contains
    ``{prompt}`` is not expanded again, and the prompt never spans more than the one element
    that holds the placeholder. A command without a placeholder gets the prompt appended as its
    last argument. A prompt starting with ``-`` in an argument of its own would be read as an
    option by the agent (``--dangerously-skip-permissions``...), so it is refused unless the
    command puts ``--`` before the placeholder.
    """
    if not command:
        raise AgentNotConfigured
    argv: list[str] = []
    placed = False
    for element in command:
        if PROMPT_PLACEHOLDER in element:
            if element == PROMPT_PLACEHOLDER and prompt.startswith("-") and "--" not in argv[1:]:
                raise InvalidParams(
                    hint="a prompt may not start with '-' (the agent would read it as an option)"
                )
            argv.append(element.replace(PROMPT_PLACEHOLDER, prompt))
            placed = True
        else:
            argv.append(element)
    if not placed:
        if prompt.startswith("-") and "--" not in argv[1:]:
            raise InvalidParams(hint="a prompt may not start with '-' (the agent would read it as an option)")
        argv.append(prompt)
    return argv


def agent_environment(allowlist: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Only the allowlisted variables that are set; nothing else of wardgate's environment."""
    return {name: environ[name] for name in allowlist if name in environ}


def command_name(argv0: str) -> str:
    """The program's name without its directory (audit and session records never hold paths)."""
    return PurePath(argv0).name or "agent"


def configured_agent_types(settings: WorkspaceSettings) -> list[str]:
    names = [DEFAULT_AGENT] if settings.agent.command else []
    names += sorted(name for name, agent in settings.agents.items() if agent.command and name not in names)
    return names


def resolve_agent(settings: WorkspaceSettings, agent_type: str | None) -> tuple[str, list[str]]:
    """``(agent_type, command)`` for a request; AgentNotConfigured if there is no such agent."""
    name = agent_type or DEFAULT_AGENT
    command: list[str] = []
    if name == DEFAULT_AGENT and settings.agent.command:
        command = list(settings.agent.command)
    elif name in settings.agents:
        command = list(settings.agents[name].command)
    if not command:
        raise AgentNotConfigured(
            hint="choose one of agent_types with agent_type" if agent_type is None else None,
            agent_types=configured_agent_types(settings),
        )
    return name, command


def signal_name(returncode: int | None) -> str | None:
    """``SIGKILL`` for -9 (asyncio's way of saying a signal ended the process)."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"SIG{-returncode}"


# --- output: reading lines, the history, pages (pure, or over a StreamReader) -----------------------


async def read_lines(reader: asyncio.StreamReader, max_bytes: int) -> AsyncIterator[str]:
    """Lines of a pipe without their line ending; a line over ``max_bytes`` comes in pieces.

    The reader's limit must be ``max_bytes``. Decoding is incremental, so a multi-byte character
    cut by a split is kept whole; invalid UTF-8 becomes U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # end of the stream
            tail = decoder.decode(exc.partial, final=True)
            if tail:
                yield tail
            return
        except asyncio.LimitOverrunError:  # no newline within max_bytes: a piece of a long line
            piece = decoder.decode(await reader.read(max_bytes))
            if piece:
                yield piece
            continue
        text = decoder.decode(chunk)
        yield text[:-2] if text.endswith("\r\n") else text[:-1]


def line_cost(line: AgentOutputLine) -> int:
    return len(line.line) + LINE_OVERHEAD


class OutputHistory:
    """The most recent output lines of one session, numbered from 1 without gaps.

    Bounded by a line count and a byte budget (the oldest lines go first). Because the
    numbers are contiguous, whether a range is still here is simple arithmetic.
    """

    def __init__(self, max_lines: int, max_bytes: int = HISTORY_MAX_BYTES) -> None:
        self.max_lines = max(0, max_lines)
        self.max_bytes = max_bytes
        self.last_seq = 0
        self._lines: deque[AgentOutputLine] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest line held (``last_seq + 1`` when none is)."""
        return self._lines[0].seq if self._lines else self.last_seq + 1

    def append(self, stream: str, line: str) -> AgentOutputLine:
        self.last_seq += 1
        item = AgentOutputLine(self.last_seq, stream, line)
        self._lines.append(item)
        self._bytes += line_cost(item)
        while self._lines and (
            len(self._lines) > self.max_lines or (self._bytes > self.max_bytes and len(self._lines) > 1)
        ):
            self._bytes -= line_cost(self._lines.popleft())
        return item

    def covers(self, after_seq: int) -> bool:
        """Whether every line after ``after_seq`` is still held."""
        return after_seq + 1 >= self.first_seq

    def after(self, after_seq: int, limit: int) -> list[AgentOutputLine]:
        """Up to ``limit`` held lines with ``seq > after_seq``, in order."""
        start = max(after_seq + 1, self.first_seq) - self.first_seq
        return list(itertools.islice(self._lines, start, start + max(0, limit)))


def take_page(lines: Iterable[AgentOutputLine], *, max_bytes: int = MAX_PAGE_BYTES) -> list[AgentOutputLine]:
    """The leading lines that fit ``max_bytes`` (always at least one, so paging advances)."""
    page: list[AgentOutputLine] = []
    used = 0
    for line in lines:
        cost = line_cost(line)
        if page and used + cost > max_bytes:
            break
        page.append(line)
        used += cost
    return page


def output_page(
    lines: Sequence[AgentOutputLine], *, after_seq: int, last_seq: int, ended: bool
) -> dict[str, Any]:
    """``session/get``'s output part: the lines, where to continue, what was lost, whether done.

    ``next_seq`` is the ``after_seq`` of the following call. ``skipped`` counts lines after
    ``after_seq`` that retention already dropped (0 unless a client is far behind).
    """
    if lines:
        skipped = lines[0].seq - after_seq - 1
        next_seq = lines[-1].seq
    else:
        skipped = max(0, last_seq - after_seq)
        next_seq = max(after_seq, last_seq)
    return {
        "output": [{"seq": line.seq, "stream": line.stream, "line": line.line} for line in lines],
        "next_seq": next_seq,
        "skipped": skipped,
        "complete": ended and next_seq >= last_seq,
    }


def describe_session(record: AgentSessionRecord, *, show_prompt: bool) -> dict[str, Any]:
    """A session as clients see it: no path, no environment, the prompt only if allowed."""
    out: dict[str, Any] = {
        "session_id": record.id,
        "agent_type": record.agent_type,
        "command": record.command,
        "status": record.status,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "exit_code": record.exit_code,
        "signal": signal_name(record.exit_code),
        "device_id": record.device_id,
        "last_seq": record.last_seq,
    }
    if show_prompt and record.prompt is not None:
        out["prompt"] = record.prompt
    return out


# --- process groups ------------------------------------------------------------------------------------


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if it is gone. Never wardgate's own group."""
    if pgid <= 1 or pgid == os.getpgrp():
        log.error("refusing to signal process group %d", pgid)
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group %d", pgid)
        return False
    return True


_PROC: Final = Path("/proc")


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies (dead, not yet reaped by whoever
    inherited them) do not count: they hold no resources and cannot be killed again."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not (_PROC / "self" / "stat").exists():
        return True  # no /proc: the kernel says a member exists
    with os.scandir(_PROC) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = (_PROC / entry.name / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


async def wait_group_gone(pgid: int, until: float) -> bool:
    """Poll until no process of the group runs (True) or ``time.monotonic()`` reaches ``until``.

    Polling, because nothing notifies a parent when its grandchildren exit."""
    while True:
        if not group_alive(pgid):
            return True
        if time.monotonic() >= until:
            return False
        await asyncio.sleep(GROUP_POLL_INTERVAL)


# --- params ----------------------------------------------------------------------------------------------

SessionId = Annotated[str, msgspec.Meta(pattern=r"^ses_[0-9a-f]{8,64}$")]
AgentType = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class AgentRunParams(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
    agent_type: AgentType | None = None
    """A name under ``workspace.agents``; omitted or ``"default"``: ``workspace.agent``."""
    close_stdin: bool = False
    """Give the agent no stdin (``/dev/null``): for CLIs that wait for the end of their input,
    as ``claude -p`` does when stdin is a pipe. ``agent/respond`` is then refused."""


class AgentStopParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: SessionId | None = None
    """Omitted: the one running agent."""


class AgentRespondParams(msgspec.Struct, forbid_unknown_fields=True):
    input: Annotated[str, msgspec.Meta(max_length=MAX_INPUT_CHARS)]
    session_id: SessionId | None = None
    eof: bool = False
    """Close the agent's stdin after writing (``input`` may then be empty)."""


class SessionListParams(msgspec.Struct, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_SESSIONS)] = DEFAULT_LIST_SESSIONS


class SessionGetParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: SessionId
    after_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_LINES)] = DEFAULT_PAGE_LINES


class SessionWatchParams(msgspec.Struct, forbid_unknown_fields=True):
    session_id: SessionId


# --- sessions and the manager ------------------------------------------------------------------------------


def new_session_id() -> str:
    return SESSION_PREFIX + secrets.token_hex(12)


class AgentSession:
    """One agent run in memory: its state, process, history, watchers and pending store writes."""

    def __init__(
        self,
        *,
        agent_type: str,
        command: str,
        device_id: str | None,
        prompt: str | None,
        history_lines: int,
    ) -> None:
        self.id = new_session_id()
        self.agent_type = agent_type
        self.command = command
        self.device_id = device_id
        self.prompt = prompt
        """Only kept when ``security.audit.log_prompts`` is on."""
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.state = RunState.STARTING
        self.history = OutputHistory(history_lines)
        self.watchers: set[Connection] = set()
        self.process: asyncio.subprocess.Process | None = None
        self.pgid = 0
        self.stdin_open = False
        self.stop_deadline: float | None = None
        """``time.monotonic()`` at which the group gets SIGKILL; set by the first stop."""
        self.done = asyncio.Event()
        """Set once the process and its group are gone, the output read and the end recorded."""
        self.pending: list[AgentOutputLine] = []
        self.flush_wanted = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self.output_finished = False
        self.store_failed = False

    def record(self) -> AgentSessionRecord:
        return AgentSessionRecord(
            id=self.id,
            agent_type=self.agent_type,
            status=self.state.value,
            started_at=self.started_at,
            device_id=self.device_id,
            ended_at=self.ended_at,
            exit_code=self.exit_code,
            last_seq=self.history.last_seq,
            command=self.command,
            prompt=self.prompt,
        )


class AgentManager:
    """Every agent run of one daemon, and the sessions clients can read and watch."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sessions: dict[str, AgentSession] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._recovered = False

    @property
    def settings(self) -> WorkspaceSettings:
        return self.gateway.config.workspace

    @property
    def log_prompts(self) -> bool:
        return self.gateway.config.security.audit.log_prompts

    def _audit(self, event: str, **fields: Any) -> None:
        if self.gateway.config.security.audit.log_commands:
            self.gateway.audit(event, **fields)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def summary(self) -> dict[str, Any]:
        running = [s.id for s in self.sessions.values() if s.state in LIVE_STATES]
        return {"state": "running" if running else "idle", "running": running, "sessions": len(self.sessions)}

    # --- events --------------------------------------------------------------------------------------

    def _fan_out(self, session: AgentSession, method: str, params: dict[str, Any]) -> None:
        """Queue one notification for every watcher, encoded once; never waits for a socket."""
        if not session.watchers:
            return
        data = jsonrpc.encode_notification(method, params)
        for conn in list(session.watchers):
            if not conn.post(data):
                session.watchers.discard(conn)  # closing, or too slow: it is being disconnected

    def _transition(self, session: AgentSession, event: RunEvent) -> None:
        session.state = next_state(session.state, event)
        params: dict[str, Any] = {"session_id": session.id, "status": session.state.value}
        if session.state in TERMINAL_STATES:
            params["exit_code"] = session.exit_code
            params["signal"] = signal_name(session.exit_code)
            params["last_seq"] = session.history.last_seq
        self._fan_out(session, "event/agent_status", params)

    def _emit(self, session: AgentSession, stream: str, text: str) -> None:
        item = session.history.append(stream, text)
        session.pending.append(item)
        if len(session.pending) >= FLUSH_LINES:
            session.flush_wanted.set()
        self._fan_out(
            session,
            "event/agent_output",
            {"session_id": session.id, "seq": item.seq, "stream": stream, "line": text},
        )

    # --- the store ---------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Once: sessions a previous daemon left live (it crashed) are recorded as failed."""
        if self._recovered:
            return
        self._recovered = True
        store = self.gateway.store
        try:
            for record in await store.list_agent_sessions(limit=STORED_SESSIONS):
                if record.id not in self.sessions and RunState(record.status) in LIVE_STATES:
                    await store.save_agent_session(dataclasses.replace(record, status=RunState.FAILED.value))
            await store.prune_agent_sessions(keep=STORED_SESSIONS)
        except (StoreUnavailable, ValueError):
            log.warning("could not check the stored agent sessions")

    async def _save(self, session: AgentSession) -> None:
        try:
            await self.gateway.store.save_agent_session(session.record())
        except StoreUnavailable:
            log.warning("could not record agent session %s", session.id)

    async def _flush(self, session: AgentSession) -> None:
        async with session.flush_lock:
            if not session.pending:
                return
            batch, session.pending = session.pending, []
            try:
                await self.gateway.store.append_agent_output(
                    session.id, batch, keep_last=STORED_LINES_PER_SESSION
                )
            except Exception:
                if not session.store_failed:
                    log.exception("could not store the output of agent session %s", session.id)
                session.store_failed = True

    async def _persist(self, session: AgentSession) -> None:
        """Write output in batches: every FLUSH_INTERVAL seconds or FLUSH_LINES lines."""
        while not session.output_finished:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.flush_wanted.wait(), FLUSH_INTERVAL)
            session.flush_wanted.clear()
            await self._flush(session)
        await self._flush(session)

    def _forget_old_sessions(self) -> None:
        ended = [s for s in self.sessions.values() if s.state in TERMINAL_STATES]
        for session in ended[: max(0, len(ended) - ENDED_SESSIONS_IN_MEMORY)]:
            session.watchers.clear()
            del self.sessions[session.id]

    # --- running -----------------------------------------------------------------------------------

    async def run(self, conn: Connection, params: AgentRunParams) -> dict[str, Any]:
        await self._recover()
        validate_prompt(params.prompt)
        agent_type, command = resolve_agent(self.settings, params.agent_type)
        argv = build_argv(command, params.prompt)
        audit_who = {"device": conn.device_id, "conn": conn.id, "ip": conn.client_ip}
        live = sum(1 for s in self.sessions.values() if s.state in LIVE_STATES)
        if self._closed or live >= self.settings.max_running_agents:
            self._audit("agent.refused", reason="busy", agent_type=agent_type, **audit_who)
            raise AgentBusy(
                hint="the server is shutting down"
                if self._closed
                else "stop the running agent first (workspace.max_running_agents)",
                running=live,
            )
        session = AgentSession(
            agent_type=agent_type,
            command=command_name(argv[0]),
            device_id=conn.device_id,
            prompt=params.prompt if self.log_prompts else None,
            history_lines=self.settings.history_lines,
        )
        self.sessions[session.id] = session  # holds its slot from here on
        session.watchers.add(conn)
        try:
            await self.gateway.store.save_agent_session(session.record())
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=self.gateway.workspace,
                env=agent_environment(self.settings.env_allowlist, os.environ),
                stdin=asyncio.subprocess.DEVNULL if params.close_stdin else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=max(1, self.settings.max_line_bytes),
            )
        except OSError:
            session.ended_at = time.time()
            self._transition(session, RunEvent.SPAWN_FAILED)
            await self._save(session)
            self._audit(
                "agent.failed",
                session=session.id,
                agent_type=agent_type,
                command=session.command,
                **audit_who,
            )
            log.warning("agent %s could not be started", session.command)
            self._forget_old_sessions()
            raise AgentNotConfigured(hint="the agent command could not be started") from None
        except BaseException:
            del self.sessions[session.id]
            raise
        session.process = process
        session.pgid = process.pid  # start_new_session: the agent leads a new process group
        session.stdin_open = process.stdin is not None
        self._transition(session, RunEvent.SPAWNED)
        self._audit(
            "agent.started",
            session=session.id,
            agent_type=agent_type,
            command=session.command,
            prompt=params.prompt if self.log_prompts else None,
            prompt_chars=len(params.prompt),
            **audit_who,
        )
        log.info("agent session %s started (%s)", session.id, agent_type)
        self._spawn(self._supervise(session, process))
        if self._closed:  # the daemon began stopping while the agent was starting
            self._spawn(self._stop(session, by="shutdown"))
        return {"status": "started", "session_id": session.id, "agent_type": agent_type}

    async def _pump(self, session: AgentSession, reader: asyncio.StreamReader, stream: str) -> None:
        try:
            async for text in read_lines(reader, max(1, self.settings.max_line_bytes)):
                self._emit(session, stream, text)
                # Give the connections' writers a turn, so that a burst of buffered lines cannot
                # fill a watcher's queue faster than its socket drains it.
                await asyncio.sleep(0)
        except Exception:
            log.exception("reading the %s of agent session %s failed", stream, session.id)

    async def _supervise(self, session: AgentSession, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        pumps = [
            self._spawn(self._pump(session, process.stdout, STDOUT)),
            self._spawn(self._pump(session, process.stderr, STDERR)),
        ]
        persist = self._spawn(self._persist(session))
        try:
            returncode = await process.wait()
            session.stdin_open = False
            if process.stdin is not None:
                process.stdin.close()
            await self._clear_group(session)
            _, stuck = await asyncio.wait(pumps, timeout=PIPE_DRAIN_TIMEOUT)
            for task in stuck:  # a process that left the group still holds a pipe
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if stuck:
                self._close_pipes(process)
            session.output_finished = True
            session.flush_wanted.set()
            await persist
            session.exit_code = returncode
            session.ended_at = time.time()
            self._transition(session, exit_event(returncode))
            await self._save(session)
            self._audit(
                "agent.exited",
                session=session.id,
                status=session.state.value,
                exit_code=returncode,
                lines=session.history.last_seq,
            )
            log.info("agent session %s %s (exit code %s)", session.id, session.state.value, returncode)
        except asyncio.CancelledError:
            signal_group(session.pgid, signal.SIGKILL)
            raise
        finally:
            for task in (*pumps, persist):
                task.cancel()
            session.done.set()
            self._forget_old_sessions()

    @staticmethod
    def _close_pipes(process: asyncio.subprocess.Process) -> None:
        transport = getattr(process, "_transport", None)
        if transport is not None:
            transport.close()

    async def _clear_group(self, session: AgentSession) -> None:
        """The agent has exited: end whatever it left in its group (TERM, then KILL at the deadline)."""
        pgid = session.pgid
        if not group_alive(pgid):
            return
        if session.stop_deadline is None:
            session.stop_deadline = time.monotonic() + self.settings.stop_grace
            signal_group(pgid, signal.SIGTERM)
        if not await wait_group_gone(pgid, session.stop_deadline) and signal_group(pgid, signal.SIGKILL):
            await wait_group_gone(pgid, time.monotonic() + PIPE_DRAIN_TIMEOUT)

    async def _stop(self, session: AgentSession, *, by: str | None) -> None:
        """Stop a live run and return once it is over (process, group, output, record)."""
        process = session.process
        if session.state is RunState.RUNNING and process is not None and process.returncode is None:
            self._transition(session, RunEvent.STOP)
            session.stop_deadline = time.monotonic() + self.settings.stop_grace
            self._audit("agent.stopped", session=session.id, by=by)
            signal_group(session.pgid, signal.SIGTERM)
        elif session.state not in (RunState.RUNNING, RunState.STOPPING):
            raise AgentNotRunning
        deadline = session.stop_deadline
        if deadline is not None:
            try:
                await asyncio.wait_for(session.done.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                signal_group(session.pgid, signal.SIGKILL)
        await session.done.wait()

    async def _target(self, session_id: str | None) -> AgentSession:
        """The live session a stop or respond is for."""
        if session_id is not None:
            session = self.sessions.get(session_id)
            if session is not None:
                return session
            if await self.gateway.store.get_agent_session(session_id) is not None:
                raise AgentNotRunning
            raise SessionNotFound
        live = [s for s in self.sessions.values() if s.state in (RunState.RUNNING, RunState.STOPPING)]
        if not live:
            raise AgentNotRunning
        if len(live) > 1:
            raise InvalidParams(hint="several agents are running: name one with session_id")
        return live[0]

    async def stop(self, conn: Connection, params: AgentStopParams) -> dict[str, Any]:
        session = await self._target(params.session_id)
        await self._stop(session, by=conn.device_id or conn.id)
        return {
            "session_id": session.id,
            "status": session.state.value,
            "exit_code": session.exit_code,
            "signal": signal_name(session.exit_code),
        }

    async def respond(self, conn: Connection, params: AgentRespondParams) -> dict[str, Any]:
        session = await self._target(params.session_id)
        process = session.process
        stdin = process.stdin if process is not None else None
        if (
            session.state is not RunState.RUNNING
            or process is None
            or process.returncode is not None
            or stdin is None
            or not session.stdin_open
        ):
            raise AgentNotRunning(hint="the agent is not running or does not read input")
        data = b""
        if params.input or not params.eof:
            text = params.input if params.input.endswith("\n") else params.input + "\n"
            data = text.encode("utf-8", errors="replace")
        try:
            if data:
                stdin.write(data)
                await asyncio.wait_for(stdin.drain(), INPUT_DRAIN_TIMEOUT)
            if params.eof:
                session.stdin_open = False
                stdin.close()
        except TimeoutError:
            raise AgentBusy(hint="the agent is not reading its input") from None
        except (BrokenPipeError, ConnectionResetError):
            session.stdin_open = False
            raise AgentNotRunning(hint="the agent closed its input") from None
        self._audit("agent.input", session=session.id, device=conn.device_id, bytes=len(data), eof=params.eof)
        return {"session_id": session.id, "written": len(data), "eof": params.eof}

    # --- reading and watching ----------------------------------------------------------------------

    async def list_sessions(self, params: SessionListParams) -> dict[str, Any]:
        await self._recover()
        records = {s.id: s.record() for s in self.sessions.values()}
        try:
            stored = await self.gateway.store.list_agent_sessions(limit=params.limit)
        except StoreUnavailable:
            stored = []
        for record in stored:
            records.setdefault(record.id, record)
        newest = sorted(records.values(), key=lambda r: (r.started_at, r.id), reverse=True)[: params.limit]
        return {"sessions": [describe_session(r, show_prompt=self.log_prompts) for r in newest]}

    async def get(self, params: SessionGetParams) -> dict[str, Any]:
        await self._recover()
        store = self.gateway.store
        session = self.sessions.get(params.session_id)
        lines: Sequence[AgentOutputLine]
        if session is not None:
            record = session.record()
            if session.history.covers(params.after_seq):
                lines = session.history.after(params.after_seq, params.limit)
            else:
                await self._flush(session)
                lines = await store.agent_output(session.id, after_seq=params.after_seq, limit=params.limit)
        else:
            stored = await store.get_agent_session(params.session_id)
            if stored is None:
                raise SessionNotFound
            record = stored
            lines = await store.agent_output(record.id, after_seq=params.after_seq, limit=params.limit)
        page = take_page(lines)
        ended = RunState(record.status) in TERMINAL_STATES
        result = {"session": describe_session(record, show_prompt=self.log_prompts)}
        result.update(output_page(page, after_seq=params.after_seq, last_seq=record.last_seq, ended=ended))
        return result

    async def watch(self, conn: Connection, params: SessionWatchParams) -> dict[str, Any]:
        session = self.sessions.get(params.session_id)
        if session is None:
            stored = await self.gateway.store.get_agent_session(params.session_id)
            if stored is None:
                raise SessionNotFound
            return {
                "session_id": stored.id,
                "watching": False,
                "status": stored.status,
                "last_seq": stored.last_seq,
            }
        watching = session.state not in TERMINAL_STATES
        if watching:
            session.watchers.add(conn)
        # Every line after last_seq reaches this connection as an event: no await happens between
        # reading last_seq and joining the watchers.
        return {
            "session_id": session.id,
            "watching": watching,
            "status": session.state.value,
            "last_seq": session.history.last_seq,
        }

    async def unwatch(self, conn: Connection, params: SessionWatchParams) -> dict[str, Any]:
        session = self.sessions.get(params.session_id)
        if session is not None:
            session.watchers.discard(conn)
        elif await self.gateway.store.get_agent_session(params.session_id) is None:
            raise SessionNotFound
        return {"session_id": params.session_id, "watching": False}

    def forget_connection(self, conn: Connection) -> None:
        for session in self.sessions.values():
            session.watchers.discard(conn)

    async def shutdown(self) -> None:
        """Stop every agent (whole groups) and wait for all work, so no process or task is left."""
        self._closed = True
        live = [s for s in self.sessions.values() if s.state in (RunState.RUNNING, RunState.STOPPING)]
        await asyncio.gather(*(self._stop(s, by="shutdown") for s in live), return_exceptions=True)
        deadline = time.monotonic() + self.settings.stop_grace + 5.0
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


def install(gateway: Gateway) -> None:
    manager = AgentManager(gateway)
    gateway.agents = manager
    gateway.shutdown_hooks.append(manager.shutdown)
    gateway.disconnect_hooks.append(manager.forget_connection)
    register(gateway.registry, manager)


def register(registry: Registry[Connection], manager: AgentManager) -> None:
    @registry.method("agent/run", scope=Scope.AGENT_RUN, params=AgentRunParams)
    async def agent_run(conn: Connection, params: AgentRunParams) -> dict[str, Any]:
        """Start the configured agent with a prompt; the caller watches the new session."""
        return await manager.run(conn, params)

    @registry.method("agent/stop", scope=Scope.AGENT_RUN, params=AgentStopParams)
    async def agent_stop(conn: Connection, params: AgentStopParams) -> dict[str, Any]:
        """Stop an agent (SIGTERM, then SIGKILL to its process group); answers once it is gone."""
        return await manager.stop(conn, params)

    @registry.method("agent/respond", scope=Scope.AGENT_RUN, params=AgentRespondParams)
    async def agent_respond(conn: Connection, params: AgentRespondParams) -> dict[str, Any]:
        """Write a line to a running agent's stdin."""
        return await manager.respond(conn, params)

    @registry.method("session/list", scope=Scope.SESSIONS_READ, params=SessionListParams)
    async def session_list(conn: Connection, params: SessionListParams) -> dict[str, Any]:
        """Recent agent sessions, newest first."""
        return await manager.list_sessions(params)

    @registry.method("session/get", scope=Scope.SESSIONS_READ, params=SessionGetParams)
    async def session_get(conn: Connection, params: SessionGetParams) -> dict[str, Any]:
        """A session and a page of its output after a sequence number."""
        return await manager.get(params)

    @registry.method("session/watch", scope=Scope.SESSIONS_READ, params=SessionWatchParams)
    async def session_watch(conn: Connection, params: SessionWatchParams) -> dict[str, Any]:
        """Receive a session's output and status events from now on."""
        return await manager.watch(conn, params)

    @registry.method("session/unwatch", scope=Scope.SESSIONS_READ, params=SessionWatchParams)
    async def session_unwatch(conn: Connection, params: SessionWatchParams) -> dict[str, Any]:
        """Stop receiving a session's events."""
        return await manager.unwatch(conn, params)
