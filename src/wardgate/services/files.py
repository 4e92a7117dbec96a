"""``file/get`` and ``repository/files/list``: read the workspace, and nothing else.

Every path a client names goes through :func:`resolve_workspace_path`, a pure decision
over the text and the filesystem as it is, in this order (the first failure refuses):

1. the text: a ``str``, at most ``max_length`` characters, no control characters or lone
   surrogates, no backslash, no Windows drive letter (``C:``), no leading ``/`` or ``~``,
   no ``..`` component, no ``.git`` component, no component longer than 255 characters.
   The same checks run on the text's NFKC form and its percent-decoded form, so that
   fullwidth dots (U+FF0E) or ``%2e%2e`` cannot become ``..`` further down some other road;
2. the deny list (``workspace.deny``) against the normalized relative path;
3. the filesystem: the path is joined onto the (resolved) workspace root and resolved
   with ``Path.resolve``; the result must be inside the root (``is_relative_to``, never a
   string prefix: seed 002's ``startsWith`` check accepts ``/work/root-evil``), which
   refuses ``..`` hidden behind symlinks, symlinks (and symlinked parents) pointing out,
   and symlink loops;
4. the deny list again, against the resolved relative path (a symlink ``notes`` to
   ``.env`` is refused).

Every refusal is the same :class:`PathRefused` with the same message: a client never learns
which rule refused, and the input is never echoed back.

Opening closes the window between the check and the use: the resolved path is opened
one component at a time from a descriptor of the root (``openat`` with ``O_NOFOLLOW``, and
``O_DIRECTORY`` for the parents), so a path swapped for a symlink after the check fails
instead of leading out. Only regular files are read (``fstat``); FIFOs and devices are
refused without blocking (``O_NONBLOCK``).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import errno
import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import unquote

import msgspec

from wardgate.errors import FileNotFound, InvalidParams, PathRefused
from wardgate.roles import Scope
from wardgate.rpc.registry import Registry

if TYPE_CHECKING:
    from wardgate.server.app import Gateway
    from wardgate.server.ws import Connection

MAX_PATH_LENGTH: Final = 4096
"""Longest path accepted, in characters (and in UTF-8 bytes)."""
MAX_COMPONENT_LENGTH: Final = 255
BINARY_SNIFF_BYTES: Final = 8192
"""A NUL byte in this many first bytes of a file makes it binary (as git and grep decide)."""
DEFAULT_LIST_DEPTH: Final = 2
MAX_LIST_DEPTH: Final = 10
GIT_DIR_NAME: Final = ".git"

_DRIVE: Final = re.compile(r"^[A-Za-z]:")
_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\\]")
_PERCENT_DECODE_ROUNDS: Final = 3


# --- the decision (pure) -------------------------------------------------------------------------


def _check_text(text: str) -> None:
    if _FORBIDDEN_CHARS.search(text) or _DRIVE.match(text) or text.startswith(("/", "~")):
        raise PathRefused
    for part in text.split("/"):
        if part == ".." or part.lower() == GIT_DIR_NAME or len(part) > MAX_COMPONENT_LENGTH:
            raise PathRefused


def _text_forms(text: str) -> set[str]:
    """The text, its NFKC form and its percent-decoded forms: each must pass the checks."""
    forms = {text}
    decoded = text
    for _ in range(_PERCENT_DECODE_ROUNDS):
        if "%" not in decoded:
            break
        decoded = unquote(decoded, errors="replace")
        forms.add(decoded)
    forms |= {unicodedata.normalize("NFKC", form) for form in forms}
    return forms


def normalize_relative(user_path: object, *, max_length: int = MAX_PATH_LENGTH) -> PurePosixPath:
    """The workspace-relative path a client named, or :class:`PathRefused` (no filesystem access).

    ``""`` and ``"."`` name the root (``PurePosixPath(".")``); empty and ``.`` components
    are dropped (``a//b/./c`` is ``a/b/c``).
    """
    if not isinstance(user_path, str):
        raise PathRefused
    if len(user_path) > max_length or len(user_path.encode("utf-8", "surrogatepass")) > max_length:
        raise PathRefused
    for form in _text_forms(user_path):
        _check_text(form)
    return PurePosixPath(*(part for part in user_path.split("/") if part not in ("", ".")))


def _match_from(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether ``pattern`` matches the first components of ``parts`` (``**``: any number)."""
    if not pattern:
        return True
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_from(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match_from(parts[1:], rest)


def deny_matches(parts: Sequence[str], deny: Sequence[str]) -> bool:
    """Whether a workspace-relative path (as components) is deny-listed.

    Case-insensitive. A pattern without ``/`` (``.env*``, ``*.pem``) matches a component
    anywhere; a pattern with ``/`` (``.git/config``, ``.ssh/*``) matches consecutive
    components anywhere, or only from the root when it starts with ``/``. A match on a
    directory covers everything under it, and ``dir/*`` also covers ``dir`` itself.
    """
    lowered = [part.lower() for part in parts]
    for raw in deny:
        anchored = raw.startswith("/")
        pattern = [piece for piece in raw.lower().strip("/").split("/") if piece]
        if not pattern:
            continue
        variants = [pattern]
        if len(pattern) > 1 and pattern[-1] in ("*", "**"):
            variants.append(pattern[:-1])
        starts = range(1) if anchored else range(len(lowered))
        for variant in variants:
            if any(_match_from(lowered[start:], variant) for start in starts):
                return True
    return False


def resolve_workspace_path(
    root: Path, user_path: str, *, deny: Sequence[str], max_length: int = MAX_PATH_LENGTH
) -> Path:
    """The absolute, resolved path ``user_path`` names inside ``root``, or :class:`PathRefused`.

    The target need not exist (a deleted file can still be diffed); symlinks on the way
    are followed, and the result must still be inside ``root`` and not deny-listed.
    """
    relative = normalize_relative(user_path, max_length=max_length)
    if deny_matches(relative.parts, deny):
        raise PathRefused
    try:
        base = root.resolve(strict=True)
        resolved = base.joinpath(*relative.parts).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # symlink loops are RuntimeError in 3.11, OSError later
        raise PathRefused from None
    if not resolved.is_relative_to(base):
        raise PathRefused
    inside = resolved.relative_to(base).parts
    if deny_matches(inside, deny) or any(part.lower() == GIT_DIR_NAME for part in inside):
        raise PathRefused
    return resolved


def relative_posix(root: Path, resolved: Path) -> str:
    """``resolved`` relative to ``root`` as a POSIX string (``""`` for the root itself)."""
    relative = resolved.relative_to(root.resolve()).as_posix()
    return "" if relative == "." else relative


# --- opening without following anything ---------------------------------------------------------

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _open_under(root: Path, parts: Sequence[str], final_flags: int) -> int:
    """Open ``root/parts...`` one component at a time, following no symlink.

    ``OSError`` as the system raised it (``ELOOP`` when a component is now a symlink).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            flags = final_flags if index == len(parts) - 1 else _DIR_FLAGS
            try:
                child = os.open(part, flags, dir_fd=fd)
            except NotADirectoryError:
                # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: report it as the symlink it is.
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "symbolic link") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal_for(exc: OSError) -> Exception:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return FileNotFound()
    return PathRefused()


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = os.pread(fd, remaining, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _skip_continuation_bytes(data: bytes) -> int:
    """How many UTF-8 continuation bytes start ``data`` (an offset in mid-character), at most 3."""
    count = 0
    while count < min(3, len(data)) and data[count] & 0xC0 == 0x80:
        count += 1
    return count


def read_workspace_file(
    root: Path, resolved: Path, *, offset: int = 0, limit: int | None = None, max_bytes: int
) -> dict[str, Any]:
    """Read a resolved workspace file: text (a UTF-8 window of at most ``max_bytes``) or binary.

    ``path`` in the result is relative to the workspace. ``offset`` and the window are in
    bytes; a window never splits a character (``offset`` moves past a partial one and
    ``nextOffset`` says where the next window starts).
    """
    base = root.resolve()
    parts = resolved.relative_to(base).parts
    if not parts:
        raise PathRefused
    try:
        fd = _open_under(base, parts, _FILE_FLAGS)
    except OSError as exc:
        raise _refusal_for(exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused
        size = info.st_size
        path = "/".join(parts)
        if b"\0" in _pread_all(fd, BINARY_SNIFF_BYTES, 0):
            return {"path": path, "size": size, "binary": True, "content": None}
        window = max_bytes if limit is None else min(limit, max_bytes)
        data = _pread_all(fd, window + 1, offset)
    finally:
        os.close(fd)
    truncated = len(data) > window
    data = data[:window]
    start = _skip_continuation_bytes(data) if offset > 0 else 0
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        content = decoder.decode(data[start:], final=not truncated)
    except UnicodeDecodeError:
        return {"path": path, "size": size, "binary": True, "content": None}
    if "\0" in content:
        return {"path": path, "size": size, "binary": True, "content": None}
    pending = len(decoder.getstate()[0])
    length = len(data) - start - pending
    result: dict[str, Any] = {
        "path": path,
        "size": size,
        "binary": False,
        "encoding": "utf-8",
        "offset": offset + start,
        "length": length,
        "content": content,
        "truncated": truncated,
    }
    if truncated:
        result["nextOffset"] = offset + start + length
    return result


def _listable(name: str) -> bool:
    try:
        normalize_relative(name)
    except PathRefused:
        return False
    return name not in (".", "..")


def list_workspace(
    root: Path, resolved: Path, *, deny: Sequence[str], depth: int, max_entries: int
) -> dict[str, Any]:
    """Entries under a resolved workspace directory, breadth first, up to ``depth`` levels.

    Symlinks are listed (never followed) only when they resolve inside the workspace to
    something not deny-listed; ``.git`` and deny-listed names are left out entirely, as are
    names ``file/get`` would refuse and special files. Each directory is opened from the
    root without following symlinks, so a directory swapped for a symlink is skipped.
    """
    base = root.resolve()
    start = resolved.relative_to(base).parts
    try:
        fd = _open_under(base, start, _DIR_FLAGS) if start else os.open(base, _DIR_FLAGS)
    except OSError as exc:
        if isinstance(exc, NotADirectoryError):
            raise InvalidParams(hint="path is not a directory") from None
        raise _refusal_for(exc) from None
    os.close(fd)
    entries: list[dict[str, Any]] = []
    truncated = False
    queue: collections.deque[tuple[tuple[str, ...], int]] = collections.deque([(start, 1)])
    while queue and not truncated:
        parts, level = queue.popleft()
        try:
            fd = _open_under(base, parts, _DIR_FLAGS) if parts else os.open(base, _DIR_FLAGS)
        except OSError:
            continue
        try:
            with os.scandir(fd) as scan:
                found = sorted(scan, key=lambda entry: entry.name)
            for entry in found:
                item = _entry(base, parts, entry, deny)
                if item is None:
                    continue
                if len(entries) >= max_entries:
                    truncated = True
                    break
                entries.append(item)
                if item["type"] == "dir" and level < depth:
                    queue.append(((*parts, entry.name), level + 1))
        except OSError:
            continue
        finally:
            os.close(fd)
    entries.sort(key=lambda item: item["path"])
    return {"path": "/".join(start), "entries": entries, "truncated": truncated}


def _entry(base: Path, parts: tuple[str, ...], entry: os.DirEntry[str], deny: Sequence[str]) -> Any:
    name = entry.name
    if not _listable(name):
        return None
    child = (*parts, name)
    if deny_matches(child, deny):
        return None
    path = "/".join(child)
    if entry.is_symlink():
        try:
            resolve_workspace_path(base, path, deny=deny)
        except PathRefused:
            return None
        return {"path": path, "type": "symlink", "size": None}
    if entry.is_dir(follow_symlinks=False):
        return {"path": path, "type": "dir", "size": None}
    if entry.is_file(follow_symlinks=False):
        return {"path": path, "type": "file", "size": entry.stat(follow_symlinks=False).st_size}
    return None


# --- the methods -------------------------------------------------------------------------------


class FileGetParams(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    """Workspace-relative path, ``/``-separated."""
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    """First byte to read."""
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Most bytes to read; capped at ``workspace.max_file_bytes``."""


class FilesListParams(msgspec.Struct, forbid_unknown_fields=True):
    path: str = ""
    """Workspace-relative directory; the root when omitted."""
    depth: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIST_DEPTH)] = DEFAULT_LIST_DEPTH
    """Levels to descend (1 = the directory's own entries)."""


def install(gateway: Gateway) -> None:
    register(gateway.registry)


def _refused(conn: Connection, method: str) -> None:
    conn.gateway.audit("path.refused", method=method, device=conn.device_id, conn=conn.id)


def register(registry: Registry[Connection]) -> None:
    @registry.method("file/get", scope=Scope.FILES_READ, params=FileGetParams)
    async def file_get(conn: Connection, params: FileGetParams) -> dict[str, Any]:
        """Read a workspace file: a UTF-8 text window, or ``binary: true`` and no content."""
        gateway = conn.gateway
        settings = gateway.config.workspace
        try:
            resolved = resolve_workspace_path(gateway.workspace, params.path, deny=settings.deny)
            result = await asyncio.to_thread(
                read_workspace_file,
                gateway.workspace,
                resolved,
                offset=params.offset,
                limit=params.limit,
                max_bytes=settings.max_file_bytes,
            )
        except PathRefused:
            _refused(conn, "file/get")
            raise
        gateway.audit(
            "file.read",
            device=conn.device_id,
            conn=conn.id,
            path=result["path"],
            size=result["size"],
            bytes=result.get("length", 0),
        )
        return result

    @registry.method("repository/files/list", scope=Scope.FILES_READ, params=FilesListParams)
    async def files_list(conn: Connection, params: FilesListParams) -> dict[str, Any]:
        """List workspace entries (path, type, size) under a directory, up to a depth."""
        gateway = conn.gateway
        settings = gateway.config.workspace
        try:
            resolved = resolve_workspace_path(gateway.workspace, params.path, deny=settings.deny)
        except PathRefused:
            _refused(conn, "repository/files/list")
            raise
        return await asyncio.to_thread(
            list_workspace,
            gateway.workspace,
            resolved,
            deny=settings.deny,
            depth=params.depth,
            max_entries=settings.max_list_entries,
        )
