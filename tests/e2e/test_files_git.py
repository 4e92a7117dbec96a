"""Files, git, status and device administration through a real daemon and real sockets.

The workspace is a real git repository with deny-listed files and symlinks leading out of
it (to a secret beside it, to the daemon's own data directory, to ``/etc``). Every hostile
path sent over the socket must come back as -32015 with nothing of the target in the reply.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, DaemonFactory, store_url_for
from tests.e2e.helpers import Rpc, exchange

MARKER = "SECRET-e2e-marker"
IDENTITY = ("-c", "user.name=E2E", "-c", "user.email=e2e@example.com", "-c", "commit.gpgsign=false")


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", *IDENTITY, "-C", str(repo), *args], check=True, capture_output=True, env=env)


def populate(ws: Path, home: Path) -> None:
    outside = ws.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(MARKER)
    git(ws, "init", "-q", "-b", "main")
    (ws / "README.md").write_text("# Project\n")
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('v1')\n")
    (ws / ".env").write_text(f"TOKEN={MARKER}\n")
    (ws / "certs").mkdir()
    (ws / "certs" / "server.pem").write_text(MARKER)
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "initial import")
    (ws / "src" / "app.py").write_text("print('v2')\n")
    git(ws, "commit", "-q", "-am", "bump to v2")
    (ws / "README.md").write_text("# Project\n\nmore\n")
    (ws / ".env").write_text(f"TOKEN={MARKER}-rotated\n")
    (ws / "certs" / "server.pem").write_text(MARKER + "-rotated")
    (ws / "escape").symlink_to(outside)
    (ws / "secret_link").symlink_to(outside / "secret.txt")
    (ws / "wardgate_home").symlink_to(home)
    (ws / "passwd").symlink_to("/etc/passwd")
    (ws / "up").symlink_to("..")
    (ws / "innocent.txt").symlink_to(".env")
    (ws / "readme_link").symlink_to("README.md")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    factory = DaemonFactory(tmp_path_factory.mktemp("files-git"), store_url_for(request))
    d = factory(start=False)
    populate(d.workspace, d.home)
    yield d.start()
    factory.stop_all()


async def connect(d: Daemon, role: str) -> tuple[Rpc, dict[str, Any]]:
    creds = await exchange(d, d.pairing_token(role), name=f"{role} device")
    rpc = await Rpc.open(d, creds["sessionToken"])
    response = await rpc.initialize()
    assert "result" in response, response
    return rpc, creds


def result_of(response: dict[str, Any]) -> Any:
    assert "error" not in response, response
    return response["result"]


async def test_a_viewer_reads_files_and_git(daemon: Daemon) -> None:
    rpc, _ = await connect(daemon, "viewer")
    try:
        readme = result_of(await rpc.call("file/get", {"path": "README.md"}))
        assert readme["content"] == "# Project\n\nmore\n"
        assert readme["binary"] is False
        assert result_of(await rpc.call("file/get", {"path": "readme_link"}))["content"] == readme["content"]
        window = result_of(await rpc.call("file/get", ["src/app.py", 0, 5]))
        assert (window["content"], window["truncated"], window["nextOffset"]) == ("print", True, 5)

        listing = result_of(await rpc.call("repository/files/list", {"depth": 3}))
        paths = {entry["path"]: entry["type"] for entry in listing["entries"]}
        assert paths["README.md"] == "file"
        assert paths["src"] == "dir"
        assert paths["src/app.py"] == "file"
        assert paths["readme_link"] == "symlink"
        for hidden in (".git", ".env", "certs/server.pem", "escape", "secret_link", "wardgate_home", "up"):
            assert hidden not in paths

        status = result_of(await rpc.call("git/status"))
        assert status["branch"] == "main"
        tracked = [f for f in status["files"] if f["index"] != "?"]
        assert tracked == [{"path": "README.md", "index": " ", "worktree": "M"}]
        untracked = {f["path"] for f in status["files"] if f["index"] == "?"}
        assert ".env" not in untracked  # deny-listed names are left out (the symlinks are only names)
        assert "readme_link" in untracked

        diff = result_of(await rpc.call("git/diff"))
        assert "+more" in diff["diff"]
        assert diff["truncated"] is False
        assert result_of(await rpc.call("git/diff", {"staged": True}))["diff"] == ""
        assert result_of(await rpc.call("git/diff", {"path": "src"}))["diff"] == ""

        log = result_of(await rpc.call("git/log", {"limit": 10}))
        assert [c["subject"] for c in log] == ["bump to v2", "initial import"]
        assert result_of(await rpc.call("git/log", {"limit": 1}))[0]["author"] == "E2E"

        everything = json.dumps([readme, listing, status, diff, log])
        assert MARKER not in everything
        assert str(daemon.workspace) not in everything
    finally:
        await rpc.close()


async def test_status_get_reports_git_agent_and_clients(daemon: Daemon) -> None:
    rpc, creds = await connect(daemon, "viewer")
    other, _ = await connect(daemon, "viewer")
    try:
        status = result_of(await rpc.call("status/get"))
        assert status["git"] == {"branch": "main", "dirty": True}
        assert status["agent"]["state"] in ("idle", "running")
        assert status["clients"] >= 2
        assert status["workspace"] == daemon.workspace.name
        assert status["you"]["deviceId"] == creds["deviceId"]
        assert status["you"]["role"] == "viewer"
        assert str(daemon.workspace) not in json.dumps(status)
    finally:
        await other.close()
        await rpc.close()


HOSTILE_OVER_THE_SOCKET = [
    "..",
    "../outside/secret.txt",
    "../../../../../../etc/passwd",
    "src/../../outside/secret.txt",
    "/etc/passwd",
    "//etc/passwd",
    "~/.ssh/id_rsa",
    "~root/.bashrc",
    "C:\\Windows\\win.ini",
    "C:/Windows/win.ini",
    "\\\\server\\share\\x",
    "src\\..\\..\\x",
    "README.md\x00.png",
    "\x00",
    "a\nb",
    "%2e%2e/outside/secret.txt",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "\uff0e\uff0e/outside/secret.txt",
    "a" * 5000,
    ".git/config",
    ".git/HEAD",
    ".env",
    ".ENV",
    "certs/server.pem",
    "innocent.txt",
    "escape/secret.txt",
    "escape",
    "secret_link",
    "wardgate_home/config.yaml",
    "wardgate_home/wardgate.db",
    "passwd",
    "up/outside/secret.txt",
    "up",
]


async def test_traversal_attempts_are_refused_with_no_content(daemon: Daemon) -> None:
    assert len(HOSTILE_OVER_THE_SOCKET) >= 30
    rpc, _ = await connect(daemon, "viewer")
    try:
        for path in HOSTILE_OVER_THE_SOCKET:
            for method, params in (
                ("file/get", {"path": path}),
                ("repository/files/list", {"path": path}),
                ("git/diff", {"path": path}),
            ):
                response = await rpc.call(method, params)
                assert "result" not in response, (method, path)
                assert response["error"]["code"] == -32015, (method, path, response)
                assert response["error"]["data"] == {"reason": "path_refused"}
                text = json.dumps(response)
                assert MARKER not in text
                assert "root:" not in text
                if len(path) > 3:
                    assert path not in response["error"]["message"]
        # The connection is still healthy after all that.
        assert result_of(await rpc.call("file/get", {"path": "README.md"}))["content"].startswith("# Project")
    finally:
        await rpc.close()
    assert MARKER not in daemon.logs()


async def test_invalid_params_are_refused_before_any_path_work(daemon: Daemon) -> None:
    rpc, _ = await connect(daemon, "viewer")
    try:
        for method, params in (
            ("file/get", {}),
            ("file/get", {"path": 1}),
            ("file/get", {"path": "README.md", "offset": -1}),
            ("file/get", {"path": "README.md", "follow": True}),
            ("repository/files/list", {"depth": 11}),
            ("git/log", {"limit": 0}),
            ("git/log", {"limit": 201}),
            ("git/diff", {"staged": "yes"}),
            ("git/status", {"args": ["--output=/tmp/x"]}),
        ):
            response = await rpc.call(method, params)
            assert response["error"]["code"] == -32602, (method, params, response)
    finally:
        await rpc.close()


async def test_only_an_admin_can_revoke_devices(daemon: Daemon) -> None:
    viewer, viewer_creds = await connect(daemon, "viewer")
    operator, operator_creds = await connect(daemon, "operator")
    admin, admin_creds = await connect(daemon, "admin")
    try:
        for rpc in (viewer, operator):
            for method, params in (
                ("devices/list", None),
                ("devices/revoke", {"device_id": admin_creds["deviceId"]}),
            ):
                response = await rpc.call(method, params)
                assert response["error"]["code"] == -32004, (method, response)
        # The operator may still do what operators do.
        assert "result" in await operator.call("git/status")

        devices = result_of(await admin.call("devices/list"))
        by_id = {device["id"]: device for device in devices}
        assert by_id[operator_creds["deviceId"]]["role"] == "operator"
        assert by_id[operator_creds["deviceId"]]["connections"] == 1
        assert by_id[admin_creds["deviceId"]]["current"] is True
        text = json.dumps(devices)
        for secret in (*viewer_creds.values(), *operator_creds.values(), *admin_creds.values()):
            if isinstance(secret, str) and secret.startswith(("wgs_", "wgr_")):
                assert secret not in text

        revoked = result_of(await admin.call("devices/revoke", {"device_id": operator_creds["deviceId"]}))
        assert revoked == {"deviceId": operator_creds["deviceId"], "revoked": True}
        code, _ = await operator.closed()
        assert code == 4401
        assert any(n.get("method") == "auth/revoked" for n in operator.notifications)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await Rpc.open(daemon, operator_creds["sessionToken"])

        devices = result_of(await admin.call("devices/list"))
        assert {d["id"]: d for d in devices}[operator_creds["deviceId"]]["revoked"] is True
        assert "result" in await viewer.call("status/get")  # others are untouched
        unknown = result_of(await admin.call("devices/revoke", {"device_id": "dev_nope"}))
        assert unknown["revoked"] is False
    finally:
        for rpc in (viewer, operator, admin):
            await rpc.close()


async def test_discover_publishes_the_methods_with_params(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as http, http.get(daemon.http + "/api/rpc/discover") as response:
        assert response.status == 200
        document = await response.json()
    methods = {method["name"]: method for method in document["methods"]}
    expected = {
        "file/get": ("files:read", {"path", "offset", "limit"}),
        "repository/files/list": ("files:read", {"path", "depth"}),
        "git/status": ("git:read", set()),
        "git/diff": ("git:read", {"path", "staged"}),
        "git/log": ("git:read", {"limit"}),
        "status/get": ("status:read", set()),
        "devices/list": ("devices:admin", set()),
        "devices/revoke": ("devices:admin", {"device_id"}),
    }
    for name, (scope, params) in expected.items():
        assert methods[name]["x-scope"] == scope
        assert {param["name"] for param in methods[name]["params"]} == params
        assert methods[name]["summary"]
    file_get = {param["name"]: param for param in methods["file/get"]["params"]}
    assert file_get["path"]["required"] is True
    assert file_get["offset"]["required"] is False
