"""git services against real repositories made with ``git init`` in temporary directories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from wardgate.config import DEFAULT_DENY
from wardgate.errors import GitFailed, PathRefused
from wardgate.services.git import (
    NOT_A_REPOSITORY,
    diff_pathspec_path,
    exclusion_pathspecs,
    filter_diff,
    git_diff,
    git_log,
    git_status,
    git_summary,
    parse_branch_header,
    parse_log,
    parse_status,
    run_git,
)

DENY = list(DEFAULT_DENY)
MARKER = "SECRET"
IDENTITY = ("-c", "user.name=Test Author", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
    result = subprocess.run(
        ["git", *IDENTITY, "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return result.stdout


def make_repo(path: Path, branch: str = "main") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = make_repo(tmp_path / "repo")
    (root / "README.md").write_text("hello\n")
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("print('one')\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first commit")
    (root / "src" / "app.py").write_text("print('two')\n")
    git(root, "commit", "-q", "-am", "second: ünïcode subject")
    return root


# --- status --------------------------------------------------------------------------------------


async def test_status_of_a_clean_then_dirty_repository(repo: Path) -> None:
    clean = await git_status(repo, DENY)
    assert clean == {"branch": "main", "detached": False, "files": [], "truncated": False}
    (repo / "README.md").write_text("changed\n")
    (repo / "new file.txt").write_text("new\n")
    (repo / "src" / "app.py").write_text("print('three')\n")
    git(repo, "add", "src/app.py")
    status = await git_status(repo, DENY)
    assert status["files"] == [
        {"path": "README.md", "index": " ", "worktree": "M"},
        {"path": "src/app.py", "index": "M", "worktree": " "},
        {"path": "new file.txt", "index": "?", "worktree": "?"},
    ]
    assert await git_summary(repo, DENY) == {"branch": "main", "dirty": True}


async def test_status_ahead_and_behind_an_upstream(repo: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    (clone / "c.txt").write_text("c\n")
    git(clone, "add", "c.txt")
    git(clone, "commit", "-q", "-m", "ahead")
    status = await git_status(clone, DENY)
    assert status["branch"] == "main"
    assert status["upstream"] == "origin/main"
    assert (status["ahead"], status["behind"]) == (1, 0)


async def test_status_of_an_empty_repository_and_a_detached_head(tmp_path: Path, repo: Path) -> None:
    empty = make_repo(tmp_path / "empty", branch="trunk")
    assert (await git_status(empty, DENY))["branch"] == "trunk"
    assert await git_log(empty, limit=5) == []
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    status = await git_status(repo, DENY)
    assert status["branch"] is None
    assert status["detached"] is True


async def test_deny_listed_files_are_not_in_status(repo: Path) -> None:
    (repo / ".env").write_text(f"{MARKER}=1\n")
    (repo / "config").mkdir()
    (repo / "config" / ".env.local").write_text(f"{MARKER}=1\n")
    (repo / "config" / "app.yaml").write_text("a: 1\n")
    (repo / "Server.KEY").write_text(MARKER)
    git(repo, "add", "-A")
    paths = [f["path"] for f in (await git_status(repo, DENY))["files"]]
    assert paths == ["config/app.yaml"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("## main", {"branch": "main", "detached": False}),
        (
            "## main...origin/main [ahead 1, behind 2]",
            {"branch": "main", "detached": False, "upstream": "origin/main", "ahead": 1, "behind": 2},
        ),
        (
            "## feat/x...origin/feat/x [behind 3]",
            {"branch": "feat/x", "detached": False, "upstream": "origin/feat/x", "ahead": 0, "behind": 3},
        ),
        (
            "## main...origin/main [gone]",
            {
                "branch": "main",
                "detached": False,
                "upstream": "origin/main",
                "ahead": 0,
                "behind": 0,
                "upstreamGone": True,
            },
        ),
        ("## No commits yet on dev", {"branch": "dev", "detached": False}),
        ("## HEAD (no branch)", {"branch": None, "detached": True}),
    ],
)
def test_parse_branch_header(header: str, expected: dict[str, object]) -> None:
    assert parse_branch_header(header) == expected


def test_parse_status_handles_renames_and_drops_denied_names() -> None:
    output = b"## main\0R  new.txt\0old.txt\0 M a b.txt\0?? .env\0R  public.txt\0.env.prod\0"
    files = parse_status(output, DENY)["files"]
    assert files == [
        {"path": "new.txt", "index": "R", "worktree": " ", "origPath": "old.txt"},
        {"path": "a b.txt", "index": " ", "worktree": "M"},
    ]


# --- diff ----------------------------------------------------------------------------------------


async def test_diff_of_worktree_and_index(repo: Path) -> None:
    (repo / "README.md").write_text("hello\nworld\n")
    (repo / "src" / "app.py").write_text("print('staged')\n")
    git(repo, "add", "src/app.py")
    worktree = await git_diff(repo, DENY, relative=None, staged=False, max_bytes=1 << 20)
    assert "+world" in worktree["diff"]
    assert "staged" not in worktree["diff"]
    assert worktree["truncated"] is False
    staged = await git_diff(repo, DENY, relative=None, staged=True, max_bytes=1 << 20)
    assert "+print('staged')" in staged["diff"]
    assert "world" not in staged["diff"]
    one = await git_diff(repo, DENY, relative="src", staged=True, max_bytes=1 << 20)
    assert one["diff"] == staged["diff"]
    none = await git_diff(repo, DENY, relative="README.md", staged=True, max_bytes=1 << 20)
    assert none["diff"] == ""


async def test_diff_is_capped(repo: Path) -> None:
    (repo / "README.md").write_text("line\n" * 10000)
    result = await git_diff(repo, DENY, relative=None, staged=False, max_bytes=1000)
    assert result["truncated"] is True
    assert len(result["diff"]) <= 1000


async def test_option_shaped_paths_are_paths_and_create_nothing(repo: Path, tmp_path: Path) -> None:
    (repo / "-p").write_text("dash p\n")
    (repo / "*").write_text("star\n")
    git(repo, "add", "--", "-p", "*")
    git(repo, "commit", "-q", "-m", "odd names")
    (repo / "-p").write_text("dash p changed\n")
    (repo / "README.md").write_text("changed too\n")
    target = tmp_path / "created-by-git.txt"
    for hostile in [f"--output={target}", "--output=x", "-p", "--no-index", "--ext-diff", "*", ":(glob)*"]:
        relative = diff_pathspec_path(repo, hostile, deny=DENY)
        assert relative is not None
        result = await git_diff(repo, DENY, relative=relative, staged=False, max_bytes=1 << 20)
        if hostile == "-p":
            assert "+dash p changed" in result["diff"]
            assert "README.md" not in result["diff"]
        else:
            assert result["diff"] == "", hostile  # "*" names the file "*", which is unchanged
    assert not target.exists()
    assert not (repo / "x").exists()


async def test_whole_tree_diff_never_shows_deny_listed_content(repo: Path) -> None:
    denied = [
        ".env",
        "config/.env.local",
        "certs/Server.PEM",
        ".aws/credentials",
        "deploy/id_rsa",
        "secrets.yaml",
    ]
    for name in denied:
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{MARKER}=old\nshared line\n")
    (repo / "config" / "app.yaml").write_text("a: 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "secrets committed by mistake")
    for name in denied:
        (repo / name).write_text(f"{MARKER}=new\nshared line\n")
    (repo / "config" / "app.yaml").write_text("a: 2\n")
    (repo / "public.txt").write_text("shared line\n")  # a rename target for .env, if renames were on
    git(repo, "rm", "-q", "--cached", ".env")
    git(repo, "add", "public.txt")
    for staged in (False, True):
        result = await git_diff(repo, DENY, relative=None, staged=staged, max_bytes=1 << 20)
        assert MARKER not in result["diff"]
        for name in denied:
            assert name not in result["diff"]
    worktree = await git_diff(repo, DENY, relative="config", staged=False, max_bytes=1 << 20)
    assert "+a: 2" in worktree["diff"]
    assert MARKER not in worktree["diff"]
    with pytest.raises(PathRefused):
        diff_pathspec_path(repo, ".env", deny=DENY)
    with pytest.raises(PathRefused):
        diff_pathspec_path(repo, "config/.ENV.local", deny=DENY)


async def test_diff_of_a_deleted_file_and_through_a_symlinked_directory(repo: Path) -> None:
    (repo / "src" / "app.py").unlink()
    (repo / "src_link").symlink_to("src")
    assert diff_pathspec_path(repo, "src_link/app.py", deny=DENY) == "src/app.py"
    assert diff_pathspec_path(repo, "", deny=DENY) is None
    result = await git_diff(repo, DENY, relative="src/app.py", staged=False, max_bytes=1 << 20)
    assert "deleted file mode" in result["diff"]


@pytest.mark.parametrize("hostile", ["../x", "/etc/passwd", "a\\b", "a\x00", ".git/config", "escape/x"])
def test_diff_paths_go_through_the_resolver(repo: Path, tmp_path: Path, hostile: str) -> None:
    (repo / "escape").symlink_to(tmp_path)
    with pytest.raises(PathRefused):
        diff_pathspec_path(repo, hostile, deny=DENY)


def test_exclusion_pathspecs() -> None:
    assert exclusion_pathspecs([".env", "/build", "", "  "]) == [
        ":(exclude,glob,icase)**/.env",
        ":(exclude,glob,icase)**/.env/**",
        ":(exclude,glob,icase)build",
        ":(exclude,glob,icase)build/**",
    ]


def test_filter_diff_drops_denied_sections_including_quoted_names() -> None:
    diff = (
        "diff --git a/ok.txt b/ok.txt\n--- a/ok.txt\n+++ b/ok.txt\n@@ -1 +1 @@\n-a\n+b\n"
        'diff --git "a/x\\t.env" "b/x\\t.env"\n--- "a/x\\t.env"\n+++ "b/x\\t.env"\n@@ -1 +1 @@\n-s\n+t\n'
        'diff --git "a/\\303\\251/.env" "b/\\303\\251/.env"\n'
        '--- "a/\\303\\251/.env"\n+++ /dev/null\n@@ -1 +0,0 @@\n-u\n'
        "diff --git a/sub/.env b/sub/.env\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/sub/.env\n@@ -0,0 +1 @@\n+v\n"
        "diff --git a/k.pem b/k.pem\nindex 1..2 100644\nBinary files a/k.pem and b/k.pem differ\n"
    )
    filtered = filter_diff(diff, [".env", "x\t.env", "*.pem"])
    assert filtered == "diff --git a/ok.txt b/ok.txt\n--- a/ok.txt\n+++ b/ok.txt\n@@ -1 +1 @@\n-a\n+b\n"


# --- log -----------------------------------------------------------------------------------------


async def test_log(repo: Path) -> None:
    commits = await git_log(repo, limit=20)
    assert [c["subject"] for c in commits] == ["second: ünïcode subject", "first commit"]
    assert commits[0]["author"] == "Test Author"
    assert len(commits[0]["commit"]) == 40
    assert commits[0]["date"][:2] == "20"
    assert len(await git_log(repo, limit=1)) == 1


def test_parse_log_ignores_partial_records() -> None:
    output = b"a" * 40 + b"\0A\0" + b"2024-01-01T00:00:00+00:00\0subject\x1e\n" + b"b" * 40 + b"\0cut"
    assert parse_log(output) == [
        {"commit": "a" * 40, "author": "A", "date": "2024-01-01T00:00:00+00:00", "subject": "subject"}
    ]


# --- failures ------------------------------------------------------------------------------------


async def test_not_a_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitFailed) as caught:
        await git_status(plain, DENY)
    assert caught.value.hint == NOT_A_REPOSITORY
    assert str(tmp_path) not in str(caught.value.rpc_error())
    with pytest.raises(GitFailed):
        await git_log(plain, limit=1)
    assert await git_summary(plain, DENY) is None


async def test_a_workspace_inside_a_larger_repository_does_not_see_the_rest(repo: Path) -> None:
    (repo / "README.md").write_text("outside the workspace\n")
    with pytest.raises(GitFailed) as caught:
        await git_status(repo / "src", DENY)
    assert caught.value.hint == NOT_A_REPOSITORY


async def test_git_is_stopped_after_the_timeout_and_the_output_cap(repo: Path) -> None:
    with pytest.raises(GitFailed) as caught:
        await run_git(repo, ["-c", "alias.slow=!sleep 30", "slow"], timeout=0.3)
    assert caught.value.hint == "git did not finish in time"
    output = await run_git(repo, ["log", "--format=%H"], max_output=10)
    assert output.truncated is True
    assert len(output.stdout) == 10
