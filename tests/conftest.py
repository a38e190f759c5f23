"""Shared fixtures: a fresh registry and test switches per test, and the sync/async faces."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from buttress._config import config
from buttress.chaos import _switch as chaos_switch
from buttress.testing import FakeClock, isolated_registry
from services import Cluster


@pytest.fixture(autouse=True)
def _isolation() -> Iterator[None]:
    """Every test gets its own default registry and the global switches reset."""
    saved = (config.testing, config.testing_attempts)
    chaos_saved = (chaos_switch.state, chaos_switch.env)
    with isolated_registry():
        yield
    config.testing, config.testing_attempts = saved
    chaos_switch.state, chaos_switch.env = chaos_saved


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock that jumps forward when something sleeps on it."""
    return FakeClock()


class Face:
    """Runs a behaviour through a policy as a sync or as an async function."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    @property
    def is_async(self) -> bool:
        return self.kind == "async"

    def wrap(self, policy: Any, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """Decorate ``behaviour`` (a plain function) with ``policy`` in this face; the result
        is a plain callable that runs one protected call and returns its result."""
        if self.loop is None:
            return policy(behaviour)  # type: ignore[no-any-return]

        async def coro(*args: Any, **kwargs: Any) -> Any:
            return behaviour(*args, **kwargs)

        protected = policy(coro)
        loop = self.loop
        return lambda *args, **kwargs: loop.run_until_complete(protected(*args, **kwargs))

    def run(self, awaitable_or_fn: Callable[[], Any]) -> Any:
        """Run a zero-argument sync function, or a coroutine function in the async face."""
        if self.loop is None:
            return awaitable_or_fn()
        return self.loop.run_until_complete(awaitable_or_fn())

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    """The same test against the sync face and the async face of a primitive."""
    face = Face(request.param)
    yield face
    face.close()


class Flaky:
    """A behaviour that raises the queued exceptions, then returns ``value``."""

    def __init__(self, *outcomes: BaseException | object, value: object = "ok") -> None:
        self.outcomes = list(outcomes)
        self.value = value
        self.calls = 0
        self.args: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        self.args.append(args)
        if self.outcomes:
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return self.value


@pytest.fixture
def flaky() -> type[Flaky]:
    """The Flaky behaviour class."""
    return Flaky


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a reachable Redis server (skips, or fails on CI, when there is none)."""
    from services import require_redis

    return require_redis()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    from services import import_client, unique

    redis = import_client("redis", "redis", "Redis")

    prefix = unique("buttress-test:")
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The URL of a reachable PostgreSQL server (skips, or fails on CI, when there is none)."""
    from services import require_postgres

    return require_postgres()


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A schema name of this test's own; the schema is dropped afterwards."""
    from services import import_client, unique

    # The session's postgres_url may have been resolved before psycopg went missing
    # (tests/test_services.py does that on purpose): check the client here too.
    psycopg = import_client("psycopg", "postgres", "PostgreSQL")

    schema = unique("buttress_test_")
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real three-node Redis Cluster of the tests' own, started once per session (skips,
    or fails on CI, when redis-server is not installed)."""
    if shutil.which("redis-server") is None:
        reason = "redis-server is not on PATH (needed to start a Redis Cluster)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    own = Cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        own.start()
        yield own
    finally:
        own.stop()
