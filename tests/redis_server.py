"""Real Redis servers for tests: a private ``redis-server`` process, and the shared fixtures.

:class:`RedisServer` starts ``redis-server`` on a free loopback port with its own temporary
directory and no persistence, waits until it answers, and can be stopped, killed and
restarted on the same port (for tests of what wardgate does while Redis is down).

The fixtures at the bottom are plain pytest fixtures; a conftest makes them available by
importing them (``from tests.redis_server import redis_url, redis_prefix, private_redis``):

* ``redis_url`` (session): the machine's Redis at 127.0.0.1:6379 if it answers, else one
  private server for the whole session;
* ``redis_prefix``: a unique key prefix for one test; every key under it is deleted after
  the test, so tests can share one Redis;
* ``private_redis``: a fresh private server for one test, which the test may stop, kill or
  restart; ``private_redis_factory(password=..., tls=..., extra_args=[...])`` starts more
  (with ``requirepass``, TLS only, or any other ``redis-server`` option).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MACHINE_REDIS = ("127.0.0.1", 6379)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_ping(host: str, port: int, timeout: float = 0.5, *, tls: bool = False) -> bool:
    """Whether a Redis server answers on ``host:port`` (``-NOAUTH`` counts: it is up)."""
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # only asks "is it up?"
                sock = stack.enter_context(context.wrap_socket(sock))
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1: no persistence, its own temporary directory.

    With ``tls``, it speaks only TLS, with a fresh self-signed certificate for 127.0.0.1
    (``ca_file``); ``url`` is then a ``rediss://`` URL that trusts exactly that certificate.
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        port: int | None = None,
        tls: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.password = password
        self.extra_args = list(extra_args)
        self.port = port or 0
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="wardgate-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca_file = self.dir / "cert.pem"
        if tls:
            from wardgate.tls import generate_self_signed

            cert, key = generate_self_signed(["127.0.0.1"])
            self.ca_file.write_bytes(cert)
            (self.dir / "key.pem").write_bytes(key)

    @property
    def url(self) -> str:
        """The URL without credentials (pass the password separately)."""
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart after stop/kill) on the same port; a first start picks a free one."""
        if self.running:
            return self
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            port = self.port or _free_port()
            if self._launch(port, timeout):
                self.port = port
                return self
        raise RuntimeError("redis-server did not start:\n" + self.log())

    def _launch(self, port: int, timeout: float) -> bool:
        cmd: list[str] = [REDIS_SERVER]
        if self.tls:
            cmd += [
                "--port", "0",
                "--tls-port", str(port),
                "--tls-cert-file", str(self.ca_file),
                "--tls-key-file", str(self.dir / "key.pem"),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            cmd += ["--port", str(port)]
        cmd += [
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        cmd += self.extra_args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # most likely the port was taken meanwhile
            if answers_ping("127.0.0.1", port, timeout=0.2, tls=self.tls):
                return True
            time.sleep(0.01)
        self.kill()
        return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """A crash (SIGKILL): clients see their connections reset."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def delete_prefix(url: str, prefix: str, password: str | None = None) -> int:
    """Delete every key under ``prefix`` (test cleanup); returns how many went."""
    import redis

    client = redis.Redis.from_url(url, password=password, socket_timeout=5)
    try:
        deleted = 0
        keys = list(client.scan_iter(match=prefix.replace("*", r"\*") + "*", count=1000))
        for start in range(0, len(keys), 500):
            deleted += int(client.delete(*keys[start : start + 500]))
        return deleted
    finally:
        client.close()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for tests that only need one: the machine's, else a private one for the session."""
    env = os.environ.get("WARDGATE_TEST_REDIS_URL")
    if env:
        yield env
    elif answers_ping(*MACHINE_REDIS):
        yield "redis://{}:{}/0".format(*MACHINE_REDIS)
    else:
        with RedisServer() as server:
            yield server.url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"wgtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    with contextlib.suppress(OSError):
        delete_prefix(redis_url, prefix)


@pytest.fixture
def private_redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (``factory(password=...)``); all are killed after the test."""
    servers: list[RedisServer] = []

    def factory(
        *, password: str | None = None, tls: bool = False, extra_args: Sequence[str] = ()
    ) -> RedisServer:
        server = RedisServer(password=password, tls=tls, extra_args=extra_args).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private server for one test, to stop, kill or restart at will."""
    with RedisServer() as server:
        yield server
