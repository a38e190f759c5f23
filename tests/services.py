"""Reaching the real Redis and PostgreSQL servers the backend tests run against.

The URLs come from ``BUTTRESS_REDIS_URL`` / ``BUTTRESS_POSTGRES_URL`` and default to the
loopback servers. When a server cannot be reached, or its client library (redis-py,
psycopg) is not installed, the test is skipped with the reason, except when ``CI`` is
set: there a missing service is a failure, not a skip.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("BUTTRESS_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("BUTTRESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _reachable(url: str, default_port: int) -> str | None:
    """None when a TCP connection to the URL's host and port succeeds, else the reason."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in _LOOPBACK:
        return f"{url}: only loopback servers are used by the tests"
    port = parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return None
    except OSError as exc:
        return f"{url} is unreachable ({exc})"


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so a missing service is a failure)")
    pytest.skip(message, allow_module_level=True)  # also from a test module's top level


def import_client(module: str, extra: str, what: str) -> Any:
    """The client library ``module``; skip (or fail on CI) when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        _unavailable(
            f"{what} tests need a client library: the {module} package is not installed "
            f"({exc}); pip install 'buttress[{extra}]'"
        )


def require(url: str, default_port: int, what: str, client: tuple[str, str] | None = None) -> str:
    """Return ``url`` when its client library imports and its server answers; skip (or
    fail on CI) otherwise. ``client`` is ``(module, extra)``, e.g. ``("psycopg", "postgres")``."""
    if client is not None:
        import_client(*client, what)
    reason = _reachable(url, default_port)
    if reason is None:
        return url
    _unavailable(f"{what} tests need a server: {reason}")


def require_redis() -> str:
    return require(REDIS_URL, 6379, "Redis", client=("redis", "redis"))


def require_postgres() -> str:
    return require(POSTGRES_URL, 5432, "PostgreSQL", client=("psycopg", "postgres"))


def unique(prefix: str) -> str:
    """A name no other test (or test run) uses: key prefixes, schema names."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


class Stores:
    """Builds backend stores with one test's key prefix (and any default options, such as
    ``cluster=True``) and closes them afterwards."""

    def __init__(self, url: str, prefix: str, **defaults: Any) -> None:
        self.url = url
        self.prefix = prefix
        self.defaults = defaults
        self.made: list[Any] = []

    def __call__(self, kind: type[Any], **options: Any) -> Any:
        options.setdefault("prefix", self.prefix)
        for name, value in self.defaults.items():
            options.setdefault(name, value)
        store = kind(options.pop("url", self.url), **options)
        self.made.append(store)
        return store

    def close(self) -> None:
        for store in self.made:
            store.close()


# -- a Redis Cluster of the tests' own ---------------------------------------------------

NODES = 3
BUS_OFFSET = 10_000  # a Cluster node also listens on port + 10000 for its peers


def _ports(count: int) -> list[int]:
    """Free loopback ports whose cluster-bus port (+10000) is free as well."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        ports.append(port)
    return ports


class Cluster:
    """Three redis-server nodes on spare loopback ports, every slot assigned."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = _ports(NODES)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        import redis

        for port in self.ports:
            home = self.directory / str(port)
            home.mkdir()
            self.processes.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(home / "nodes.conf"),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(home),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(lambda client: client.ping(), port, "start")
        # Assign every slot (an equal range per node), then introduce the nodes.
        per_node = -(-16384 // NODES)
        for i, port in enumerate(self.ports):
            with redis.Redis(port=port, socket_timeout=5) as node:
                slots = range(i * per_node, min((i + 1) * per_node, 16384))
                node.execute_command("CLUSTER", "ADDSLOTS", *slots)
                if i:
                    node.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        for port in self.ports:
            self._wait(
                lambda client: client.cluster("info")["cluster_state"] == "ok", port, "agree"
            )

    @staticmethod
    def _wait(ready: Any, port: int, what: str) -> None:
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
            try:
                if ready(client):
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.05)
        raise RuntimeError(f"the Redis Cluster node on port {port} did not {what}")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


class BindingStore:
    """A breaker store that binds each breaker to ``binding(breaker)``: a ``LocalBreaker``
    subclass that changes one behaviour (a slow status, a failing settlement) and
    inherits the rest of the state machine."""

    def __init__(self, binding: Any) -> None:
        self.binding = binding

    def bind_breaker(self, breaker: Any) -> Any:
        return self.binding(breaker)
