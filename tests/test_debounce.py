"""Debounce and throttle: collapsing, shared results, leading/trailing, max_wait."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

import buttress
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


# -- debounce and throttle are policies like the others ------------------------------------------


def test_named_debounce_and_throttle_appear_in_state():
    """name= registers them; state() groups them under their own kinds."""
    from buttress.testing import isolated_registry

    with isolated_registry():
        clock = FakeClock()
        saver = debounce(0.5, max_wait=2, name="autosave", clock=clock)
        refresher = throttle(1.0, name="dashboard", clock=clock)

        @saver
        def save(text: str) -> str:
            return text

        @refresher
        def refresh() -> str:
            return "fresh"

        save("a")
        save("ab")
        assert refresh() == "fresh"
        state = buttress.state()
        assert state["debounce"]["autosave"] == {
            "kind": "debounce",
            "name": "autosave",
            "wait": 0.5,
            "max_wait": 2.0,
            "leading": False,
            "trailing": True,
            "calls": 2,
            "executions": 0,
            "pending": 1,
        }
        assert state["throttle"]["dashboard"] == {
            "kind": "throttle",
            "name": "dashboard",
            "interval": 1.0,
            "leading": True,
            "trailing": True,
            "calls": 1,
            "executions": 1,
            "pending": 0,
        }
        clock.advance(1)
        assert saver.snapshot()["executions"] == 1
        assert saver.snapshot()["pending"] == 0
        assert buttress.health()["status"] == "pass"


def test_names_are_unique_per_kind_and_registry_is_honoured():
    """A second live debounce of one name is refused; registry= keeps a separate set."""
    from buttress.testing import isolated_registry

    with isolated_registry():
        kept = debounce(1, name="n")
        with pytest.raises(buttress.DuplicateNameError):
            debounce(1, name="n")
        throttle(1, name="n")  # another kind may share the name
        other = buttress.Registry()
        separate = debounce(1, name="n", registry=other)
        assert other.get("debounce", "n") is separate
        assert buttress.default_registry().get("debounce", "n") is kept


def test_debounce_and_throttle_are_policies_with_the_common_options():
    """They subclass Policy, expose clock, and validate listeners= and registry=."""
    from buttress._policy import Policy

    clock = FakeClock()
    policy = throttle(2, clock=clock)
    assert isinstance(policy, Policy)
    assert isinstance(policy, buttress.Throttle)
    assert isinstance(policy, buttress.Debounce)
    assert policy.clock is clock
    assert policy.interval == 2.0
    with pytest.raises(TypeError, match="listeners must be a list"):
        debounce(1, listeners=print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"registry must be a buttress\.Registry"):
        throttle(1, registry={})  # type: ignore[arg-type]


def test_debounce_takes_timedelta():
    """Durations may be given as timedelta, like everywhere else."""
    from datetime import timedelta

    policy = debounce(timedelta(milliseconds=250), max_wait=timedelta(seconds=1))
    assert (policy.wait, policy.max_wait) == (0.25, 1.0)
    assert throttle(timedelta(seconds=3)).interval == 3.0


def test_debounce_inside_a_pipeline_sync():
    """pipeline(debounce, retry): bursts collapse first, the execution is retried."""
    clock = FakeClock()
    calls: list[str] = []

    @buttress.pipeline(debounce(0.5, clock=clock), buttress.retry(3, backoff=[0.0], clock=clock))
    def push(value: str) -> str:
        calls.append(value)
        if len(calls) == 1:
            raise ConnectionError("flaky")
        return value

    for value in "abc":
        assert push(value) is None  # nothing has finished yet
    clock.advance(0.5)
    assert calls == ["c", "c"]  # one collapsed execution, retried once
    assert push.__name__ == "push"


def test_throttle_inside_a_pipeline_async():
    """pipeline(throttle, timeout) on a coroutine function: one run per interval."""
    clock = FakeClock()
    runs: list[int] = []

    @buttress.pipeline(throttle(1.0, clock=clock), buttress.timeout(5, clock=clock))
    async def poll(n: int) -> int:
        runs.append(n)
        return n

    async def main() -> list[int]:
        first = await poll(1)  # leading edge: runs at once
        late = [asyncio.ensure_future(poll(n)) for n in (2, 3)]
        await clock.asleep(1.5)
        return [first, *await asyncio.gather(*late)]

    assert run(main) == [1, 3, 3]
    assert runs == [1, 3]


def test_debounce_cannot_guard_a_block_in_a_pipeline():
    """It must call the function itself: `with pipeline(debounce...)` is refused clearly."""
    with pytest.raises(TypeError, match="cannot guard a block"), buttress.pipeline(debounce(1)):
        pass
