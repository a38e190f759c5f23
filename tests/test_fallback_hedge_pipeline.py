"""Fallback, hedge and pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import buttress
from buttress import (
    Bulkhead,
    CircuitBreaker,
    CircuitOpenError,
    RateLimiter,
    fallback,
    hedge,
    pipeline,
    retry,
    timeout,
)
from buttress.testing import FakeClock, capture_events


class Boom(Exception):
    """A failure."""


def boom() -> None:
    raise Boom("down")


# -- fallback ---------------------------------------------------------------------------


def test_fallback_value(face):
    """A matching exception is replaced by the value."""
    assert face.wrap(fallback("cached"), boom)() == "cached"


def test_fallback_handler_receives_the_exception(face):
    """handler(exc) computes the replacement."""
    assert face.wrap(fallback(handler=lambda exc: f"fallback: {exc}"), boom)() == "fallback: down"


def test_async_fallback_handler_may_be_async():
    """For coroutine functions, an async handler is awaited."""

    async def handler(exc: BaseException) -> str:
        return "async fallback"

    @fallback(handler=handler)
    async def fetch() -> str:
        raise Boom

    assert asyncio.run(fetch()) == "async fallback"


def test_fallback_only_replaces_matching_errors(face):
    """Errors outside `on` propagate."""
    with pytest.raises(Boom):
        face.wrap(fallback(0, on=KeyError), boom)()


def test_fallback_on_mixes_classes_and_predicates(face):
    """on= takes classes and predicates mixed, like retry's on=."""

    def status(code: int) -> Callable[[], None]:
        def fail() -> None:
            error = OSError(f"HTTP {code}")
            error.status = code  # type: ignore[attr-defined]
            raise error

        return fail

    policy = fallback("cached", on=[KeyError, lambda e: getattr(e, "status", 0) >= 500])
    assert face.wrap(policy, status(503))() == "cached"
    assert face.wrap(policy, lambda: {}["missing"])() == "cached"
    with pytest.raises(OSError, match="HTTP 404"):
        face.wrap(policy, status(404))()


@pytest.mark.parametrize("exc_type", [asyncio.CancelledError, KeyboardInterrupt, SystemExit])
def test_fallback_never_swallows_cancellation(face, exc_type):
    """Cancellation is never replaced, whatever `on` says."""

    def cancelled() -> None:
        raise exc_type

    with pytest.raises(exc_type):
        face.wrap(fallback(0, on=BaseException), cancelled)()


def test_fallback_context_manager():
    """`with fallback(...) as outcome:` swallows a matching error and sets the value."""
    with fallback("default", name="cfg") as outcome:
        outcome.value = "computed"
    assert outcome.value == "computed" and outcome.error is None
    with capture_events() as captured, fallback("default") as outcome:
        raise Boom
    assert outcome.value == "default" and isinstance(outcome.error, Boom)
    assert [e.kind for e in captured] == ["fallback_used"]


def test_fallback_needs_exactly_one_of_value_and_handler():
    """Neither or both is a configuration error."""
    with pytest.raises(ValueError, match="exactly one"):
        fallback()
    with pytest.raises(ValueError, match="exactly one"):
        fallback(1, handler=lambda exc: 2)


# -- hedge ------------------------------------------------------------------------------


def test_hedge_starts_another_attempt_when_slow_and_the_first_success_wins():
    """A slow first attempt is hedged; the faster hedge wins, the loser is cancelled."""
    clock = FakeClock()
    started, cancelled = [], []
    durations = iter([10.0, 1.0])

    @hedge(0.5, clock=clock)
    async def query() -> str:
        attempt = len(started) + 1
        started.append(clock.now())
        try:
            await clock.asleep(next(durations))
        except asyncio.CancelledError:
            cancelled.append(attempt)
            raise
        return f"attempt {attempt}"

    assert asyncio.run(query()) == "attempt 2"
    assert started == [0.0, 0.5]
    assert cancelled == [1]


def test_hedge_does_not_hedge_fast_calls():
    """A call that finishes within the delay runs once."""
    clock = FakeClock()
    calls = []

    @hedge(1.0, max_hedged=3, clock=clock)
    async def fast() -> int:
        calls.append(1)
        await clock.asleep(0.1)
        return 1

    assert asyncio.run(fast()) == 1
    assert len(calls) == 1


def test_hedge_failure_starts_the_next_attempt_and_all_failing_raises_last():
    """A failed attempt hedges at once; if all fail, the last error is raised."""
    clock = FakeClock()
    calls = []

    @hedge(5.0, max_hedged=2, clock=clock)
    async def broken() -> None:
        calls.append(clock.now())
        raise Boom(len(calls))

    with pytest.raises(Boom, match="3"):
        asyncio.run(broken())
    assert calls == [0.0, 0.0, 0.0]


def test_hedge_rejects_sync_functions():
    """Hedging needs cancellable attempts: sync functions are a TypeError."""
    with pytest.raises(TypeError, match="coroutine functions only"):
        hedge(0.1)(lambda: None)


def test_cancelling_a_hedged_call_cancels_every_attempt():
    """Cancelling the caller leaves no attempt running."""
    running = []

    @hedge(0.01, max_hedged=2)
    async def slow() -> None:
        running.append(1)
        try:
            await asyncio.sleep(10)
        finally:
            running.pop()

    async def main() -> None:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.05)
        assert len(running) == 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert running == []

    asyncio.run(main())


# -- pipeline ---------------------------------------------------------------------------


def test_pipeline_applies_policies_outermost_first(face):
    """Each retry attempt goes through the breaker; the breaker's rejection ends it."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=60, clock=clock)
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise Boom

    policy = pipeline(retry(5, backoff=[0.1], on=Boom, clock=clock), breaker)
    with pytest.raises(CircuitOpenError):
        face.wrap(pipeline(retry(5, backoff=[0.1], on=Boom, clock=clock), breaker), flaky)()
    assert len(calls) == 2
    assert breaker.state == "open"
    assert isinstance(policy, buttress.Pipeline)


def test_full_pipeline_happy_path(face):
    """timeout, retry, breaker, bulkhead and limiter compose over one function."""
    clock = FakeClock()
    policies = [
        retry(3, clock=clock),
        CircuitBreaker(clock=clock),
        Bulkhead(max_concurrent=2),
        RateLimiter(rate=1000, burst=10, clock=clock),
    ]
    if face.is_async:
        policies.insert(0, timeout(5, clock=clock))
    call = face.wrap(pipeline(*policies), lambda x: x * 2)
    assert call(21) == 42


def test_nested_pipelines_flatten_and_bad_items_are_rejected():
    """A pipeline inside a pipeline is flattened; non-policies are a TypeError."""
    inner = pipeline(retry(2), CircuitBreaker())
    outer = pipeline(timeout(1), inner)
    assert len(outer.policies) == 3
    with pytest.raises(TypeError, match=r"policies\[1\] must be a buttress policy"):
        pipeline(retry(2), "breaker")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        pipeline()


def test_pipeline_context_manager():
    """A pipeline of context-capable policies guards a block; retry cannot."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    guard = pipeline(Bulkhead(max_concurrent=1), breaker)
    with pytest.raises(Boom), guard:
        raise Boom
    assert breaker.state == "open"
    with pytest.raises(TypeError, match="attempts"), pipeline(retry(2)):
        pass

    async def main() -> None:
        async with pipeline(timeout(1, clock=clock), Bulkhead(max_concurrent=1)):
            await asyncio.sleep(0)

    asyncio.run(main())
