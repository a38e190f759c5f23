"""Generator functions under retry, breaker, bulkhead, limiter and timeout, on both faces.

The rule (docs/retry.md, "Generator functions"): the policy's work for the whole
iteration happens when the first item is asked for; a retry runs the generator again
only until its first item arrives; a breaker or bulkhead permit is held for the whole
iteration and settled once at its end; a timeout is one deadline for the whole iteration.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import buttress
from buttress import (
    Bulkhead,
    CircuitBreaker,
    RateLimiter,
    backoff,
    pipeline,
    remaining,
    retry,
    timeout,
)
from buttress.testing import FakeClock, capture_events


class Boom(Exception):
    """A transient failure of the upstream."""


Body = Callable[..., Iterator[Any]]


class GenFace:
    """Builds a generator function of the face's kind from a sync body and consumes it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    def make(self, body: Body) -> Callable[..., Any]:
        """A generator function (sync) or an async generator function (async) that yields
        what ``body`` yields and raises what it raises."""
        if self.loop is None:

            def gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
                return (yield from body(*args, **kwargs))

            return gen

        async def agen(*args: Any, **kwargs: Any) -> Any:
            inner = body(*args, **kwargs)
            try:
                value = None
                while True:
                    try:
                        item = inner.send(value)
                    except StopIteration:
                        return
                    await asyncio.sleep(0)
                    value = yield item
            finally:
                inner.close()

        return agen

    def take(self, gen_fn: Callable[..., Any], *args: Any, limit: int | None = None) -> list[Any]:
        """The items of one iteration (at most ``limit``, then the generator is closed)."""
        if self.loop is None:
            out: list[Any] = []
            gen = gen_fn(*args)
            try:
                for item in gen:
                    out.append(item)
                    if limit is not None and len(out) >= limit:
                        break
            finally:
                gen.close()
            return out

        async def consume() -> list[Any]:
            out: list[Any] = []
            agen = gen_fn(*args)
            try:
                async for item in agen:
                    out.append(item)
                    if limit is not None and len(out) >= limit:
                        break
            finally:
                await agen.aclose()
            return out

        return self.loop.run_until_complete(consume())

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def gface(request: pytest.FixtureRequest) -> Iterator[GenFace]:
    """The same generator test on a generator function and on an async generator function."""
    face = GenFace(request.param)
    yield face
    face.close()


def no_wait(attempts: int = 3, **options: Any) -> buttress.Retry:
    return retry(attempts, on=Boom, backoff=backoff.constant(0), **options)


# -- what the decorators return ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: no_wait(),
        lambda: CircuitBreaker(),
        lambda: Bulkhead(max_concurrent=1),
        lambda: RateLimiter(rate=10, burst=1),
        lambda: timeout(1),
        lambda: pipeline(timeout(1), no_wait(), CircuitBreaker()),
    ],
    ids=["retry", "breaker", "bulkhead", "limiter", "timeout", "pipeline"],
)
def test_a_decorated_generator_function_stays_a_generator_function(make_policy):
    """Stacked decorators and introspection still see a (async) generator function."""

    def gen(n: int) -> Iterator[int]:
        """Counts."""
        yield from range(n)

    async def agen(n: int) -> Any:
        for i in range(n):
            yield i

    wrapped, awrapped = make_policy()(gen), make_policy()(agen)
    assert inspect.isgeneratorfunction(wrapped)
    assert inspect.isasyncgenfunction(awrapped)
    assert wrapped.__name__ == "gen" and wrapped.__doc__ == "Counts."
    assert list(make_policy()(wrapped)(3)) == [0, 1, 2]


@pytest.mark.parametrize(
    "policy",
    [
        buttress.fallback("x"),
        buttress.debounce(0.1),
        buttress.hedge(0.1),
    ],
    ids=["fallback", "debounce", "hedge"],
)
def test_policies_without_a_generator_rule_refuse_generator_functions(policy):
    """Only the primitives with a stated rule take generator functions."""

    def gen() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        policy(gen)


def test_retry_if_result_is_refused_for_a_generator_function():
    """A generator's items are not a result: a result predicate cannot apply."""

    def gen() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="retry_if_result"):
        retry(3, retry_if_result=lambda r: r is None)(gen)


# -- retry: until the first item ---------------------------------------------------------------


def test_retry_runs_the_generator_again_until_its_first_item(gface):
    """Failures before the first item are retried; the consumer sees one clean stream."""
    starts = []

    def body() -> Iterator[int]:
        starts.append(1)
        if len(starts) < 3:
            raise Boom
        yield from (1, 2, 3)

    assert gface.take(no_wait()(gface.make(body))) == [1, 2, 3]
    assert len(starts) == 3


def test_retry_lets_an_error_after_the_first_item_through(gface):
    """Once an item reached the consumer, an error propagates: nothing is replayed."""
    starts = []

    def body() -> Iterator[int]:
        starts.append(1)
        yield 1
        raise Boom("mid-stream")

    gen_fn = no_wait()(gface.make(body))
    with pytest.raises(Boom, match="mid-stream"):
        gface.take(gen_fn)
    assert len(starts) == 1


def test_retry_gives_up_on_a_generator_like_on_a_function(gface):
    """Attempts run out: the last error is raised and RetryGaveUp is emitted."""

    def body() -> Iterator[int]:
        raise Boom("down")
        yield  # pragma: no cover

    with capture_events() as events, pytest.raises(Boom, match="down"):
        gface.take(no_wait(3)(gface.make(body)))
    kinds = [e.kind for e in events]
    assert kinds.count("retry_scheduled") == 2 and kinds[-1] == "retry_gave_up"


def test_retry_of_an_empty_generator_is_a_success(gface):
    """A generator that ends before yielding worked: no retry."""
    starts = []

    def body() -> Iterator[int]:
        starts.append(1)
        return
        yield  # pragma: no cover

    assert gface.take(no_wait()(gface.make(body))) == []
    assert starts == [1]


def test_retry_sleeps_its_backoff_between_generator_attempts():
    """The backoff runs between attempts, on the policy's clock (sync and async)."""
    clock = FakeClock()
    starts = []

    def body() -> Iterator[int]:
        starts.append(clock.now())
        if len(starts) < 3:
            raise Boom
        yield 1

    policy = retry(3, on=Boom, backoff=[1.0, 2.0], clock=clock)
    assert list(policy(body)()) == [1]
    assert starts == [0.0, 1.0, 3.0]

    starts.clear()
    clock2 = FakeClock()
    policy = retry(3, on=Boom, backoff=[1.0, 2.0], clock=clock2)

    @policy
    async def abody() -> Any:
        starts.append(clock2.now())
        if len(starts) < 3:
            raise Boom
        yield 1

    async def consume() -> list[int]:
        return [x async for x in abody()]

    assert asyncio.run(consume()) == [1]
    assert starts == [0.0, 1.0, 3.0]


def test_retry_hooks_run_around_the_first_item_phase():
    """before_attempt runs per attempt, after_call once when the retry phase ends."""
    seen: list[str] = []
    calls = []

    @retry(
        3,
        on=Boom,
        backoff=backoff.constant(0),
        before_attempt=lambda s: seen.append(f"before {s.attempt}"),
        after_call=lambda s: seen.append(f"after {s.attempt}"),
    )
    def gen() -> Iterator[int]:
        calls.append(1)
        if len(calls) < 2:
            raise Boom
        yield 1
        seen.append("second item asked")
        yield 2

    assert list(gen()) == [1, 2]
    assert seen == ["before 1", "before 2", "after 2", "second item asked"]


def test_send_throw_close_and_the_return_value_reach_the_real_generator():
    """A decorated generator is the real one to its consumer: send, throw, close, return."""
    log: list[object] = []

    @pipeline(timeout(5), no_wait(), CircuitBreaker(), Bulkhead(max_concurrent=1))
    def echo() -> Iterator[object]:
        try:
            received = yield "ready"
            while True:
                try:
                    received = yield f"got {received}"
                except KeyError as exc:
                    log.append(f"caught {exc!r}")
                    received = "recovered"
                if received == "stop":
                    return "returned"
        finally:
            log.append("finally")

    gen = echo()
    assert next(gen) == "ready"
    assert gen.send(1) == "got 1"
    assert gen.throw(KeyError("k")) == "got recovered"
    with pytest.raises(StopIteration) as stop:
        gen.send("stop")
    assert stop.value.value == "returned"
    assert log == ["caught KeyError('k')", "finally"]

    gen = echo()
    next(gen)
    gen.close()
    assert log[-1] == "finally"


def test_asend_athrow_and_aclose_reach_the_real_async_generator():
    """The async twin: asend, athrow and aclose are forwarded."""
    log: list[object] = []

    @pipeline(timeout(5), no_wait(), CircuitBreaker(), Bulkhead(max_concurrent=1))
    async def echo() -> Any:
        try:
            received = yield "ready"
            while True:
                try:
                    received = yield f"got {received}"
                except KeyError:
                    log.append("caught")
                    received = "recovered"
        finally:
            log.append("finally")

    async def drive() -> list[object]:
        agen = echo()
        out = [await agen.__anext__(), await agen.asend(1), await agen.athrow(KeyError("k"))]
        await agen.aclose()
        return out

    assert asyncio.run(drive()) == ["ready", "got 1", "got recovered"]
    assert log == ["caught", "finally"]


# -- breaker and bulkhead: one permit for the whole iteration ---------------------------------


def test_creating_a_generator_takes_nothing_until_it_is_iterated(gface):
    """The permit is taken when the first item is asked for, not when the function is called."""
    bulkhead = Bulkhead(max_concurrent=1)

    def body() -> Iterator[int]:
        yield 1

    gen_fn = bulkhead(gface.make(body))
    pending = gen_fn()
    assert bulkhead.in_flight == 0
    assert gface.take(gen_fn) == [1]
    del pending
    gc.collect()
    assert bulkhead.in_flight == 0


def test_a_breaker_counts_an_error_mid_stream_as_a_failure_and_opens(gface):
    """An upstream that breaks while streaming is a failing call."""
    breaker = CircuitBreaker(failure_threshold=2)

    def body() -> Iterator[int]:
        yield 1
        raise Boom

    gen_fn = breaker(gface.make(body))
    for _ in range(2):
        with pytest.raises(Boom):
            gface.take(gen_fn)
    assert breaker.state == "open"
    with pytest.raises(buttress.CircuitOpenError):
        gface.take(gen_fn)


def test_a_consumer_that_stops_early_settles_a_success(gface):
    """Closing the generator before its end is the consumer's choice, not a failure."""
    breaker = CircuitBreaker(failure_threshold=1)

    def body() -> Iterator[int]:
        yield from range(100)

    assert gface.take(breaker(gface.make(body)), limit=2) == [0, 1]
    snap = breaker.snapshot()
    assert breaker.state == "closed" and snap["failures"] == 0 and snap["successes"] == 1


def test_the_breaker_times_the_generator_not_the_consumer():
    """A slow consumer does not make a call slow; a slow generator does."""
    clock = FakeClock()
    breaker = CircuitBreaker(slow_call_duration=1.0, failure_threshold=1, clock=clock)

    @breaker
    def fast_items() -> Iterator[int]:
        yield 1
        yield 2

    for _ in fast_items():
        clock.advance(5.0)  # the consumer takes its time
    assert breaker.state == "closed"

    @breaker
    def slow_items() -> Iterator[int]:
        clock.advance(0.6)
        yield 1
        clock.advance(0.6)
        yield 2

    assert list(slow_items()) == [1, 2]
    assert breaker.state == "open"
    assert breaker.snapshot()["slow_calls"] == 1


def test_a_bulkhead_slot_is_held_for_the_iteration_and_freed_however_it_ends(gface):
    """Exhausted, failed, closed early or collected: the slot comes back every time."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=0)
    seen = []

    def body(fail: bool = False) -> Iterator[int]:
        seen.append(bulkhead.in_flight)
        yield 1
        if fail:
            raise Boom
        yield 2

    gen_fn = bulkhead(gface.make(body))
    assert gface.take(gen_fn) == [1, 2]
    with pytest.raises(Boom):
        gface.take(gen_fn, True)
    assert gface.take(gen_fn, limit=1) == [1]
    assert seen == [1, 1, 1] and bulkhead.in_flight == 0


def test_an_unfinished_sync_generator_blocks_the_slot_until_it_is_collected():
    """A started generator holds its slot; collecting it closes it and frees the slot."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=0)

    @bulkhead
    def items() -> Iterator[int]:
        yield 1
        yield 2

    first = items()
    next(first)
    with pytest.raises(buttress.BulkheadFull):
        next(items())
    del first
    gc.collect()
    assert bulkhead.in_flight == 0
    assert list(items()) == [1, 2]


def test_a_cancelled_consumer_gives_its_bulkhead_slot_back():
    """Cancelling the task that iterates an async generator releases the slot."""
    bulkhead = Bulkhead(max_concurrent=1, max_queue=0)
    started = asyncio.Event()

    @bulkhead
    async def stream() -> Any:
        yield 1
        started.set()
        await asyncio.sleep(3600)
        yield 2  # pragma: no cover

    async def main() -> int:
        async def consume() -> None:
            async for _ in stream():
                pass

        task = asyncio.ensure_future(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return bulkhead.in_flight

    assert asyncio.run(main()) == 0


def test_a_limiter_takes_one_unit_per_iteration(gface):
    """Each iteration costs one unit, however many items it yields."""
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=2, max_wait=0, clock=clock)

    def body() -> Iterator[int]:
        yield from range(10)

    gen_fn = limiter(gface.make(body))
    assert len(gface.take(gen_fn)) == 10
    assert len(gface.take(gen_fn)) == 10
    with pytest.raises(buttress.RateLimited):
        gface.take(gen_fn)


# -- timeout: one deadline for the whole iteration ----------------------------------------------


def test_the_deadline_is_in_force_inside_the_generator_only():
    """remaining() counts down inside the generator's code and is gone in the consumer's."""
    clock = FakeClock()
    inside: list[float | None] = []

    @timeout(10, clock=clock)
    def items() -> Iterator[int]:
        inside.append(remaining())
        yield 1
        inside.append(remaining())
        yield 2

    outside = []
    for _ in items():
        outside.append(remaining())
        clock.advance(3)
    assert inside == [10.0, 7.0]
    assert outside == [None, None]


def test_a_sync_generator_past_its_deadline_is_closed_and_its_late_item_discarded():
    """The item produced after the deadline never reaches the consumer; the error names
    the configured timeout."""
    clock = FakeClock()
    cleaned = []

    @timeout(5, clock=clock)
    def items() -> Iterator[int]:
        try:
            yield 1
            clock.advance(6)
            yield 2
        finally:
            cleaned.append(True)

    got = []
    with pytest.raises(buttress.TimeoutExceeded, match="exceeded 5s"):
        got.extend(items())
    assert got == [1] and cleaned == [True]


def test_the_consumer_s_time_counts_against_the_deadline(gface):
    """It is a deadline for the whole stream: asking for an item after it expired fails."""
    clock = FakeClock()
    limit = timeout(5, clock=clock)

    def body() -> Iterator[int]:
        yield 1
        yield 2

    gen_fn = limit(gface.make(body))
    if gface.loop is None:
        gen = gen_fn()
        assert next(gen) == 1
        clock.advance(6)
        with pytest.raises(buttress.TimeoutExceeded):
            next(gen)
        return

    async def main() -> None:
        agen = gen_fn()
        assert await agen.__anext__() == 1
        clock.advance(6)
        with pytest.raises(buttress.TimeoutExceeded):
            await agen.__anext__()

    gface.loop.run_until_complete(main())
    assert limit.snapshot()["timeouts"] == 1


def test_an_async_generator_step_that_hangs_is_cancelled_at_the_deadline():
    """The async face hands control back: a hanging step is cancelled on time."""
    clock = FakeClock()
    cleaned = []

    @timeout(5, clock=clock)
    async def items() -> Any:
        try:
            yield 1
            await clock.asleep(3600)
            yield 2  # pragma: no cover
        finally:
            cleaned.append(clock.now())

    async def main() -> list[int]:
        got = []
        with pytest.raises(buttress.TimeoutExceeded, match="exceeded 5s"):
            async for item in items():
                got.append(item)
        return got

    assert asyncio.run(main()) == [1]
    assert cleaned == [5.0]


def test_an_outer_cancellation_stays_a_cancellation():
    """Cancelling the consumer is not a timeout."""

    @timeout(60)
    async def items() -> Any:
        yield 1
        await asyncio.sleep(3600)
        yield 2  # pragma: no cover

    async def main() -> None:
        async def consume() -> None:
            async for _ in items():
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_pipeline_protects_a_stream_end_to_end(gface):
    """timeout > retry > breaker > bulkhead > limiter on a generator, both faces."""
    starts = []
    breaker = CircuitBreaker(failure_threshold=5)
    bulkhead = Bulkhead(max_concurrent=2)
    policy = pipeline(timeout(5), no_wait(3), breaker, bulkhead, RateLimiter(rate=100, burst=10))

    def body() -> Iterator[str]:
        starts.append(1)
        if len(starts) == 1:
            raise Boom
        yield "a"
        yield "b"

    assert gface.take(policy(gface.make(body))) == ["a", "b"]
    snap = breaker.snapshot()
    assert snap["failures"] == 1 and snap["successes"] == 1
    assert bulkhead.in_flight == 0
