"""``git/status``, ``git/diff`` and ``git/log``: git's view of the workspace, read-only.

git runs without a shell, with an argument list fixed here. The only client input that
reaches it is an integer (``limit``), a boolean (``staged``) and a path that passed
:func:`~wardgate.services.files.resolve_workspace_path`, given after ``--`` with the
``:(literal)`` pathspec magic, so ``-p``, ``--output=/tmp/x`` or ``:(glob)*`` are file names
and nothing else. Deny-listed files are excluded with ``:(exclude,glob,icase)`` pathspecs
built from ``workspace.deny``, and the diff is filtered again section by section, so a
whole-tree diff never shows their content.

The environment is built, not inherited: no system config (``GIT_CONFIG_NOSYSTEM``), no
prompts, no optional locks, no pager, ``LC_ALL=C``, and ``GIT_CEILING_DIRECTORIES`` set to
the workspace's parent so that a workspace inside a larger repository does not expose the
rest of it (the workspace must be the top of its repository). git's stderr is read only to
tell "not a git repository" apart; it never reaches a client (it can name paths outside).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec

from wardgate.errors import GitFailed, PathRefused
from wardgate.roles import Scope
from wardgate.rpc.registry import NoParams, Registry
from wardgate.services.files import deny_matches, normalize_relative, resolve_workspace_path

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection

GIT_TIMEOUT: Final = 15.0
"""Seconds a git command may run before it is killed."""
SUMMARY_TIMEOUT: Final = 5.0
"""Seconds ``status/get`` waits for git before it reports ``git: null``."""
MAX_CONCURRENT_GIT: Final = 4
"""git processes the ``git/*`` methods run at once; more requests wait their turn."""
MAX_GIT_OUTPUT: Final = 8 * 1024 * 1024
"""Bytes of git output read for status and log; the rest is dropped (``truncated: true``)."""
MAX_GIT_STDERR: Final = 4096
DEFAULT_LOG_LIMIT: Final = 20
MAX_LOG_LIMIT: Final = 200

NOT_A_REPOSITORY: Final = "the workspace is not a git repository"
_READ_CHUNK: Final = 64 * 1024

# Configuration pinned on every invocation: nothing in the repository's or the user's config
# may start a program (fsmonitor, external diff, textconv) or change the output format.
_GIT_OPTIONS: Final = (
    "--no-pager",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.quotepath=off",
    "-c",
    "color.ui=never",
    "-c",
    "diff.noprefix=false",
    "-c",
    "diff.mnemonicPrefix=false",
    "-c",
    "log.showSignature=false",
)


def git_environment(root: Path) -> dict[str, str]:
    """The whole environment git runs with (nothing else is inherited)."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LC_ALL": "C",
        "LANG": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_PAGER": "cat",
        "PAGER": "cat",
        "GIT_CEILING_DIRECTORIES": str(root.parent),
    }
    home = os.environ.get("HOME")
    if home:
        env["HOME"] = home  # the user's global config (safe.directory, identity)
    return env


@dataclass(frozen=True, slots=True)
class GitOutput:
    stdout: bytes
    truncated: bool
    returncode: int
    stderr: bytes


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
    buffer = bytearray()
    while True:
        chunk = await stream.read(_READ_CHUNK)
        if not chunk:
            return bytes(buffer), False
        buffer += chunk
        if len(buffer) > cap:
            return bytes(buffer[:cap]), True


async def _drain_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Keep at most ``cap`` bytes but read to the end, so git never blocks on a full pipe."""
    kept = bytearray()
    while chunk := await stream.read(_READ_CHUNK):
        kept += chunk[: max(0, cap - len(kept))]
    return bytes(kept)


async def run_git(
    root: Path, args: Sequence[str], *, max_output: int = MAX_GIT_OUTPUT, timeout: float = GIT_TIMEOUT
) -> GitOutput:
    """Run ``git -C root <args>`` and collect at most ``max_output`` bytes of its stdout.

    Raises :class:`GitFailed` when git is missing or too slow; a non-zero exit is returned
    (the caller knows which ones it expects). Output beyond the cap stops git.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *_GIT_OPTIONS,
            "-C",
            str(root),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=git_environment(root),
            cwd=root,
            start_new_session=True,  # its own process group: a kill reaches anything it started
        )
    except FileNotFoundError:
        raise GitFailed(hint="git is not installed on the server") from None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(timeout):
            stderr_task = asyncio.ensure_future(_drain_capped(proc.stderr, MAX_GIT_STDERR))
            try:
                stdout, truncated = await _read_capped(proc.stdout, max_output)
                if truncated:
                    _kill(proc)
                returncode = await proc.wait()
                stderr = await stderr_task
            finally:
                stderr_task.cancel()
    except TimeoutError:
        raise GitFailed(hint="git did not finish in time") from None
    finally:
        if proc.returncode is None:
            _kill(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    return GitOutput(stdout, truncated, 0 if truncated else returncode, stderr)


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _failure(output: GitOutput) -> GitFailed:
    if b"not a git repository" in output.stderr.lower():
        return GitFailed(hint=NOT_A_REPOSITORY)
    return GitFailed(hint="git exited with an error", exitCode=output.returncode)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --- pathspecs ---------------------------------------------------------------------------------


def exclusion_pathspecs(deny: Sequence[str]) -> list[str]:
    """git pathspecs that leave out what ``workspace.deny`` matches, at any depth, any case."""
    specs: list[str] = []
    for raw in deny:
        pattern = raw.strip().strip("/")
        if not pattern:
            continue
        base = pattern if raw.strip().startswith("/") else "**/" + pattern
        specs += [f":(exclude,glob,icase){base}", f":(exclude,glob,icase){base}/**"]
    return specs


def diff_pathspec_path(root: Path, user_path: str, *, deny: Sequence[str]) -> str | None:
    """The workspace-relative path git should diff for ``user_path`` (None: the whole tree).

    The path must pass the resolver. Its parent directories are given resolved (git will
    not look through a symlinked directory) and its last component as named, so a
    symlink inside the workspace diffs as the link git tracks.
    """
    resolve_workspace_path(root, user_path, deny=deny)
    relative = normalize_relative(user_path)
    if not relative.parts:
        return None
    parent = resolve_workspace_path(root, str(relative.parent), deny=deny)
    return "/".join((*parent.relative_to(root.resolve()).parts, relative.name))


def literal_pathspec(relative: str) -> str:
    """A pathspec naming exactly one workspace path: no option, no glob, no magic."""
    return ":(literal)" + relative


# --- git/status --------------------------------------------------------------------------------

_TRACKING: Final = re.compile(r"\[(?P<info>[^\]]*)\]$")


def parse_branch_header(header: str) -> dict[str, Any]:
    """The ``## ...`` line of ``git status -b --porcelain``: branch, upstream, ahead, behind."""
    text = header[3:] if header.startswith("## ") else header
    out: dict[str, Any] = {"branch": None, "detached": False}
    for prefix in ("No commits yet on ", "Initial commit on "):
        if text.startswith(prefix):
            out["branch"] = text[len(prefix) :]
            return out
    if text.startswith("HEAD (no branch)"):
        out["detached"] = True
        return out
    tracking = _TRACKING.search(text)
    if tracking is not None:
        text = text[: tracking.start()].rstrip()
    local, _, upstream = text.partition("...")
    out["branch"] = local
    if upstream:
        out["upstream"] = upstream
        out["ahead"] = 0
        out["behind"] = 0
        info = tracking.group("info") if tracking is not None else ""
        for item in info.split(","):
            word, _, number = item.strip().partition(" ")
            if word in ("ahead", "behind") and number.isdigit():
                out[word] = int(number)
            elif word == "gone":
                out["upstreamGone"] = True
    return out


def parse_status(output: bytes, deny: Sequence[str]) -> dict[str, Any]:
    """Parse ``git status --porcelain=v1 -b -z``; deny-listed paths are dropped."""
    records = _text(output).split("\0")
    result: dict[str, Any] = {"branch": None, "detached": False}
    files: list[dict[str, str]] = []
    index = 0
    while index < len(records):
        record = records[index]
        index += 1
        if not record:
            continue
        if record.startswith("## "):
            result.update(parse_branch_header(record))
            continue
        if len(record) < 4:
            continue
        x, y, path = record[0], record[1], record[3:]
        entry = {"path": path, "index": x, "worktree": y}
        if x in "RC" or y in "RC":  # renames and copies carry the original path next
            if index < len(records):
                entry["origPath"] = records[index]
            index += 1
        names = [entry["path"], entry.get("origPath", "")]
        if any(name and deny_matches(name.rstrip("/").split("/"), deny) for name in names):
            continue
        files.append(entry)
    result["files"] = files
    return result


async def git_status(root: Path, deny: Sequence[str], *, timeout: float = GIT_TIMEOUT) -> dict[str, Any]:
    args = ["status", "--porcelain=v1", "-b", "-z", "--no-renames", "--untracked-files=normal"]
    output = await run_git(root, [*args, "--", *exclusion_pathspecs(deny)], timeout=timeout)
    if output.returncode != 0:
        raise _failure(output)
    result = parse_status(output.stdout, deny)
    result["truncated"] = output.truncated
    return result


async def git_summary(root: Path, deny: Sequence[str]) -> dict[str, Any] | None:
    """``{branch, dirty}`` for ``status/get``, or None when git cannot say (not a repository)."""
    try:
        status = await git_status(root, deny, timeout=SUMMARY_TIMEOUT)
    except GitFailed:
        return None
    return {"branch": status["branch"], "dirty": bool(status["files"])}


# --- git/diff ----------------------------------------------------------------------------------

_OCTAL: Final = re.compile(rb"\\([0-7]{3}|.)")
_ESCAPES: Final = {b"n": b"\n", b"t": b"\t", b'"': b'"', b"\\": b"\\", b"a": b"\a", b"b": b"\b"}


def _unquote_c(text: str) -> str:
    """git's C-style quoting of unusual paths (``"a\\tb"``) undone."""
    if not (len(text) >= 2 and text.startswith('"') and text.endswith('"')):
        return text

    def unescape(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if len(code) == 3:
            return bytes([int(code, 8) & 0xFF])
        return _ESCAPES.get(code, code)

    return _OCTAL.sub(unescape, text[1:-1].encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


def _header_paths(header: str) -> list[str]:
    """Every path a diff section's header names (``diff --git``, ``---``, ``+++``)."""
    paths: list[str] = []
    for line in header.split("\n"):
        if line.startswith(("--- ", "+++ ")):
            name = _unquote_c(line[4:].rstrip("\t"))
            if name != "/dev/null":
                paths.append(name[2:] if name.startswith(("a/", "b/")) else name)
        elif line.startswith("diff --git "):
            rest = line[len("diff --git ") :]
            if rest.startswith('"'):
                paths.extend(_unquote_c(q)[2:] for q in re.findall(r'"(?:[^"\\]|\\.)*"', rest))
            elif rest.startswith("a/") and len(rest) >= 5:
                paths.append(rest[2 : 2 + (len(rest) - 5) // 2])
    return paths


def filter_diff(diff: str, deny: Sequence[str]) -> str:
    """Drop every section of a unified diff whose header names a deny-listed path."""
    sections = re.split(r"(?m)^(?=diff --git )", diff)
    kept = []
    for section in sections:
        header = section.split("\n@@", 1)[0]
        if any(deny_matches(path.split("/"), deny) for path in _header_paths(header)):
            continue
        kept.append(section)
    return "".join(kept)


async def git_diff(
    root: Path, deny: Sequence[str], *, relative: str | None, staged: bool, max_bytes: int
) -> dict[str, Any]:
    args = ["diff", "--no-ext-diff", "--no-textconv", "--no-color", "--no-renames"]
    args += ["--src-prefix=a/", "--dst-prefix=b/"]
    if staged:
        args.append("--cached")
    pathspecs = [literal_pathspec(relative)] if relative else []
    output = await run_git(root, [*args, "--", *pathspecs, *exclusion_pathspecs(deny)], max_output=max_bytes)
    if output.returncode != 0:
        raise _failure(output)
    return {"diff": filter_diff(_text(output.stdout), deny), "truncated": output.truncated}


# --- git/log -----------------------------------------------------------------------------------

_LOG_FORMAT: Final = "--format=%H%x00%an%x00%aI%x00%s%x1e"


def parse_log(output: bytes) -> list[dict[str, str]]:
    commits = []
    for record in _text(output).split("\x1e"):
        fields = record.strip("\n").split("\0")
        if len(fields) == 4:
            commit, author, date, subject = fields
            commits.append({"commit": commit, "author": author, "date": date, "subject": subject})
    return commits


async def git_log(root: Path, *, limit: int) -> list[dict[str, str]]:
    output = await run_git(root, ["log", f"--max-count={limit}", "--no-color", _LOG_FORMAT])
    if output.returncode != 0:
        if b"does not have any commits" in output.stderr:
            return []
        raise _failure(output)
    return parse_log(output.stdout)


# --- the methods -------------------------------------------------------------------------------


class GitDiffParams(msgspec.Struct, forbid_unknown_fields=True):
    path: str | None = None
    """Workspace-relative file or directory to limit the diff to; the whole tree when omitted."""
    staged: bool = False
    """Diff the index against HEAD (``--cached``) instead of the worktree against the index."""


class GitLogParams(msgspec.Struct, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LOG_LIMIT)] = DEFAULT_LOG_LIMIT
    """Most recent commits to return."""


def install(gateway: Gateway) -> None:
    register(gateway.registry)


def register(registry: Registry[Connection]) -> None:
    turns = asyncio.Semaphore(MAX_CONCURRENT_GIT)

    @registry.method("git/status", scope=Scope.GIT_READ)
    async def status(conn: Connection, params: NoParams) -> dict[str, Any]:
        """Branch, upstream, ahead/behind and changed files (porcelain status letters)."""
        gateway = conn.gateway
        async with turns:
            return await git_status(gateway.workspace, gateway.config.workspace.deny)

    @registry.method("git/diff", scope=Scope.GIT_READ, params=GitDiffParams)
    async def diff(conn: Connection, params: GitDiffParams) -> dict[str, Any]:
        """Unified diff of the worktree (or the index, with staged), optionally for one path."""
        gateway = conn.gateway
        settings = gateway.config.workspace
        relative: str | None = None
        if params.path is not None:
            try:
                relative = diff_pathspec_path(gateway.workspace, params.path, deny=settings.deny)
            except PathRefused:
                gateway.audit("path.refused", method="git/diff", device=conn.device_id, conn=conn.id)
                raise
        async with turns:
            return await git_diff(
                gateway.workspace,
                settings.deny,
                relative=relative,
                staged=params.staged,
                max_bytes=settings.max_file_bytes,
            )

    @registry.method("git/log", scope=Scope.GIT_READ, params=GitLogParams)
    async def log(conn: Connection, params: GitLogParams) -> list[dict[str, str]]:
        """The most recent commits of HEAD: hash, author name, ISO date, subject."""
        async with turns:
            return await git_log(conn.gateway.workspace, limit=params.limit)
