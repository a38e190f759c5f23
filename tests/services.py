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
import uuid
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
    pytest.skip(message)


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
