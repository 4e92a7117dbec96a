"""The workspace path resolver, file reading and listing, against a real directory tree.

The hostile corpus is one table: every entry must be refused with :class:`PathRefused`,
and the whole read pipeline (resolve, then read) must return nothing for it. Outside the
workspace and in every deny-listed file sits the marker ``SECRET``; no test may see it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.config import DEFAULT_DENY
from wardgate.errors import FileNotFound, InvalidParams, PathRefused
from wardgate.services.files import (
    deny_matches,
    list_workspace,
    normalize_relative,
    read_workspace_file,
    relative_posix,
    resolve_workspace_path,
)

DENY = list(DEFAULT_DENY)
MARKER = "SECRET"

DENY_LISTED_FILES = [
    ".env",
    ".env.production",
    ".env.local",
    "config/.env.local",
    "server.key",
    "certs/x.pem",
    "deep/dir/key.pem",
    "bundle.p12",
    "store.pfx",
    ".ssh/id_ed25519",
    ".ssh/config",
    ".aws/credentials",
    ".aws/config",
    ".netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
    "id_rsa",
    "id_rsa.pub",
    "keys/id_ecdsa",
    ".docker/config.json",
    "credentials.json",
    "secrets.yaml",
    "app/secrets.toml",
]


def build_workspace(base: Path) -> Path:
    """A workspace full of traps, and secrets beside it."""
    root = base / "ws"
    outside = base / "outside"
    evil_sibling = base / "ws-evil"  # shares the workspace's string prefix: seed 002's trap
    for directory in (root, outside, evil_sibling):
        directory.mkdir()
    (outside / "secret.txt").write_text(MARKER)
    (evil_sibling / "secret.txt").write_text(MARKER)
    (root / "README.md").write_text("# hello\n")
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / "nested" / "inner").mkdir(parents=True)
    (root / "100%.txt").write_text("percent\n")
    for name in DENY_LISTED_FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{MARKER}=1\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text(f"[remote]\n url = https://{MARKER}@example.com\n")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    # Symlinks that stay inside: fine.
    (root / "link_in").symlink_to("README.md")
    (root / "src_link").symlink_to("src")
    # Symlinks that lead out, directly, through a directory, through a parent, in a loop.
    (root / "escape_file").symlink_to(outside / "secret.txt")
    (root / "escape_rel").symlink_to("../outside/secret.txt")
    (root / "escape_dir").symlink_to(outside)
    (root / "etc_link").symlink_to("/etc")
    (root / "passwd_link").symlink_to("/etc/passwd")
    (root / "up").symlink_to("..")
    (root / "root_link").symlink_to("/")
    (root / "evil_prefix").symlink_to(evil_sibling / "secret.txt")
    (root / "nested" / "inner" / "out").symlink_to("../../../outside")
    (root / "nested" / "parent_out").symlink_to(outside)
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    (root / "self_loop").symlink_to("self_loop")
    (root / "dangling_out").symlink_to(outside / "missing.txt")
    # Symlinks inside the workspace to deny-listed files.
    (root / "innocent.txt").symlink_to(".env")
    (root / "notes").symlink_to("certs")
    (root / "gitconfig_link").symlink_to(".git/config")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("files"))


HOSTILE_TEXT: list[Any] = [
    # parent components
    "..",
    "../",
    "../..",
    "../../etc/passwd",
    "../outside/secret.txt",
    "../ws-evil/secret.txt",
    "a/../../b",
    "a/../b",
    "src/../README.md",
    "./../x",
    "src/./../../outside/secret.txt",
    "src/..",
    # absolute, home, UNC, Windows
    "/etc/passwd",
    "/",
    "//etc",
    "///etc/passwd",
    "~/.ssh/id_rsa",
    "~root",
    "~",
    "C:\\Windows",
    "C:/x",
    "c:x",
    "Z:",
    "\\\\server\\share",
    "\\etc\\passwd",
    "a\\..\\b",
    "..\\x",
    "src\\app.py",
    # control characters
    "README.md\x00",
    "\x00",
    "README.md\x00.png",
    "a\nb",
    "README.md\r",
    "\t",
    "a\x7fb",
    "a\x85b",
    "\x1b[31m",
    # encodings that decode to something hostile
    "%2e%2e/outside/secret.txt",
    "%2e%2e%2fetc%2fpasswd",
    "..%2f..%2fetc%2fpasswd",
    "%252e%252e/outside",
    "%2fetc%2fpasswd",
    "%5c..%5cx",
    "README.md%00",
    "\uff0e\uff0e/outside/secret.txt",
    "\uff0e\uff0e\uff0fetc\uff0fpasswd",
    "src/\uff3c..",
    "\ufe52\ufe52/x",
    "\ud800",
    "README\udcff",
    # git internals
    ".git",
    ".git/config",
    ".git/HEAD",
    ".GIT/config",
    "sub/.git/config",
    # too long
    "a" * 5000,
    "a/" * 2100,
    "x" * 300,
    "\u00e9" * 2100,
    # not a string
    None,
    1,
    b"README.md",
    ["README.md"],
]

HOSTILE_SYMLINKS = [
    "escape_file",
    "escape_rel",
    "escape_dir",
    "escape_dir/secret.txt",
    "etc_link",
    "etc_link/passwd",
    "passwd_link",
    "up",
    "up/outside/secret.txt",
    "root_link",
    "root_link/etc/passwd",
    "evil_prefix",
    "nested/inner/out/secret.txt",
    "nested/inner/out",
    "nested/parent_out/secret.txt",
    "src_link/../../outside/secret.txt",
    "loop_a",
    "loop_a/x",
    "self_loop",
    "dangling_out",
    "innocent.txt",
    "notes/x.pem",
    "gitconfig_link",
]

HOSTILE_DENIED = [
    *DENY_LISTED_FILES,
    ".ENV",
    ".Env.Production",
    "CONFIG/.ENV.LOCAL",
    "Server.KEY",
    "certs/X.PEM",
    ".ssh",
    ".aws",
    "certs/missing.pem",
    "config/.env.not-there",
]

CORPUS = [*HOSTILE_TEXT, *HOSTILE_SYMLINKS, *HOSTILE_DENIED]


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("user_path", CORPUS, ids=[repr(c)[:40] for c in CORPUS])
def test_hostile_paths_are_refused_and_nothing_is_read(workspace: Path, user_path: Any) -> None:
    with pytest.raises(PathRefused) as caught:
        resolve_workspace_path(workspace, user_path, deny=DENY)
    error = caught.value.rpc_error()
    assert error["code"] == -32015
    assert error["message"] == "This path is not available."
    assert error["data"] == {"reason": "path_refused"}  # never which rule, never the input

    def read() -> dict[str, Any]:
        resolved = resolve_workspace_path(workspace, user_path, deny=DENY)
        return read_workspace_file(workspace, resolved, max_bytes=1 << 20)

    with pytest.raises(PathRefused):
        read()


@pytest.mark.parametrize(
    ("user_path", "expected"),
    [
        ("README.md", "README.md"),
        ("src/app.py", "src/app.py"),
        ("src//app.py", "src/app.py"),
        ("./src/./app.py", "src/app.py"),
        ("src/", "src"),
        ("", ""),
        (".", ""),
        ("link_in", "README.md"),
        ("src_link/app.py", "src/app.py"),
        ("up/ws/README.md", "README.md"),  # out and back in: the resolved target decides
        ("100%.txt", "100%.txt"),
        ("%41", "%41"),  # a literal name that does not exist: inside, so not refused
        ("%2e%2e", None),
        ("missing/file.txt", "missing/file.txt"),
        ("C", "C"),
        ("ab:c", "ab:c"),
        ("a:b", None),  # drive-relative on Windows
        ("-p", "-p"),
        ("envoy.txt", "envoy.txt"),
        ("mykey.txt", "mykey.txt"),
        ("...", "..."),
        ("..foo", "..foo"),
        (".gitignore", ".gitignore"),
    ],
)
def test_ordinary_paths_resolve_inside(workspace: Path, user_path: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(PathRefused):
            resolve_workspace_path(workspace, user_path, deny=DENY)
        return
    resolved = resolve_workspace_path(workspace, user_path, deny=DENY)
    assert resolved.is_relative_to(workspace.resolve())
    assert relative_posix(workspace, resolved) == expected


def test_the_resolved_root_is_used_even_when_given_through_a_symlink(tmp_path: Path) -> None:
    root = build_workspace(tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    assert resolve_workspace_path(alias, "README.md", deny=DENY) == root.resolve() / "README.md"
    with pytest.raises(PathRefused):
        resolve_workspace_path(alias, "escape_rel", deny=DENY)


def test_max_length_is_a_parameter(workspace: Path) -> None:
    assert resolve_workspace_path(workspace, "a" * 100, deny=DENY, max_length=100)
    with pytest.raises(PathRefused):
        resolve_workspace_path(workspace, "a" * 101, deny=DENY, max_length=100)


def test_normalize_relative_drops_empty_and_dot_components() -> None:
    assert str(normalize_relative("a//b/./c/")) == "a/b/c"
    assert str(normalize_relative("")) == "."


# --- the deny list ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "denied"),
    [
        (".env", True),
        ("sub/.env.local", True),
        (".git/config", True),
        ("vendor/lib/.git/config", True),
        ("deep/dir/key.pem", True),
        ("KEY.PEM", True),
        (".ssh", True),
        (".ssh/known_hosts", True),
        ("home/.aws/credentials", True),
        ("credentials/readme.md", True),
        (".env/inside.txt", True),
        ("environment.md", False),
        ("src/env.py", False),
        ("docs/keys.md", False),
        ("pem.txt", False),
        ("config/settings.json", False),
        (".gitignore", False),
        ("git/config", False),
    ],
)
def test_default_deny_list(path: str, denied: bool) -> None:
    assert deny_matches(path.split("/"), DENY) is denied


def test_deny_patterns_anchored_and_double_star() -> None:
    assert deny_matches(["build", "out.log"], ["/build"])
    assert not deny_matches(["src", "build", "out.log"], ["/build"])
    assert deny_matches(["a", "b", "c", "private", "x"], ["a/**/private"])
    assert not deny_matches(["b", "private"], ["a/**/private"])
    assert not deny_matches(["anything"], ["", "/"])


def test_a_custom_deny_list_replaces_the_default(workspace: Path) -> None:
    assert resolve_workspace_path(workspace, ".env", deny=[])
    with pytest.raises(PathRefused):
        resolve_workspace_path(workspace, "README.md", deny=["*.md"])
    with pytest.raises(PathRefused):
        resolve_workspace_path(workspace, "link_in", deny=["readme.*"])  # the target is checked too


# --- property: inside or refused -------------------------------------------------------------------

SEGMENTS = st.sampled_from(
    ["a", "b", "src", ".", "..", "", "up", "escape_dir", "src_link", "link_in", "nested", "inner", "out"]
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(SEGMENTS, max_size=8), st.booleans())
def test_property_inside_or_refused(workspace: Path, segments: list[str], leading_slash: bool) -> None:
    text = ("/" if leading_slash else "") + "/".join(segments)
    try:
        resolved = resolve_workspace_path(workspace, text, deny=DENY)
    except PathRefused:
        return
    assert resolved.is_relative_to(workspace.resolve())
    assert resolved.resolve() == resolved


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_property_any_text_is_inside_or_refused(workspace: Path, text: str) -> None:
    try:
        resolved = resolve_workspace_path(workspace, text, deny=DENY)
    except PathRefused:
        return
    assert resolved.is_relative_to(workspace.resolve())


# --- reading ---------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "outside.txt").write_text(MARKER)
    return root


def read(root: Path, path: str, **kw: Any) -> dict[str, Any]:
    resolved = resolve_workspace_path(root, path, deny=DENY)
    return read_workspace_file(root, resolved, max_bytes=kw.pop("max_bytes", 1 << 20), **kw)


def test_read_text(files: Path) -> None:
    (files / "a.txt").write_text("héllo\n")
    result = read(files, "a.txt")
    assert result == {
        "path": "a.txt",
        "size": 7,
        "binary": False,
        "encoding": "utf-8",
        "offset": 0,
        "length": 7,
        "content": "héllo\n",
        "truncated": False,
    }


def test_read_window_never_splits_a_character(files: Path) -> None:
    (files / "a.txt").write_text("aé" * 10)  # 3 bytes per pair
    first = read(files, "a.txt", limit=5)  # a é a + first byte of é
    assert first["content"] == "aéa"
    assert first["truncated"] is True
    assert first["nextOffset"] == 4
    second = read(files, "a.txt", offset=first["nextOffset"], limit=3)
    assert second["content"] == "éa"
    middle = read(files, "a.txt", offset=2, limit=4)  # starts inside é
    assert middle["offset"] == 3
    assert middle["content"].startswith("a")


def test_read_is_capped_by_max_bytes(files: Path) -> None:
    (files / "big.txt").write_text("x" * 1000)
    result = read(files, "big.txt", limit=5000, max_bytes=100)
    assert len(result["content"]) == 100
    assert result["truncated"] is True
    assert result["size"] == 1000
    assert read(files, "big.txt", offset=5000)["content"] == ""


@pytest.mark.parametrize("data", [b"\x00\x01\x02", b"text\x00more", b"\xff\xfe invalid", b"ok \xc3\x28"])
def test_binary_files_have_no_content(files: Path, data: bytes) -> None:
    (files / "blob.bin").write_bytes(data)
    result = read(files, "blob.bin")
    assert result == {"path": "blob.bin", "size": len(data), "binary": True, "content": None}


def test_nul_after_the_sniff_window_still_counts_as_binary(files: Path) -> None:
    (files / "late.txt").write_bytes(b"a" * 10000 + b"\x00")
    assert read(files, "late.txt")["binary"] is True


def test_missing_file_directory_and_fifo(files: Path) -> None:
    with pytest.raises(FileNotFound):
        read(files, "missing.txt")
    (files / "a.txt").write_text("x")
    with pytest.raises(FileNotFound):
        read(files, "a.txt/below")
    (files / "dir").mkdir()
    with pytest.raises(PathRefused):
        read(files, "dir")
    with pytest.raises(PathRefused):
        read(files, "")
    os.mkfifo(files / "pipe")
    with pytest.raises(PathRefused):  # and does not block waiting for a writer
        read(files, "pipe")


NOBODY: Final = 65534


def read_as(uid: int, root: Path, path: str) -> int:
    """``read`` in a child process running as ``uid``: 0 if refused (PathRefused), 1 if it
    read the file, 2 if it failed otherwise."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                read(root, path)
                code = 1
            except PathRefused:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_unreadable_file_is_refused() -> None:
    # Its own directory under /tmp, open to everyone but the file: root reads everything, so as
    # root the read runs as an unprivileged user.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        path = root / "locked.txt"
        path.write_text("x")
        path.chmod(0)
        (root / "open.txt").write_text("y")
        if os.geteuid() == 0:
            assert read_as(NOBODY, root, "open.txt") == 1  # the user can reach the directory
            assert read_as(NOBODY, root, "locked.txt") == 0
        else:
            with pytest.raises(PathRefused):
                read(root, "locked.txt")


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_followed(files: Path, tmp_path: Path) -> None:
    target = files / "a.txt"
    target.write_text("fine")
    resolved = resolve_workspace_path(files, "a.txt", deny=DENY)
    target.unlink()
    target.symlink_to(tmp_path / "outside.txt")
    with pytest.raises(PathRefused):
        read_workspace_file(files, resolved, max_bytes=1 << 20)


def test_a_parent_swapped_for_a_symlink_after_the_check_is_not_followed(files: Path, tmp_path: Path) -> None:
    (files / "sub").mkdir()
    (files / "sub" / "outside.txt").write_text("fine")
    resolved = resolve_workspace_path(files, "sub/outside.txt", deny=DENY)
    (files / "sub" / "outside.txt").unlink()
    (files / "sub").rmdir()
    (files / "sub").symlink_to(tmp_path)
    with pytest.raises(PathRefused):
        read_workspace_file(files, resolved, max_bytes=1 << 20)


# --- listing ---------------------------------------------------------------------------------------


def listing(root: Path, path: str = "", depth: int = 2, max_entries: int = 1000) -> dict[str, Any]:
    resolved = resolve_workspace_path(root, path, deny=DENY)
    return list_workspace(root, resolved, deny=DENY, depth=depth, max_entries=max_entries)


def test_listing_hides_git_deny_listed_and_escaping_entries(workspace: Path) -> None:
    result = listing(workspace, depth=10)
    paths = {entry["path"]: entry for entry in result["entries"]}
    assert result["truncated"] is False
    assert paths["README.md"] == {"path": "README.md", "type": "file", "size": 8}
    assert paths["src"]["type"] == "dir"
    assert paths["src/app.py"]["type"] == "file"
    assert paths["link_in"]["type"] == "symlink"
    assert paths["src_link"]["type"] == "symlink"
    assert "src_link/app.py" not in paths  # symlinks are never descended
    for hidden in [
        *DENY_LISTED_FILES,
        ".git",
        ".git/config",
        ".ssh",
        ".aws",
        "certs/x.pem",
        *HOSTILE_SYMLINKS,
    ]:
        assert hidden not in paths, hidden
    assert [e["path"] for e in result["entries"]] == sorted(paths)


def test_listing_depth_and_subdirectory(workspace: Path) -> None:
    top = {e["path"] for e in listing(workspace, depth=1)["entries"]}
    assert "src" in top
    assert "src/app.py" not in top
    sub = listing(workspace, "nested", depth=1)
    assert sub["path"] == "nested"
    assert [e["path"] for e in sub["entries"]] == ["nested/inner"]


def test_listing_is_capped(workspace: Path) -> None:
    result = listing(workspace, depth=10, max_entries=3)
    assert len(result["entries"]) == 3
    assert result["truncated"] is True


def test_listing_a_file_or_a_missing_directory(workspace: Path) -> None:
    with pytest.raises(InvalidParams):
        listing(workspace, "README.md")
    with pytest.raises(FileNotFound):
        listing(workspace, "missing")


@pytest.mark.parametrize("user_path", ["escape_dir", "up", "etc_link", "../outside", ".ssh", ".git"])
def test_listing_refuses_hostile_directories(workspace: Path, user_path: str) -> None:
    with pytest.raises(PathRefused):
        listing(workspace, user_path)
