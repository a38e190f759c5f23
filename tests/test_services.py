"""The service fixtures: skip with a reason outside CI, fail under CI, never error."""

from __future__ import annotations

import sys

import pytest

import services


@pytest.fixture
def without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import psycopg` fail as it does when the package is not installed."""
    monkeypatch.setitem(sys.modules, "psycopg", None)


def test_missing_psycopg_skips_postgres_tests_with_a_reason(without_psycopg, monkeypatch):
    """Outside CI, no psycopg means a skip naming the package and the extra."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"psycopg package is not installed"):
        services.require_postgres()
    with pytest.raises(pytest.skip.Exception, match=r"buttress\[postgres\]"):
        services.require_postgres()


def test_missing_psycopg_fails_postgres_tests_under_ci(without_psycopg, monkeypatch):
    """Under CI a missing client library is a failure, not a skip."""
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        services.require_postgres()


def test_postgres_schema_fixture_skips_instead_of_erroring(postgres_url, monkeypatch, request):
    """The fixture the PostgreSQL tests use skips (it used to raise ImportError)."""
    # postgres_url is session-scoped: resolve it with psycopg present, so that its skip
    # is not cached for the whole session; then take psycopg away.
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(pytest.skip.Exception, match="psycopg package is not installed"):
        request.getfixturevalue("postgres_schema")


def test_an_unreachable_server_still_skips_with_its_reason(monkeypatch):
    """A closed port is reported as unreachable (outside CI)."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="unreachable"):
        services.require("postgresql://u@127.0.0.1:1/db", 5432, "PostgreSQL")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="unreachable"):
        services.require("postgresql://u@127.0.0.1:1/db", 5432, "PostgreSQL")
