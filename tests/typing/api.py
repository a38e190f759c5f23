"""Type-checked (mypy --strict), not run: decorators keep the signatures they wrap."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import buttress
from buttress import CircuitBreaker, RateLimiter, fallback, pipeline, retry, timeout


@retry(3)
def parse(text: str, *, strict: bool = False) -> int:
    return len(text)


@CircuitBreaker()
async def fetch(url: str) -> bytes:
    return url.encode()


@pipeline(timeout(1), retry(2), RateLimiter(rate=5))
async def guarded(n: int) -> list[int]:
    return [n]


@fallback(0)
def risky() -> int:
    return 1


assert_type(parse("x", strict=True), int)
assert_type(risky(), int)
assert_type(buttress.remaining(), float | None)
assert_type(buttress.health(), dict[str, Any])


@buttress.debounce(0.5)
def reload(path: str) -> str:
    return path


assert_type(reload("p"), str | None)


@buttress.debounce(0.5)
async def save(value: int) -> str:
    return str(value)


async def awaits() -> None:
    assert_type(await fetch("u"), bytes)
    assert_type(await guarded(1), list[int])
    assert_type(await save(1), str)
    async for attempt in retry(2).attempts():
        with attempt:
            assert_type(attempt.number, int)


def loop_form() -> None:
    for attempt in retry(3).attempts():
        with attempt:
            assert_type(attempt.number, int)
