"""Store fixtures: ``store`` runs a test once per backend (SQLite file, Redis with its own prefix).

The Redis fixtures themselves live in ``tests/redis_server.py`` so that any conftest can
import them; see its docstring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.redis_server import (  # noqa: F401  (fixtures, used by name)
    private_redis,
    private_redis_factory,
    redis_prefix,
    redis_url,
)
from wardgate.store.base import Store
from wardgate.store.redis import RedisStore
from wardgate.store.sqlite import SqliteStore

BACKENDS = ["sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """An open, empty store of each backend."""
    s: Store
    if backend == "sqlite":
        s = SqliteStore(tmp_path / "wardgate.db")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix"))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStore]:  # noqa: F811
    s = RedisStore(redis_url, prefix=redis_prefix)
    await s.open()
    yield s
    await s.close()
