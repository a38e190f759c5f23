"""Circuit breaker: both modes, half-open probes, neutral errors, operators, threads."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

import buttress
from buttress import CircuitBreaker, CircuitOpenError, events
from buttress.testing import FakeClock, capture_events


class Boom(Exception):
    """A failure the breaker counts."""


class NotFound(Exception):
    """An error the breaker is told to ignore."""


def fail(breaker_call, times):
    for _ in range(times):
        with pytest.raises(Boom):
            breaker_call(True)


def behaviour(should_fail: bool = False) -> str:
    if should_fail:
        raise Boom
    return "ok"


def test_opens_after_consecutive_failures_and_rejects_with_retry_after(face, clock):
    """failure_threshold consecutive failures open it; calls then raise CircuitOpenError."""
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=30, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 2)
    assert call() == "ok"  # a success resets the streak
    fail(call, 2)
    assert breaker.state == "closed"
    fail(call, 1)
    assert breaker.state == "open"
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as info:
        call()
    assert info.value.retry_after == pytest.approx(20)
    assert isinstance(info.value, buttress.RejectedError)


def test_half_open_probe_success_closes(face, clock):
    """After reset_timeout one probe runs; its success closes the circuit."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    clock.advance(5)
    assert breaker.state == "half_open"
    assert call() == "ok"
    assert breaker.state == "closed"


def test_half_open_probe_failure_reopens(face, clock):
    """A failed probe re-opens the circuit for another reset_timeout."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    clock.advance(5)
    fail(call, 1)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        call()
    assert info.value.retry_after == pytest.approx(5)


def test_half_open_admits_at_most_half_open_max_calls_probes(clock):
    """While probes are in flight, extra calls are rejected."""
    breaker = CircuitBreaker(
        failure_threshold=1, reset_timeout=5, half_open_max_calls=2, clock=clock
    )
    breaker.acquire().failure(Boom())
    clock.advance(5)
    first, second = breaker.acquire(), breaker.acquire()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    first.success()
    assert breaker.state == "closed"
    second.success()  # a stale probe outcome changes nothing
    assert breaker.state == "closed"


def test_excluded_errors_are_neutral_even_for_probes(face, clock):
    """Excluded exceptions pass through; they neither count nor settle a probe."""
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=5, exclude=NotFound, clock=clock)

    def lookup(kind: str = "") -> str:
        if kind == "missing":
            raise NotFound
        if kind == "boom":
            raise Boom
        return "ok"

    call = face.wrap(breaker, lookup)
    for _ in range(5):
        with pytest.raises(NotFound):
            call("missing")
    assert breaker.state == "closed"
    for _ in range(2):
        with pytest.raises(Boom):
            call("boom")
    clock.advance(5)
    with pytest.raises(NotFound):
        call("missing")  # the probe was neutral...
    assert breaker.state == "half_open"
    assert call() == "ok"  # ...so the next probe can still close the circuit
    assert breaker.state == "closed"
    assert breaker.snapshot()["neutral"] == 6


def test_errors_outside_include_are_neutral(face, clock):
    """Only exceptions matching include count as failures."""
    breaker = CircuitBreaker(failure_threshold=1, include=Boom, clock=clock)

    def other() -> None:
        raise KeyError

    with pytest.raises(KeyError):
        face.wrap(breaker, other)()
    assert breaker.state == "closed"


@pytest.mark.parametrize("exc_type", [asyncio.CancelledError, KeyboardInterrupt])
def test_cancellation_is_never_counted(face, clock, exc_type):
    """Cancellation neither counts as a failure nor consumes a probe."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)

    def cancelled() -> None:
        raise exc_type

    with pytest.raises(exc_type):
        face.wrap(breaker, cancelled)()
    assert breaker.state == "closed"
    assert breaker.snapshot()["failures"] == 0


def test_failure_rate_mode_waits_for_minimum_calls(face, clock):
    """With failure_rate, the rate over the window decides, once minimum_calls were seen."""
    breaker = CircuitBreaker(failure_rate=0.5, window=10, minimum_calls=4, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 3)
    assert breaker.state == "closed"  # 3 calls < minimum_calls
    assert call() == "ok"  # 3/4 failed >= 50%: a success can complete the picture
    assert breaker.state == "open"


def test_failure_rate_window_forgets_old_calls(face, clock):
    """Only the last `window` calls count."""
    breaker = CircuitBreaker(failure_rate=0.5, window=4, minimum_calls=4, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    for _ in range(3):
        call()
    assert breaker.snapshot()["failure_rate"] == pytest.approx(0.25)
    for _ in range(4):
        call()
    assert breaker.snapshot()["failure_rate"] == 0.0
    fail(call, 1)
    assert breaker.state == "closed"
    fail(call, 1)
    assert breaker.state == "open"


def test_slow_successes_count_as_failures(face):
    """A success slower than slow_call_duration is a failure."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, slow_call_duration=1.0, clock=clock)

    def slow() -> str:
        clock.advance(1.5)
        return "late"

    call = face.wrap(breaker, slow)
    assert call() == "late"
    assert call() == "late"
    assert breaker.state == "open"
    assert breaker.snapshot()["slow_calls"] == 2


def test_outcomes_of_calls_admitted_before_a_transition_do_not_move_the_state(clock):
    """A result that arrives after the state moved on only updates the counters."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    old = breaker.acquire()
    breaker.acquire().failure(Boom())
    assert breaker.state == "open"
    clock.advance(5)
    probe = breaker.acquire()
    old.failure(Boom())  # admitted while closed: stale
    assert breaker.state == "half_open"
    probe.success()
    assert breaker.state == "closed"


def test_operator_controls(clock):
    """open() holds the circuit open until close(); reset() also zeroes the counters."""
    breaker = CircuitBreaker(reset_timeout=1, clock=clock)
    breaker.open()
    clock.advance(100)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        breaker.acquire()
    assert info.value.retry_after is None
    assert breaker.snapshot()["forced"] is True
    breaker.close()
    assert breaker.state == "closed"
    breaker.reset()
    assert breaker.snapshot()["rejections"] == 0


def test_context_manager_forms(clock):
    """`with breaker:` and `async with breaker:` record outcomes like the decorator."""
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    with pytest.raises(Boom), breaker:
        raise Boom
    with breaker:
        pass

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(Boom):
                async with breaker:
                    raise Boom

    asyncio.run(main())
    assert breaker.state == "open"
    snap = breaker.snapshot()
    assert (snap["successes"], snap["failures"]) == (1, 3)


def test_transitions_are_emitted_as_events(face, clock):
    """State changes and rejections are typed events."""
    breaker = CircuitBreaker("db", failure_threshold=1, reset_timeout=5, clock=clock)
    call = face.wrap(breaker, behaviour)
    with capture_events() as captured:
        fail(call, 1)
        with pytest.raises(CircuitOpenError):
            call()
        clock.advance(5)
        call()
    changes = [(e.old, e.new) for e in captured if isinstance(e, events.CircuitStateChanged)]
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert sum(isinstance(e, events.CallRejected) for e in captured) == 1


def test_health_reflects_the_state(clock):
    """Open fails, half-open warns, closed passes."""
    breaker = CircuitBreaker("api", failure_threshold=1, reset_timeout=5, clock=clock)
    assert buttress.health()["status"] == "pass"
    breaker.acquire().failure(Boom())
    assert buttress.health()["checks"]["api:circuit_breaker"][0]["status"] == "fail"
    assert buttress.health()["status"] == "warn"  # not critical: degraded, not failing
    clock.advance(5)
    health = buttress.health()
    assert health["status"] == "warn"
    assert health["checks"]["api:circuit_breaker"][0]["observedValue"] == "half_open"


@pytest.mark.parametrize("mode", ["consecutive", "failure_rate"])
def test_counts_are_exact_under_threads(mode):
    """8 threads hammering one breaker: every call is counted exactly once."""
    options = (
        {"failure_threshold": 10**9}
        if mode == "consecutive"
        else {"failure_rate": 1.0, "window": 1000, "minimum_calls": 1000}
    )
    breaker = CircuitBreaker(**options)
    protected = breaker(behaviour)
    per_thread, threads = 5000, 8

    def work(index: int) -> None:
        for i in range(per_thread):
            with contextlib.suppress(Boom):
                protected(i % 7 == index % 7 and i % 2 == 0)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    snap = breaker.snapshot()
    expected_failures = sum(
        1 for n in range(threads) for i in range(per_thread) if i % 7 == n % 7 and i % 2 == 0
    )
    assert snap["calls"] == per_thread * threads
    assert snap["failures"] == expected_failures
    assert snap["successes"] == per_thread * threads - expected_failures


def test_same_transitions_as_pybreaker():
    """Differential: in consecutive mode, pybreaker and buttress agree call by call."""
    pybreaker = pytest.importorskip("pybreaker")
    import datetime
    import random

    rng = random.Random(7)
    clock = FakeClock()
    ours = CircuitBreaker(failure_threshold=3, reset_timeout=10, clock=clock)
    theirs = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=10, throw_new_error_on_trip=False)
    protected = ours(behaviour)
    names = {"closed": "closed", "open": "open", "half-open": "half_open"}

    def outcome(call, *args):
        try:
            call(*args)
        except Boom:
            return "failed"
        except (CircuitOpenError, pybreaker.CircuitBreakerError):
            return "rejected"
        return "ok"

    seen = set()
    for _ in range(2000):
        if rng.random() < 0.1:
            # Let both reset timeouts elapse (pybreaker reads the wall clock).
            clock.advance(10)
            storage = theirs._state_storage
            if storage.opened_at is not None:
                storage.opened_at -= datetime.timedelta(seconds=10)
        fails = rng.random() < 0.5
        ours_outcome = outcome(protected, fails)
        theirs_outcome = outcome(theirs.call, behaviour, fails)
        assert ours_outcome == theirs_outcome
        assert ours.state == names[theirs.current_state]
        seen.add((ours_outcome, ours.state))
    # The walk went through every kind of transition.
    assert {"open", "closed"} <= {state for _, state in seen}
    assert "rejected" in {result for result, _ in seen}


def test_rejections_by_inner_primitives_are_neutral(face, clock):
    """A breaker outside a limiter never opens because of the limiter's rejections."""
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    limiter = buttress.RateLimiter(rate=1, per=60, max_wait=0, clock=clock)
    call = face.wrap(buttress.pipeline(breaker, limiter), behaviour)
    assert call() == "ok"
    for _ in range(5):
        with pytest.raises(buttress.RateLimited):
            call()
    assert breaker.state == "closed"
    assert breaker.snapshot()["neutral"] == 5


def test_a_call_cut_off_by_an_outer_timeout_counts_as_a_failure():
    """timeout outermost: a hanging dependency still opens the circuit."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)

    @buttress.pipeline(buttress.timeout(0.5, clock=clock), breaker)
    async def hangs() -> None:
        await clock.asleep(10)

    for _ in range(2):
        with pytest.raises(buttress.TimeoutExceeded):
            asyncio.run(hangs())
    assert breaker.state == "open"
    assert breaker.snapshot()["slow_calls"] == 0  # no slow_call_duration: none is slow
    assert breaker.snapshot()["deadline_failures"] == 2


def test_a_plain_cancellation_stays_neutral():
    """Cancelling the caller (no expired deadline) is not the dependency's fault."""
    breaker = CircuitBreaker(failure_threshold=1)

    @breaker
    async def slow() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert breaker.state == "closed"


def test_successes_after_reset_are_counted_by_existing_wrappers(clock):
    breaker = CircuitBreaker("svc", clock=clock)
    protected = breaker(lambda: 1)
    protected()
    breaker.reset()
    protected()
    protected()
    assert breaker.snapshot()["successes"] == 2


def test_half_open_exactly_at_the_reset_deadline(clock):
    clock.advance(43.27670679050534)  # a reading where (now + 30) - now rounds below 30
    breaker = CircuitBreaker("svc", failure_threshold=1, reset_timeout=30, clock=clock)
    with pytest.raises(ZeroDivisionError):
        breaker(lambda: 1 / 0)()
    clock.advance(30)
    assert breaker.state == "half_open"
    assert breaker(lambda: "probe")() == "probe"


# -- issue 14: success_threshold, call(), listeners added and removed later --------------------


def test_success_threshold_needs_that_many_successful_probes(face, clock):
    """Half-open closes only after success_threshold successful probes, one slot at a time."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, success_threshold=3, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    clock.advance(5)
    assert call() == "ok" and breaker.state == "half_open"
    assert call() == "ok" and breaker.state == "half_open"
    assert call() == "ok" and breaker.state == "closed"
    # once closed, the count starts afresh for the next half-open period
    fail(call, 1)
    clock.advance(5)
    assert call() == "ok" and breaker.state == "half_open"


def test_a_failed_probe_reopens_whatever_successes_came_before(face, clock):
    """With success_threshold=2, success then failure re-opens; the count restarts."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, success_threshold=2, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    clock.advance(5)
    assert call() == "ok"
    fail(call, 1)
    assert breaker.state == "open"
    clock.advance(5)
    assert call() == "ok" and breaker.state == "half_open"
    assert call() == "ok" and breaker.state == "closed"


def test_success_threshold_keeps_the_probe_limit(clock):
    """Concurrent probes stay at half_open_max_calls while successes accumulate."""
    breaker = CircuitBreaker(
        failure_threshold=1,
        reset_timeout=5,
        half_open_max_calls=1,
        success_threshold=2,
        clock=clock,
    )
    breaker.acquire().failure(Boom())
    clock.advance(5)
    probe = breaker.acquire()
    with pytest.raises(CircuitOpenError, match="probe slots"):
        breaker.acquire()
    probe.success()
    assert breaker.state == "half_open"
    breaker.acquire().success()
    assert breaker.state == "closed"


def test_success_threshold_is_validated():
    """success_threshold must be an integer >= 1, named in the error."""
    with pytest.raises(buttress.ConfigValueError, match="success_threshold"):
        CircuitBreaker(success_threshold=0)
    with pytest.raises(buttress.ConfigTypeError, match="success_threshold"):
        CircuitBreaker(success_threshold=1.5)  # type: ignore[arg-type]


def test_memory_store_sharers_must_agree_on_success_threshold():
    """Breakers sharing a MemoryBreakerStore name must have the same success_threshold."""
    from buttress.backends.memory import MemoryBreakerStore

    store = MemoryBreakerStore()
    CircuitBreaker("shared", store=store, success_threshold=2)
    with pytest.raises(buttress.ConfigValueError, match="other settings"):
        CircuitBreaker("shared", store=store, success_threshold=3, registry=buttress.Registry())


def test_call_runs_a_function_through_the_breaker(clock):
    """call() returns the result, counts failures, and rejects without calling when open."""
    breaker = CircuitBreaker(failure_threshold=2, clock=clock)
    assert breaker.call(behaviour) == "ok"
    assert breaker.call(behaviour, should_fail=False) == "ok"
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(behaviour, True)
    calls = []
    with pytest.raises(CircuitOpenError):
        breaker.call(calls.append, 1)
    assert calls == []
    snap = breaker.snapshot()
    assert (snap["successes"], snap["failures"], snap["rejections"]) == (2, 2, 1)


def test_call_async_awaits_through_the_breaker(clock):
    """call_async() is the async face of call(); call() refuses coroutine functions."""
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)

    async def fetch(url: str, *, fail: bool = False) -> str:
        if fail:
            raise Boom
        return url

    async def main() -> None:
        assert await breaker.call_async(fetch, "u") == "u"
        with pytest.raises(Boom):
            await breaker.call_async(fetch, "u", fail=True)
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(fetch, "u")

    asyncio.run(main())
    with pytest.raises(buttress.ConfigTypeError, match="call_async"):
        breaker.call(fetch, "u")  # type: ignore[arg-type]


def test_listeners_can_be_added_and_removed_after_construction(face, clock):
    """add_listener starts delivery at once (only once per listener); remove_listener stops it."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    call = face.wrap(breaker, behaviour)
    seen: list[events.Event] = []
    breaker.add_listener(seen.append)
    breaker.add_listener(seen.append)
    fail(call, 1)
    assert [type(e).__name__ for e in seen] == ["CircuitStateChanged"]
    assert breaker.remove_listener(seen.append) is True
    assert breaker.remove_listener(seen.append) is False
    clock.advance(5)
    call()
    assert len(seen) == 1
    with pytest.raises(buttress.ConfigTypeError, match="listener must be callable"):
        breaker.add_listener("not callable")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: buttress.retry(2),
        lambda: buttress.timeout(1),
        lambda: buttress.Bulkhead(max_concurrent=1),
        lambda: buttress.RateLimiter(rate=1),
        lambda: buttress.fallback(0),
        lambda: buttress.cache(60),
        lambda: buttress.debounce(1),
        lambda: buttress.hedge(0.1),
        lambda: buttress.pipeline(buttress.retry(2)),
        lambda: buttress.Saga("s"),
    ],
    ids=lambda build: "policy",
)
def test_every_policy_takes_listeners_after_construction(build):
    """add_listener and remove_listener exist on every policy and feed Policy.emit."""
    policy = build()
    seen: list[events.Event] = []
    policy.add_listener(seen.append)
    assert policy.listening
    policy.emit(events.RetryRecovered, attempts=2)
    assert len(seen) == 1 and seen[0].source == policy.kind
    assert policy.remove_listener(seen.append)
    policy.emit(events.RetryRecovered, attempts=2)
    assert len(seen) == 1


def test_half_open_by_hand_lets_probes_through_now(face, clock):
    """half_open() probes before the reset timeout, ends a forced open, and is an event."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=60, clock=clock)
    call = face.wrap(breaker, behaviour)
    fail(call, 1)
    with capture_events() as captured:
        breaker.half_open()
    assert breaker.state == "half_open"
    assert [(e.old, e.new, e.reason) for e in captured] == [
        ("open", "half_open", "forced half-open")
    ]
    fail(call, 1)  # the probe fails: open again for a full reset_timeout
    assert breaker.state == "open"
    breaker.open()
    breaker.half_open()
    assert breaker.state == "half_open" and not breaker.snapshot()["forced"]
    assert call() == "ok" and breaker.state == "closed"
    breaker.half_open()  # from closed too
    assert breaker.state == "half_open"


def test_call_events_report_every_call_when_asked(face, clock):
    """call_events=True emits CallCompleted per call with outcome, duration and error."""
    breaker = CircuitBreaker(failure_threshold=5, exclude=NotFound, call_events=True, clock=clock)

    def timed(kind: str) -> str:
        clock.advance(0.25)
        if kind == "boom":
            raise Boom
        if kind == "missing":
            raise NotFound
        return "ok"

    call = face.wrap(breaker, timed)
    with capture_events() as captured:
        assert call("ok") == "ok"
        with pytest.raises(Boom):
            call("boom")
        with pytest.raises(NotFound):
            call("missing")
        with breaker.acquire() as permit:
            permit.release()
    done = [e for e in captured if isinstance(e, events.CallCompleted)]
    assert [(e.outcome, e.duration, type(e.error).__name__) for e in done] == [
        ("success", 0.25, "NoneType"),
        ("failure", 0.25, "Boom"),
        ("neutral", 0.25, "NotFound"),
        ("neutral", 0.0, "NoneType"),
    ]
    assert breaker.snapshot()["successes"] == 1


def test_without_call_events_no_call_event_is_built(face, clock):
    """The default breaker emits no CallCompleted, even with listeners."""
    breaker = CircuitBreaker(clock=clock)
    with capture_events() as captured:
        face.wrap(breaker, behaviour)()
        breaker.call(behaviour)
    assert captured == []
    with pytest.raises(buttress.ConfigTypeError, match="call_events"):
        CircuitBreaker(call_events="yes")  # type: ignore[arg-type]
