"""Debounce and throttle: collapsing, shared results, leading/trailing, max_wait."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

from buttress import debounce, throttle
from buttress.testing import FakeClock


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_async_collapses_a_burst_and_every_caller_gets_the_result():
    """Calls within `wait` collapse into one execution with the latest arguments."""
    clock = FakeClock()
    executions = []

    @debounce(1.0, clock=clock)
    async def save(value: int) -> str:
        executions.append(value)
        return f"saved {value}"

    async def main() -> list[str]:
        callers = []
        for value in range(5):
            callers.append(asyncio.ensure_future(save(value)))
            await clock.asleep(0.5)
        await clock.asleep(2)  # let the quiet period pass on the fake clock
        return await asyncio.gather(*callers)

    assert run(main) == ["saved 4"] * 5
    assert executions == [4]


def test_async_callers_share_the_exception():
    """The execution's exception reaches every caller it served."""
    clock = FakeClock()

    @debounce(0.1, clock=clock)
    async def fail() -> None:
        raise ValueError("bad")

    async def main() -> list[object]:
        callers = [asyncio.ensure_future(fail()) for _ in range(2)]
        await clock.asleep(1)
        return await asyncio.gather(*callers, return_exceptions=True)

    results = run(main)
    assert all(isinstance(r, ValueError) for r in results)


def test_max_wait_bounds_starvation():
    """A steady stream of calls still executes at least every max_wait seconds."""
    clock = FakeClock()
    executions = []

    @debounce(1.0, max_wait=3.0, clock=clock)
    async def tick(n: int) -> None:
        executions.append((n, clock.now()))

    async def main() -> None:
        callers = []
        for n in range(20):
            callers.append(asyncio.ensure_future(tick(n)))
            await clock.asleep(0.5)
        await clock.asleep(5)
        await asyncio.gather(*callers)

    run(main)
    times = [t for _, t in executions]
    assert times[0] == pytest.approx(3.0)
    assert all(b - a <= 3.0 + 1e-9 for a, b in pairwise(times))
    assert executions[-1][0] == 19  # the last arguments win in the end


def test_leading_runs_the_first_call_at_once():
    """With leading=True the first call executes immediately and returns its result."""
    clock = FakeClock()
    executions = []

    @debounce(1.0, leading=True, trailing=False, clock=clock)
    async def press(n: int) -> int:
        executions.append(n)
        return n

    async def main() -> list[int]:
        results = [await press(0)]
        results += await asyncio.gather(press(1), press(2))
        return results

    assert run(main) == [0, 0, 0]
    assert executions == [0]


def test_sync_trailing_runs_on_the_timer_and_leading_inline():
    """Sync callers never block: the trailing run happens when the timer fires."""
    clock = FakeClock()
    executions = []

    @debounce(1.0, clock=clock)
    def reload(path: str) -> str:
        executions.append(path)
        return path

    assert reload("a") is None
    assert reload("b") is None
    clock.advance(0.5)
    assert executions == []
    clock.advance(1.0)
    assert executions == ["b"]
    assert reload("c") == "b"  # collapsed calls return the latest finished result


def test_flush_and_cancel():
    """flush() runs the owed execution now; cancel() drops it."""
    clock = FakeClock()
    executions = []
    policy = debounce(5.0, clock=clock)

    @policy
    def save(n: int) -> None:
        executions.append(n)

    save(1)
    policy.flush()
    clock.advance(0)
    assert executions == [1]
    save(2)
    policy.cancel()
    clock.advance(10)
    assert executions == [1]


def test_throttle_runs_at_most_once_per_interval():
    """throttle: leading call at once, one trailing call per interval with the latest args."""
    clock = FakeClock()
    executions = []

    @throttle(1.0, clock=clock)
    async def report(n: int) -> int:
        executions.append((n, clock.now()))
        return n

    async def main() -> list[int]:
        callers = []
        for n in range(10):
            callers.append(asyncio.ensure_future(report(n)))
            await clock.asleep(0.25)
        await clock.asleep(2)
        return await asyncio.gather(*callers)

    results = run(main)
    times = [t for _, t in executions]
    assert times[0] == 0.0
    assert all(b - a >= 1.0 - 1e-9 for a, b in pairwise(times))
    assert results[0] == 0
    assert results[-1] == executions[-1][0] == 9


def test_sync_throttle():
    """Sync throttle: the first call runs inline, the rest collapse to the interval's end."""
    clock = FakeClock()
    executions = []

    @throttle(1.0, clock=clock)
    def ping(n: int) -> int:
        executions.append(n)
        return n

    assert ping(1) == 1
    assert ping(2) == 1
    assert ping(3) == 1
    clock.advance(1.0)
    assert executions == [1, 3]


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (debounce, {"wait": 0}, "wait must be"),
        (debounce, {"wait": 1, "max_wait": 0.5}, "max_wait must be >= wait"),
        (debounce, {"wait": 1, "leading": False, "trailing": False}, "at least one"),
        (throttle, {"interval": -1}, "interval must be"),
        (debounce, {"wait": 1, "leading": "yes"}, "leading must be True or False"),
    ],
)
def test_bad_options(factory, kwargs, message):
    """Bad options are rejected when the policy is built."""
    with pytest.raises((TypeError, ValueError), match=message):
        factory(**kwargs)
