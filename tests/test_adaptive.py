"""Adaptive bulkhead: algorithms, bounds, admission, neutral outcomes, threads, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buttress
from buttress import AdaptiveBulkhead, BulkheadFull, CircuitOpenError, timeout
from buttress.adaptive import AIMD, AdaptivePermit, Gradient, LimitChanged
from buttress.testing import FakeClock, capture_events


class Boom(Exception):
    """A failure that counts as an error."""


class NotFound(Exception):
    """A failure the bulkhead is told to ignore."""


_HELD: dict[int, list[AdaptivePermit]] = {}


def hold(bulkhead: AdaptiveBulkhead) -> bool:
    """Take a slot without waiting; the test keeps its permit (settled newest first)."""
    permit = bulkhead.try_acquire()
    if permit is None:
        return False
    assert isinstance(permit, AdaptivePermit)
    _HELD.setdefault(id(bulkhead), []).append(permit)
    return True


def settle(
    bulkhead: AdaptiveBulkhead,
    *,
    latency: float | None = None,
    error: bool = False,
) -> None:
    """Settle the newest permit held (admitted with the most calls in flight): an error,
    a latency sample, or neutral."""
    held = _HELD.get(id(bulkhead))
    if not held:
        raise RuntimeError("no slot held")
    permit = held[-1]
    if error:
        permit.failure(None, latency)
    elif latency is not None:
        permit.success(latency)
    else:
        permit.release()
    held.pop()


def drive(bulkhead: AdaptiveBulkhead, rtt: float, samples: int, *, error: bool = False) -> None:
    """Keep the bulkhead full and feed it ``samples`` outcomes of ``rtt`` seconds each."""
    for _ in range(samples):
        while hold(bulkhead):
            pass
        settle(bulkhead, latency=rtt, error=error)
    while bulkhead.in_flight:
        settle(bulkhead)


def simulate(
    bulkhead: AdaptiveBulkhead,
    clock: FakeClock,
    *,
    workers: int,
    duration: float,
    capacity: float | None = None,
    floor: float = 0.01,
) -> list[tuple[int, int]]:
    """Async workers call a dependency whose latency grows past ``capacity`` calls in flight.

    Returns ``(in flight, limit)`` seen by each call as it starts.
    """
    active = 0
    seen: list[tuple[int, int]] = []

    @bulkhead
    async def call() -> None:
        nonlocal active
        active += 1
        seen.append((active, bulkhead.limit))
        load = 1.0 if capacity is None else max(1.0, active / capacity)
        try:
            await clock.asleep(floor * load)
        finally:
            active -= 1

    async def worker() -> None:
        while clock.now() < duration:
            await call()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(workers)))

    asyncio.run(main())
    return seen


# -- configuration ---------------------------------------------------------------------------


def test_defaults_and_snapshot_shape():
    """Defaults: gradient, 10 to start within [1, 200]; the snapshot is JSON-ready."""
    bulkhead = AdaptiveBulkhead("api")
    snap = bulkhead.snapshot()
    assert snap["algorithm"] == "gradient"
    assert (snap["limit"], snap["min"], snap["max"]) == (10, 1, 200)
    assert snap["rtt_noload"] is None and snap["in_flight"] == 0
    assert buttress.state()["adaptive_bulkhead"]["api"] == snap
    json.dumps(buttress.state())
    assert isinstance(bulkhead, buttress.Bulkhead)
    assert "limit=10" in repr(bulkhead)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min": 0}, ValueError, "min must be >= 1, got 0"),
        ({"max": 0}, ValueError, "max must be >= 1, got 0"),
        ({"min": 5, "max": 4, "initial": 4}, ValueError, r"max must be >= min \(5\), got 4"),
        ({"initial": 300}, ValueError, r"initial must be between min \(1\) and max \(200\)"),
        ({"initial": 2.5}, TypeError, "initial must be an integer"),
        ({"algorithm": "vegas"}, ValueError, "algorithm must be one of"),
        ({"algorithm": 3}, TypeError, "algorithm must be 'aimd', 'gradient'"),
        ({"max_queue": -1}, ValueError, "max_queue must be >= 0"),
        ({"max_wait": -1}, ValueError, "max_wait must be"),
        ({"include": "Boom"}, TypeError, "include must be an exception class"),
        ({"timeouts_are_errors": 1}, TypeError, "timeouts_are_errors must be True or False"),
    ],
)
def test_bad_options_are_rejected(kwargs, error, message):
    """Each bad option raises a config error naming the parameter and the value."""
    with pytest.raises(error, match=message) as info:
        AdaptiveBulkhead(**kwargs)
    assert isinstance(info.value, buttress.ConfigError)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AIMD(increase=0), "increase must be > 0"),
        (lambda: AIMD(backoff=1.0), "backoff must be < 1"),
        (lambda: AIMD(backoff=0), "backoff must be > 0"),
        (lambda: AIMD(latency_threshold=-1), "latency_threshold must be"),
        (lambda: Gradient(tolerance=0.9), "tolerance must be >= 1"),
        (lambda: Gradient(smoothing=0), "smoothing must be > 0"),
        (lambda: Gradient(smoothing=1.5), "smoothing must be <= 1"),
        (lambda: Gradient(queue_allowance=-2), "queue_allowance must be >= 0"),
        (lambda: Gradient(tolerance="2"), "tolerance must be a number"),
    ],
)
def test_bad_algorithm_parameters_are_rejected(build, message):
    """Algorithm objects validate their parameters when built."""
    with pytest.raises(buttress.ConfigError, match=message):
        build()


def test_the_limit_cannot_be_set_by_hand():
    """max_concurrent reads the current limit and refuses assignment."""
    bulkhead = AdaptiveBulkhead(initial=7)
    assert bulkhead.max_concurrent == bulkhead.limit == 7
    with pytest.raises(AttributeError, match="set by its algorithm"):
        bulkhead.max_concurrent = 3


# -- the algorithms --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["aimd", "gradient"])
def test_limit_grows_under_fast_successes(algorithm):
    """A full bulkhead whose calls stay at the latency floor raises its limit, up to max."""
    bulkhead = AdaptiveBulkhead(initial=4, max=40, algorithm=algorithm)
    drive(bulkhead, 0.01, 30)
    grown = bulkhead.limit
    assert grown > 4
    drive(bulkhead, 0.01, 3000)
    assert bulkhead.limit == 40
    assert bulkhead.snapshot()["increases"] > 0


@pytest.mark.parametrize("algorithm", ["aimd", "gradient"])
def test_limit_holds_when_callers_do_not_use_it(algorithm):
    """Calls one at a time prove nothing about capacity: the limit does not grow."""
    bulkhead = AdaptiveBulkhead(initial=10, algorithm=algorithm)
    for _ in range(100):
        assert hold(bulkhead)
        settle(bulkhead, latency=0.01)
    assert bulkhead.limit == 10


def test_gradient_shrinks_when_latency_rises():
    """Calls slower than tolerance x the no-load latency pull the limit down, smoothly."""
    bulkhead = AdaptiveBulkhead(initial=40, algorithm=Gradient(tolerance=1.5, smoothing=0.2))
    drive(bulkhead, 0.01, 5)
    assert bulkhead.snapshot()["rtt_noload"] == pytest.approx(0.01)
    before = bulkhead.limit
    drive(bulkhead, 0.012, 20)  # within the tolerance: no queueing, so still growing
    assert bulkhead.limit >= before
    before = bulkhead.limit
    drive(bulkhead, 0.03, 1)  # one outlier costs at most smoothing / 2 of the limit
    assert bulkhead.limit >= int(before * 0.9)
    drive(bulkhead, 0.03, 60)  # 3x the floor, sustained: converge to half the concurrency
    assert bulkhead.limit < before / 2 + 2
    assert bulkhead.snapshot()["decreases"] > 0


def test_gradient_converges_near_capacity_in_a_queueing_simulation(clock):
    """Demand well above capacity: the limit settles near tolerance x capacity, not max."""
    bulkhead = AdaptiveBulkhead(initial=5, max=100, max_queue=100, clock=clock)
    seen = simulate(bulkhead, clock, workers=40, duration=1.5, capacity=8)
    assert 8 <= bulkhead.limit <= 8 * 1.5 + 3
    late = [limit for _, limit in seen[len(seen) // 2 :]]
    assert max(late) <= 8 * 1.5 + 4


def test_gradient_follows_a_floor_that_moved_for_good():
    """If the dependency gets slower for everyone, the limit dips to min, then recovers."""
    bulkhead = AdaptiveBulkhead(initial=20, min=2, algorithm="gradient")
    drive(bulkhead, 0.01, 50)
    drive(bulkhead, 0.05, 100)  # 5x slower at any concurrency: looks like queueing at first
    assert bulkhead.snapshot()["rtt_noload"] > 0.01  # re-measured at the floor
    drive(bulkhead, 0.05, 300)
    assert bulkhead.limit > 10


def test_aimd_latency_threshold_counts_slow_calls_as_errors():
    """With latency_threshold, AIMD backs off on slow calls; without, it ignores latency."""
    strict = AdaptiveBulkhead(initial=20, algorithm=AIMD(latency_threshold=0.05))
    lax = AdaptiveBulkhead(initial=20, algorithm="aimd")
    for bulkhead in (strict, lax):
        assert hold(bulkhead)
        settle(bulkhead, latency=0.2)
    assert strict.limit == 10  # 20 x 0.5
    assert lax.limit == 20


@pytest.mark.parametrize("algorithm", ["aimd", "gradient"])
def test_errors_shrink_the_limit(face, algorithm):
    """Calls that raise (sync or async) decrease the limit; it never drops below min."""
    bulkhead = AdaptiveBulkhead(initial=10, min=2, algorithm=algorithm)

    def behaviour() -> None:
        raise Boom

    call = face.wrap(bulkhead, behaviour)
    with pytest.raises(Boom):
        call()
    assert bulkhead.limit < 10
    for _ in range(100):
        with pytest.raises(Boom):
            call()
    assert bulkhead.limit == 2
    snap = bulkhead.snapshot()
    assert snap["errors"] == 101 and snap["in_flight"] == 0


def test_aimd_backs_off_once_per_round_trip():
    """Errors from calls admitted before a decrease do not decrease the limit again."""
    clock = FakeClock()
    bulkhead = AdaptiveBulkhead(initial=10, algorithm=AIMD(backoff=0.5), clock=clock)
    for _ in range(10):
        bulkhead.__enter__()  # ten calls in flight, all admitted at the same limit
    for _ in range(10):
        bulkhead.__exit__(Boom, Boom(), None)
    assert bulkhead.limit == 5  # one decrease for the whole window, not 0.5 ** 10
    assert bulkhead.snapshot()["errors"] == 10
    with pytest.raises(Boom), bulkhead:
        raise Boom  # admitted after the decrease: counts again
    assert bulkhead.limit == 2


def test_neutral_outcomes_leave_the_limit_alone(face):
    """Inner rejections, excluded errors and non-included errors are neither outcome."""
    bulkhead = AdaptiveBulkhead(initial=10, exclude=NotFound, include=(Boom, NotFound, KeyError))
    errors = [CircuitOpenError("open"), BulkheadFull("full"), NotFound(), ValueError()]
    for error in errors:

        def behaviour(error: Exception = error) -> None:
            raise error

        with pytest.raises(type(error)):
            face.wrap(bulkhead, behaviour)()
    snap = bulkhead.snapshot()
    assert snap["neutral"] == 4 and snap["errors"] == 0 and snap["successes"] == 0
    assert bulkhead.limit == 10 and snap["rtt_last"] is None


def test_timeouts_count_as_errors_unless_told_otherwise(clock):
    """A call cut off by an enclosing timeout is an error, or a latency sample if asked."""

    async def slow() -> None:
        await clock.asleep(5)

    for counts, expected in ((True, 1), (False, 0)):
        bulkhead = AdaptiveBulkhead(initial=10, timeouts_are_errors=counts, clock=clock)
        guarded = timeout(1, clock=clock)(bulkhead(slow))

        async def main(guarded=guarded) -> None:
            with pytest.raises(buttress.TimeoutExceeded):
                await guarded()

        asyncio.run(main())
        snap = bulkhead.snapshot()
        assert snap["errors"] == expected
        assert snap["successes"] == 1 - expected
        assert snap["in_flight"] == 0
        if not counts:
            assert snap["rtt_last"] == pytest.approx(1.0)


def test_sync_timeout_error_inside_counts_as_error():
    """A TimeoutError raised by the protected call (e.g. a socket timeout) is an error."""
    bulkhead = AdaptiveBulkhead(initial=10, algorithm="aimd")
    with pytest.raises(TimeoutError), bulkhead:
        raise TimeoutError("read timed out")
    assert bulkhead.limit == 5


# -- admission -------------------------------------------------------------------------------


def test_a_lower_limit_holds_the_queue_until_enough_calls_finish():
    """After a decrease, freed slots are not handed on until in flight is under the limit."""
    bulkhead = AdaptiveBulkhead(initial=10, algorithm=AIMD(backoff=0.5), max_queue=10)

    async def main() -> None:
        for _ in range(10):
            assert hold(bulkhead)
        waiters = [asyncio.ensure_future(bulkhead.acquire_async()) for _ in range(3)]
        await asyncio.sleep(0)
        assert bulkhead.queued == 3
        settle(bulkhead, error=True)  # limit 10 -> 5 while 9 stay in flight
        assert (bulkhead.limit, bulkhead.in_flight, bulkhead.queued) == (5, 9, 3)
        for _ in range(4):
            settle(bulkhead)
        assert (bulkhead.in_flight, bulkhead.queued) == (5, 3)
        settle(bulkhead)  # 4 in flight: the head of the queue gets the fifth slot
        assert (bulkhead.in_flight, bulkhead.queued) == (5, 2)
        _HELD[id(bulkhead)].append(await waiters[0])
        assert not waiters[1].done()
        for waiter in waiters[1:]:
            waiter.cancel()
        await asyncio.gather(*waiters[1:], return_exceptions=True)
        while bulkhead.in_flight:
            settle(bulkhead)

    asyncio.run(main())
    assert bulkhead.queued == 0


def test_a_higher_limit_admits_several_waiters_at_once():
    """A limit that grows by several slots wakes as many queued callers, in order."""
    bulkhead = AdaptiveBulkhead(initial=2, algorithm=AIMD(increase=6), max_queue=10)
    order: list[int] = []

    async def waiter(n: int) -> None:
        await bulkhead.acquire_async()
        order.append(n)

    async def main() -> None:
        assert hold(bulkhead) and hold(bulkhead)
        tasks = [asyncio.ensure_future(waiter(n)) for n in range(5)]
        await asyncio.sleep(0)
        settle(bulkhead, latency=0.01)  # 2 + 6/2 = 5 slots, 1 in flight: 4 granted
        assert bulkhead.limit == 5
        assert (bulkhead.in_flight, bulkhead.queued) == (5, 1)
        await asyncio.gather(*tasks[:4])
        assert order == [0, 1, 2, 3]
        tasks[4].cancel()
        await asyncio.gather(tasks[4], return_exceptions=True)

    asyncio.run(main())


def test_rejects_when_full_and_the_queue_is_full(face):
    """Beyond the limit and the queue, calls raise BulkheadFull like a fixed bulkhead."""
    bulkhead = AdaptiveBulkhead("pool", initial=1)
    call = face.wrap(bulkhead, lambda: "ran")
    assert hold(bulkhead)
    with capture_events() as seen, pytest.raises(BulkheadFull, match="all 1 slots busy"):
        call()
    assert buttress.health()["status"] == "warn"
    settle(bulkhead)
    assert call() == "ran"
    assert seen[0].source == "adaptive_bulkhead" and seen[0].name == "pool"
    snap = bulkhead.snapshot()
    assert (snap["rejected"], snap["accepted"], snap["in_flight"]) == (1, 2, 0)


def test_queued_caller_gives_up_after_max_wait(clock):
    """max_wait bounds the wait in the queue (fake time), leaving nothing behind."""
    bulkhead = AdaptiveBulkhead(initial=1, max_queue=1, max_wait=2.0, clock=clock)

    async def main() -> None:
        held = await bulkhead.acquire_async()
        with pytest.raises(BulkheadFull, match="in time"):
            await bulkhead.acquire_async()
        assert clock.now() == pytest.approx(2.0)
        held.release()

    asyncio.run(main())
    assert bulkhead.snapshot()["timed_out"] == 1
    assert bulkhead.in_flight == bulkhead.queued == 0


def test_never_more_in_flight_than_the_limit_at_admission(clock):
    """In a changing simulation, every call starts with at most `limit` calls in flight."""
    bulkhead = AdaptiveBulkhead(initial=3, max=30, max_queue=50, clock=clock)
    seen = simulate(bulkhead, clock, workers=25, duration=0.6, capacity=6)
    # A granted waiter may start after a decrease it did not cause; allow for that by
    # comparing with the highest limit seen so far.
    high = 0
    for active, limit in seen:
        high = max(high, limit)
        assert active <= high
    assert max(active for active, _ in seen) <= 30
    assert bulkhead.in_flight == 0 and bulkhead.queued == 0


@settings(max_examples=150, deadline=None)
@given(
    bounds=st.tuples(st.integers(1, 20), st.integers(0, 60)),
    algorithm=st.sampled_from(["aimd", "gradient", "slow-aimd", "eager-gradient"]),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["acquire", "ok", "error", "neutral"]),
            st.floats(0.0, 5.0, allow_nan=False),
        ),
        max_size=200,
    ),
)
def test_limit_stays_within_bounds_and_admissions_within_limit(bounds, algorithm, ops):
    """Whatever the outcomes, min <= limit <= max and try_acquire never exceeds the limit."""
    low, extra = bounds
    high = low + extra
    chosen = {
        "slow-aimd": AIMD(increase=50, backoff=0.1, latency_threshold=1.0),
        "eager-gradient": Gradient(tolerance=1.0, smoothing=1.0, queue_allowance=100),
    }.get(algorithm, algorithm)
    bulkhead = AdaptiveBulkhead(initial=low, min=low, max=high, algorithm=chosen)
    for op, rtt in ops:
        if op == "acquire":
            before = bulkhead.in_flight
            if hold(bulkhead):
                assert bulkhead.in_flight == before + 1 <= bulkhead.limit
            else:
                assert before >= bulkhead.limit
        elif bulkhead.in_flight:
            if op == "neutral":
                settle(bulkhead)
            else:
                settle(bulkhead, latency=rtt, error=op == "error")
        assert low <= bulkhead.limit <= high
        snap = bulkhead.snapshot()
        assert snap["limit"] == int(snap["limit_estimate"])


# -- cancellation and threads ----------------------------------------------------------------


def test_cancelled_waiters_and_calls_give_their_slots_back():
    """Cancelled queued callers take nothing; a cancelled running call is neutral."""
    bulkhead = AdaptiveBulkhead(initial=2, max_queue=1000)
    started = asyncio.Event()

    @bulkhead
    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def main() -> None:
        running = [asyncio.ensure_future(hang()) for _ in range(2)]
        await started.wait()
        queued = [asyncio.ensure_future(hang()) for _ in range(500)]
        await asyncio.sleep(0)
        assert bulkhead.in_flight == 2 and bulkhead.queued == 500
        running[0].cancel()  # frees a slot, granted to the first queued caller...
        await asyncio.sleep(0)
        for task in queued:  # ...who is cancelled too, before it gets to run
            task.cancel()
        running[1].cancel()
        await asyncio.gather(*running, *queued, return_exceptions=True)

    asyncio.run(main())
    snap = bulkhead.snapshot()
    assert (snap["in_flight"], snap["queued"]) == (0, 0)
    assert snap["errors"] == 0 and snap["limit"] == 2


@pytest.mark.slow
def test_threads_hammering_keep_the_counts_exact():
    """16 threads, a changing limit: every admission is released and accounted for."""
    bulkhead = AdaptiveBulkhead(initial=4, max=12, max_queue=16, algorithm="aimd")
    lock = threading.Lock()
    active = peak = 0
    calls_per_thread = 150

    @bulkhead
    def work(n: int) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        if n % 7 == 0:
            time.sleep(0.0001)
        with lock:
            active -= 1
        if n % 11 == 0:
            raise Boom

    def run() -> None:
        for n in range(calls_per_thread):
            with contextlib.suppress(Boom):
                work(n)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = bulkhead.snapshot()
    total = 16 * calls_per_thread
    assert snap["accepted"] == total and snap["rejected"] == 0
    assert snap["successes"] + snap["errors"] + snap["neutral"] == total
    assert snap["errors"] == 16 * len(range(0, calls_per_thread, 11))
    assert (snap["in_flight"], snap["queued"]) == (0, 0)
    assert peak <= 12
    assert 1 <= snap["limit"] <= 12


# -- events and state ------------------------------------------------------------------------


def test_limit_changes_are_events():
    """A change of the slot count emits LimitChanged with the reason."""
    bulkhead = AdaptiveBulkhead("db", initial=10, algorithm="aimd")
    with capture_events() as seen:
        assert hold(bulkhead)
        settle(bulkhead, error=True)
    changes = [event for event in seen if isinstance(event, LimitChanged)]
    assert [(e.old, e.new, e.reason) for e in changes] == [(10, 5, "error")]
    assert changes[0].to_dict()["kind"] == "limit_changed"
    assert changes[0].source == "adaptive_bulkhead" and changes[0].name == "db"


def test_context_managers_record_samples(clock):
    """`with` and `async with` time the block and feed the algorithm."""
    bulkhead = AdaptiveBulkhead(initial=10, clock=clock)
    with bulkhead:
        clock.advance(0.25)

    async def main() -> None:
        async with bulkhead:
            await clock.asleep(0.5)

    asyncio.run(main())
    snap = bulkhead.snapshot()
    assert snap["successes"] == 2 and snap["in_flight"] == 0
    assert snap["rtt_noload"] == pytest.approx(0.25)
    assert snap["rtt_last"] == pytest.approx(0.5)


def test_over_release_is_an_error():
    """A permit settles once, and a bad duration is refused without settling it."""
    bulkhead = AdaptiveBulkhead()
    permit = bulkhead.try_acquire()
    assert permit is not None
    with pytest.raises(ValueError, match="duration must be"):
        permit.success(-1.0)
    assert bulkhead.in_flight == 1
    permit.release()
    with pytest.raises(RuntimeError, match="already settled"):
        permit.release()
    assert bulkhead.in_flight == 0
