"""Type-checked (mypy --strict), not run: decorated generator functions keep their types."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator

from typing_extensions import assert_type

from buttress import Bulkhead, CircuitBreaker, pipeline, retry, timeout


@retry(3, on=ConnectionError)
def lines(path: str) -> Generator[str, None, int]:
    yield path
    return 1


@pipeline(timeout(5), CircuitBreaker(), Bulkhead(max_concurrent=4))
async def events(topic: str, *, since: int = 0) -> AsyncIterator[bytes]:
    yield topic.encode()


assert_type(lines("x"), Generator[str, None, int])
assert_type(events("t", since=3), AsyncIterator[bytes])
