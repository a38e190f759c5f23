"""Retry: attempts, re-raising, results, deadlines, budgets, the loop form, events."""

from __future__ import annotations

import asyncio
import traceback
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import buttress
from buttress import RetryBudget, RetryExhausted, backoff, events, retry
from buttress.testing import FakeClock, capture_events, set_testing


class Transient(Exception):
    """A retryable error."""


class Fatal(Exception):
    """A non-retryable error."""


def test_succeeds_after_transient_failures(face, flaky, clock):
    """Two failures then success: three calls, two sleeps, the result returned."""
    behaviour = flaky(Transient(), Transient())
    call = face.wrap(retry(3, clock=clock), behaviour)
    assert call() == "ok"
    assert behaviour.calls == 3
    assert len(clock.sleeps) == 2


def test_exhaustion_reraises_last_exception_unchanged_with_a_note(face, flaky, clock):
    """The last exception itself propagates, with a PEP 678 note naming the attempts."""
    last = Transient("third")
    behaviour = flaky(Transient("first"), Transient("second"), last)
    call = face.wrap(retry(3, clock=clock), behaviour)
    with pytest.raises(Transient) as info:
        call()
    assert info.value is last
    assert any("gave up after 3 attempt(s)" in note for note in info.value.__notes__)
    # The traceback still reaches the frame that raised.
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "__call__" in frames


def test_non_retryable_error_is_raised_at_once(face, flaky, clock):
    """An exception outside `on` is not retried."""
    behaviour = flaky(Fatal())
    call = face.wrap(retry(5, on=Transient, clock=clock), behaviour)
    with pytest.raises(Fatal):
        call()
    assert behaviour.calls == 1
    assert clock.sleeps == []


def test_on_accepts_a_predicate(face, flaky, clock):
    """A predicate decides which exceptions are transient."""
    behaviour = flaky(Transient("retry me"), Transient("stop"))
    policy = retry(5, on=lambda exc: str(exc) == "retry me", clock=clock)
    with pytest.raises(Transient, match="stop"):
        face.wrap(policy, behaviour)()
    assert behaviour.calls == 2


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
def test_cancellation_is_never_retried(face, flaky, clock, exc_type):
    """Cancellation-like BaseExceptions propagate at once, even with on=BaseException."""
    behaviour = flaky(exc_type())
    call = face.wrap(retry(5, on=BaseException, clock=clock), behaviour)
    with pytest.raises(exc_type):
        call()
    assert behaviour.calls == 1


def test_retry_if_result_retries_then_raises_retry_exhausted(face, flaky, clock):
    """A rejected result is retried; on the last attempt RetryExhausted carries it."""
    behaviour = flaky(None, None, None)
    policy = retry(3, retry_if_result=lambda result: result is None, clock=clock)
    with pytest.raises(RetryExhausted) as info:
        face.wrap(policy, behaviour)()
    assert info.value.result is None
    assert info.value.attempts == 3
    assert isinstance(info.value, buttress.ButtressError)


def test_retry_if_result_accepts_a_good_result(face, flaky, clock):
    """A result the predicate accepts ends the retries."""
    behaviour = flaky(None, value=42)
    policy = retry(3, retry_if_result=lambda result: result is None, clock=clock)
    assert face.wrap(policy, behaviour)() == 42
    assert behaviour.calls == 2


def test_backoff_delays_are_used_in_order(face, flaky, clock):
    """A list of delays is a backoff; when it runs out its last delay repeats."""
    behaviour = flaky(Transient(), Transient(), Transient(), Transient())
    policy = retry(5, backoff=[0.1, 0.5], clock=clock)
    assert face.wrap(policy, behaviour)() == "ok"
    assert clock.sleeps == [0.1, 0.5, 0.5, 0.5]


def test_retry_after_attribute_lengthens_the_next_wait(face, flaky, clock):
    """An exception's retry_after (seconds) is honoured as the minimum next wait."""
    error = Transient()
    error.retry_after = 7.0  # type: ignore[attr-defined]
    behaviour = flaky(error)
    policy = retry(3, backoff=backoff.constant(0.1), clock=clock)
    assert face.wrap(policy, behaviour)() == "ok"
    assert clock.sleeps == [7.0]


def test_deadline_stops_before_a_sleep_that_would_cross_it(face, flaky, clock):
    """No sleep starts that would end past the deadline: give up instead."""
    behaviour = flaky(*[Transient()] * 10)
    policy = retry(10, backoff=backoff.constant(1.0), deadline=2.5, clock=clock)
    with pytest.raises(Transient) as info:
        face.wrap(policy, behaviour)()
    assert clock.sleeps == [1.0, 1.0]
    assert behaviour.calls == 3
    assert any("deadline exhausted" in note for note in info.value.__notes__)


def test_enclosing_timeout_deadline_bounds_retry_sleeps(flaky, clock):
    """Inside a sync timeout, a retry never sleeps past buttress.remaining()."""
    behaviour = flaky(*[Transient()] * 10)
    inner = retry(10, backoff=backoff.constant(1.0), clock=clock)(behaviour)
    outer = buttress.timeout(2.5, clock=clock)(inner)
    with pytest.raises(Transient):
        outer()
    assert clock.sleeps == [1.0, 1.0]


def test_budget_stops_retry_storms():
    """A shared budget allows min_per_second * window retries plus ratio * calls."""
    clock = FakeClock()
    budget = RetryBudget(0.5, window=10.0, min_per_second=0.0, clock=clock)
    policy = retry(2, backoff=[0.0], budget=budget, clock=clock)
    calls = 0

    @policy
    def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise Transient

    for _ in range(10):
        with pytest.raises(Transient):
            always_fails()
    # 10 calls deposit a ratio of 0.5: at most 5 retries in the window.
    assert calls == 10 + 5
    assert budget.snapshot()["retries_in_window"] == 5
    assert budget.rejected == 5


def test_budget_window_slides():
    """Retries withdrawn from the budget leave it once the window has passed."""
    clock = FakeClock()
    budget = RetryBudget(0.0, window=10.0, min_per_second=0.1, clock=clock)
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.advance(10.0)
    assert budget.try_withdraw()


def test_set_testing_turns_waits_into_zero_and_caps_attempts(face, flaky):
    """The global test switch removes backoff waits and can cap attempts."""
    clock = FakeClock()
    behaviour = flaky(Transient(), Transient(), Transient())
    with set_testing(True, attempts=2), pytest.raises(Transient):
        face.wrap(retry(5, backoff=backoff.constant(3.0), clock=clock), behaviour)()
    assert behaviour.calls == 2
    assert clock.sleeps == []
    behaviour = flaky(Transient())
    assert face.wrap(retry(5, backoff=backoff.constant(3.0), clock=clock), behaviour)() == "ok"
    assert clock.sleeps == [3.0]


def test_attempts_loop_sync(clock):
    """The loop form retries a block and stops after the first success."""
    policy = retry(4, backoff=[0.2], clock=clock)
    seen = []
    for attempt in policy.attempts():
        with attempt:
            seen.append(attempt.number)
            if attempt.number < 3:
                raise Transient
    assert seen == [1, 2, 3]
    assert clock.sleeps == [0.2, 0.2]


def test_attempts_loop_async_reraises_on_exhaustion(clock):
    """The async loop form sleeps on the clock and re-raises the last error."""
    policy = retry(2, backoff=[0.2], clock=clock)

    async def main() -> list[int]:
        seen = []
        async for attempt in policy.attempts():
            with attempt:
                seen.append(attempt.number)
                raise Transient(attempt.number)
        return seen

    with pytest.raises(Transient, match="2"):
        asyncio.run(main())
    assert clock.sleeps == [0.2]


def test_events_and_snapshot_describe_what_happened(face, flaky, clock):
    """Retries, recoveries and give-ups are counted and emitted as typed events."""
    policy = retry(2, backoff=[0.0], name="payments", clock=clock)
    with capture_events() as captured:
        assert face.wrap(policy, flaky(Transient()))() == "ok"
        with pytest.raises(Transient):
            face.wrap(policy, flaky(Transient(), Transient()))()
    kinds = [event.kind for event in captured]
    assert kinds == ["retry_scheduled", "retry_recovered", "retry_scheduled", "retry_gave_up"]
    gave_up = captured[-1]
    assert isinstance(gave_up, events.RetryGaveUp)
    assert gave_up.reason == "attempts" and gave_up.name == "payments"
    snap = buttress.state()["retry"]["payments"]
    assert snap["retries"] == 2 and snap["recovered"] == 1 and snap["gave_up"] == 1


def test_failing_listener_never_breaks_the_call(face, flaky, clock, caplog):
    """A listener that raises is logged; the protected call carries on."""

    def broken(event: Any) -> None:
        raise RuntimeError("listener bug")

    policy = retry(3, backoff=[0.0], listeners=[broken], clock=clock)
    assert face.wrap(policy, flaky(Transient()))() == "ok"
    assert "listener" in caplog.text


def test_decorator_keeps_the_signature_and_metadata():
    """functools.wraps metadata and coroutine-function-ness survive decoration."""

    @retry(2)
    async def fetch(url: str) -> str:
        """Fetch a URL."""
        return url

    @retry(2)
    def parse(text: str) -> int:
        return len(text)

    assert fetch.__name__ == "fetch" and fetch.__doc__ == "Fetch a URL."
    assert asyncio.iscoroutinefunction(fetch)
    assert not asyncio.iscoroutinefunction(parse)
    assert parse("abc") == 3


def test_decorator_keeps_default_values():
    """__defaults__ and __kwdefaults__ survive every policy's decorator, sync and async."""
    import buttress

    def parse(text: str, base: int = 10, *, strict: bool = False) -> int:
        return int(text, base)

    async def fetch(url: str, retries: int = 2, *, verb: str = "GET") -> str:
        return url

    policies = [
        retry(2),
        buttress.CircuitBreaker(),
        buttress.timeout(1),
        buttress.Bulkhead(max_concurrent=1),
        buttress.fallback(0),
        buttress.cache(60),
        buttress.debounce(0.5),
        buttress.pipeline(retry(2), buttress.timeout(1)),
    ]
    for policy in policies:
        for fn in (parse, fetch):
            wrapped = policy(fn)  # type: ignore[operator]
            assert wrapped.__defaults__ == fn.__defaults__, policy
            assert wrapped.__kwdefaults__ == fn.__kwdefaults__, policy
    assert retry(2)(parse)("ff", 16) == 255


def test_decorating_methods_binds_self():
    """A decorated method receives self like an undecorated one."""

    class Client:
        def __init__(self) -> None:
            self.calls = 0

        @retry(3, backoff=[0.0])
        def get(self) -> int:
            self.calls += 1
            if self.calls < 2:
                raise Transient
            return self.calls

    assert Client().get() == 2


def test_open_circuit_ends_retries_at_once_unless_named(face, clock):
    """CircuitOpenError is not transient: fail fast, unless on= names it."""
    breaker = buttress.CircuitBreaker(failure_threshold=1, reset_timeout=30, clock=clock)
    breaker.open()
    calls = []

    def never_runs() -> None:
        calls.append(1)

    fast = face.wrap(buttress.pipeline(retry(3, clock=clock), breaker), never_runs)
    with pytest.raises(buttress.CircuitOpenError):
        fast()
    assert clock.sleeps == []
    breaker.close()
    breaker.acquire().failure(Transient())  # trip it for real: retry_after=30
    patient = retry(2, on=(Transient, buttress.CircuitOpenError), backoff=[0.1], clock=clock)
    assert face.wrap(buttress.pipeline(patient, breaker), lambda: "ok")() == "ok"
    assert clock.sleeps == [30.0]  # waited for the half-open probe


def test_one_shot_iterators_are_refused_as_backoff():
    """A generator would be consumed by the first call: refuse it."""
    with pytest.raises(TypeError, match="re-iterable"):
        retry(3, backoff=(d for d in [1.0, 2.0]))


# -- on=: classes, predicates, and both mixed ------------------------------------------------


class Status(Exception):
    """An HTTP-like error carrying a status code."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def test_on_mixes_classes_and_predicates(face, flaky, clock):
    """An error matching a class or a predicate is retried; any other is raised at once."""
    policy = retry(
        6, on=[ConnectionError, lambda e: getattr(e, "status", 0) >= 500], backoff=[0], clock=clock
    )
    behaviour = flaky(ConnectionError(), Status(503), Status(404))
    with pytest.raises(Status) as info:
        face.wrap(policy, behaviour)()
    assert info.value.status == 404
    assert behaviour.calls == 3


def test_on_accepts_a_tuple_mixing_classes_and_predicates(face, flaky, clock):
    """A tuple works like a list."""
    policy = retry(3, on=(KeyError, lambda e: "again" in str(e)), backoff=[0], clock=clock)
    assert face.wrap(policy, flaky(KeyError(), ValueError("again")))() == "ok"


def test_predicates_are_not_asked_about_an_open_circuit(face, clock):
    """An open circuit fails fast even if a predicate would match it; a class opts in."""
    breaker = buttress.CircuitBreaker(failure_threshold=1, reset_timeout=30, clock=clock)
    breaker.open()
    asked: list[BaseException] = []

    def anything(exc: BaseException) -> bool:
        asked.append(exc)
        return True

    for on in (anything, [Transient, anything], [anything, Exception]):
        call = face.wrap(buttress.pipeline(retry(3, on=on, clock=clock), breaker), lambda: "ok")
        with pytest.raises(buttress.CircuitOpenError):
            call()
    assert asked == []
    assert clock.sleeps == []
    for by_class in ([anything, buttress.CircuitOpenError], [buttress.RejectedError]):
        policy = retry(2, on=by_class, backoff=[0.5], clock=clock)
        with pytest.raises(buttress.CircuitOpenError):
            face.wrap(buttress.pipeline(policy, breaker), lambda: "ok")()
    assert len(clock.sleeps) == 2  # named by class: retried once each, after retry_after


def test_on_is_exposed_as_an_exception_filter():
    """The policy keeps the validated filter: its classes and its predicates."""

    def server_error(exc: BaseException) -> bool:
        return getattr(exc, "status", 0) >= 500

    policy = retry(on=[ConnectionError, server_error])
    assert policy.on.types == (ConnectionError,)
    assert policy.on.predicates == (server_error,)
    assert policy.on(Status(502)) and not policy.on(Status(400))


# -- RetryState: the public per-call protocol --------------------------------------------------


def test_retry_state_drives_a_loop_by_hand(clock):
    """start/on_error/on_success give a hand-written loop the decorator's decisions."""
    policy = retry(3, on=Transient, backoff=[0.25, 0.5], clock=clock)
    state = policy.start()
    assert isinstance(state, buttress.RetryState)
    assert state.attempt == 1
    with capture_events() as seen:
        assert state.on_error(Transient()) == 0.25
        assert state.attempt == 2
        assert state.on_error(Transient()) == 0.5
        assert state.attempt == 3
        state.on_success()
        state.on_success()  # settled once: no second event
    recovered = [e for e in seen if isinstance(e, events.RetryRecovered)]
    assert [e.attempts for e in recovered] == [3]
    assert policy.snapshot()["recovered"] == 1


def test_retry_state_on_error_returns_none_when_not_retryable_or_exhausted(clock):
    """None means re-raise: a foreign error, or the last attempt, with notes as usual."""
    policy = retry(2, on=Transient, backoff=[0.1], clock=clock)
    state = policy.start()
    fatal = Fatal()
    assert state.on_error(fatal) is None
    assert not hasattr(fatal, "__notes__")  # first attempt: nothing was retried
    assert state.on_error(Transient()) == 0.1
    last = Transient()
    with capture_events() as seen:
        assert state.on_error(last) is None
    assert last.__notes__ == ["buttress: gave up after 2 attempt(s) (attempts exhausted)"]
    assert [e.reason for e in seen if isinstance(e, events.RetryGaveUp)] == ["attempts"]


def test_retry_state_on_result_applies_retry_if_result(clock):
    """on_result: None accepts, a delay retries, RetryExhausted when giving up."""
    policy = retry(2, retry_if_result=lambda r: r == "busy", backoff=[0.3], clock=clock)
    state = policy.start()
    assert state.on_result("busy") == 0.3
    with pytest.raises(RetryExhausted) as info:
        state.on_result("busy")
    assert info.value.result == "busy"
    assert info.value.attempts == 2
    accepted = policy.start()
    assert accepted.on_error(Transient()) == 0.3
    with capture_events() as seen:
        assert accepted.on_result("done") is None  # accepting settles the call
        accepted.on_success()
    assert [e.attempts for e in seen if isinstance(e, events.RetryRecovered)] == [2]


def test_retry_state_on_result_without_retry_if_result_accepts_everything(clock):
    """With no retry_if_result every result is accepted."""
    state = retry(3, clock=clock).start()
    assert state.on_result(None) is None
    assert state.attempt == 1


def test_retry_state_retry_result_honours_retry_after_and_never_raises(clock):
    """retry_result: the caller's verdict; the wait is at least retry_after; None at the end."""
    policy = retry(3, backoff=[0.1], clock=clock)
    state = policy.start()
    assert state.retry_result("503", retry_after=2.0) == 2.0
    assert state.retry_result("503") == 0.1
    with capture_events() as seen:
        assert state.retry_result("503", retry_after=1.0) is None
    gave_up = [e for e in seen if isinstance(e, events.RetryGaveUp)]
    assert [(e.reason, e.result, e.error) for e in gave_up] == [("attempts", "503", None)]


def test_retry_state_respects_the_deadline_and_the_budget(clock):
    """start() begins the deadline clock and deposits into the budget."""
    budget = RetryBudget(0.0, min_per_second=0.1, window=10, clock=clock)  # one retry per window
    policy = retry(5, backoff=[1.0], deadline=3.0, budget=budget, clock=clock)
    state = policy.start()
    assert budget.snapshot()["calls_in_window"] == 1
    assert state.on_error(Transient()) == 1.0
    second = policy.start()
    with capture_events() as seen:
        assert second.on_error(Transient()) is None
    assert [e.reason for e in seen if isinstance(e, events.RetryGaveUp)] == ["budget"]
    clock.advance(2.5)
    with capture_events() as seen:
        assert state.retry_result("x") is None  # 1 s would cross the 3 s deadline
    assert [e.reason for e in seen if isinstance(e, events.RetryGaveUp)] == ["deadline"]


def test_the_loop_form_and_the_decorator_agree_with_retry_state(face, flaky, clock):
    """The decorator, attempts() and a hand loop over RetryState sleep the same way."""
    schedule = [0.1, 0.2]
    behaviour = flaky(Transient(), Transient())
    face.wrap(retry(3, backoff=schedule, clock=clock), behaviour)()
    by_decorator, clock.sleeps[:] = list(clock.sleeps), []
    state, outcomes = retry(3, backoff=schedule, clock=clock).start(), [Transient(), Transient()]
    while outcomes:
        delay = state.on_error(outcomes.pop(0))
        assert delay is not None
        clock.sleep(delay)
    state.on_success()
    assert clock.sleeps == by_decorator == schedule


# -- issue 14 defects -------------------------------------------------------------------------


def test_set_testing_caps_attempts_and_never_raises_them(face, flaky):
    """set_testing(attempts=2) leaves a policy built with attempts=1 at one attempt."""
    behaviour = flaky(Transient(), Transient())
    with set_testing(True, attempts=2), pytest.raises(Transient):
        face.wrap(retry(1), behaviour)()
    assert behaviour.calls == 1


def test_retry_exhausted_survives_pickling():
    """RetryExhausted round-trips through pickle with its result, attempts and notes."""
    import pickle

    error = RetryExhausted("still busy", result={"status": "busy"}, attempts=3)
    error.__notes__ = ["buttress: a note"]  # what add_note() stores (3.11+)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RetryExhausted
    assert str(copy) == "still busy"
    assert copy.result == {"status": "busy"}
    assert copy.attempts == 3
    assert copy.__notes__ == ["buttress: a note"]


def _every_error_class() -> list[type[buttress.ButtressError]]:
    from buttress import exceptions

    return [getattr(exceptions, name) for name in exceptions.__all__]


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda cls: cls.__name__)
def test_every_buttress_error_survives_pickling(cls):
    """Each public error class round-trips through pickle, attributes included."""
    import pickle

    kwargs: dict[str, Any] = {
        "RetryExhausted": {"result": 1, "attempts": 2},
        "IdempotencyConflict": {"key": "k", "run_id": "r"},
        "TimeoutExceeded": {"timeout": 1.5},
    }.get(cls.__name__, {})
    if issubclass(cls, buttress.RejectedError):
        kwargs = {"retry_after": 2.0, "name": "db"}
    error = cls("boom", **kwargs)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
    for attribute in kwargs:  # slots (RejectedError's) as well as the instance dict
        assert getattr(copy, attribute) == getattr(error, attribute)


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(1, 8),
    schedule=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=4),
    hints=st.lists(st.none() | st.floats(0, 10, allow_nan=False), min_size=8, max_size=8),
)
def test_retry_state_follows_the_schedule_then_gives_up(attempts, schedule, hints):
    """For any schedule: attempts-1 delays (the last repeating, raised to each hint), then None."""
    state = retry(attempts, backoff=schedule, clock=FakeClock()).start()
    delays = []
    for hint in hints:
        delay = state.retry_result("again", retry_after=hint)
        if delay is None:
            break
        delays.append(delay)
    assert len(delays) == attempts - 1
    assert state.attempt == attempts
    for index, delay in enumerate(delays):
        planned = schedule[min(index, len(schedule) - 1)]
        hint = hints[index]
        assert delay == (planned if hint is None else max(planned, hint))


# -- issue 14: results that say how long to wait, TryAgain, hooks, retry_with, the loop ------


def test_retry_after_reads_the_wait_from_a_rejected_result(face, flaky, clock):
    """retry_after(result) lengthens the wait; None keeps the backoff's; timedelta works."""
    from datetime import timedelta

    hints = {429: 3.0, 503: timedelta(seconds=2), 500: None}
    behaviour = flaky(429, 503, 500, value=200)
    policy = retry(
        4,
        retry_if_result=lambda status: status != 200,
        retry_after=lambda status: hints[status],
        backoff=[0.5],
        clock=clock,
    )
    assert face.wrap(policy, behaviour)() == 200
    assert clock.sleeps == [3.0, 2.0, 0.5]


def test_retry_after_never_crosses_the_deadline(face, flaky, clock):
    """A result's hint longer than the time left gives up, raising RetryExhausted."""
    policy = retry(
        5,
        retry_if_result=lambda r: r == "busy",
        retry_after=lambda r: 60.0,
        deadline=10,
        clock=clock,
    )
    behaviour = flaky("busy", value="free")
    with pytest.raises(RetryExhausted):
        face.wrap(policy, behaviour)()
    assert behaviour.calls == 1 and clock.sleeps == []


def test_retry_after_is_validated():
    """retry_after must be callable and needs retry_if_result."""
    with pytest.raises(buttress.ConfigTypeError, match="retry_after"):
        retry(3, retry_if_result=bool, retry_after=3.0)  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigValueError, match="needs retry_if_result"):
        retry(3, retry_after=lambda r: 1.0)


def test_try_again_is_retried_whatever_on_says(face, flaky, clock):
    """TryAgain is retried even outside on=, honouring its retry_after."""
    behaviour = flaky(buttress.TryAgain(), buttress.TryAgain(retry_after=2.0))
    policy = retry(3, on=KeyError, backoff=[0.5], clock=clock)
    assert face.wrap(policy, behaviour)() == "ok"
    assert clock.sleeps == [0.5, 2.0]


def test_try_again_propagates_when_attempts_run_out(face, flaky, clock):
    """Out of attempts, the last TryAgain itself propagates with the note."""
    last = buttress.TryAgain("still not ready")
    behaviour = flaky(buttress.TryAgain(), last)
    with pytest.raises(buttress.TryAgain) as info:
        face.wrap(retry(2, clock=clock), behaviour)()
    assert info.value is last
    assert "gave up after 2 attempt(s)" in info.value.__notes__[0]
    assert isinstance(last, buttress.ButtressError)
    from buttress.exceptions import TryAgain

    assert TryAgain is buttress.TryAgain


def test_hooks_see_each_call_its_own_statistics(face, flaky, clock):
    """before_attempt runs before every attempt, after_call once, with the same state."""
    seen: list[tuple[str, int, float]] = []
    policy = retry(
        3,
        on=Transient,
        backoff=[0.25],
        before_attempt=lambda s: seen.append(("before", s.attempt, s.waited)),
        after_call=lambda s: seen.append(("after", s.attempt, s.elapsed)),
        clock=clock,
    )
    assert face.wrap(policy, flaky(Transient()))() == "ok"
    assert seen == [("before", 1, 0.0), ("before", 2, 0.25), ("after", 2, 0.25)]
    seen.clear()
    with pytest.raises(Fatal):
        face.wrap(policy, flaky(Fatal()))()
    assert seen == [("before", 1, 0.0), ("after", 1, 0.0)]


def test_a_failing_hook_propagates(face, flaky, clock):
    """An exception a hook raises reaches the caller; the function is not called."""

    def refuse(state: buttress.RetryState) -> None:
        raise RuntimeError("hook")

    behaviour = flaky()
    with pytest.raises(RuntimeError, match="hook"):
        face.wrap(retry(3, before_attempt=refuse, clock=clock), behaviour)()
    assert behaviour.calls == 0


def test_statistics_stay_per_call_under_concurrent_calls():
    """Threads sharing one decorated function each see only their own attempts."""
    import threading

    finished: list[tuple[str, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def record(state: buttress.RetryState) -> None:
        with lock:
            finished.append((threading.current_thread().name, state.attempt))

    @retry(10, backoff=[0], after_call=record)
    def work(failures: int, counter: list[int]) -> str:
        if counter[0] == 0:
            barrier.wait(timeout=10)  # all threads are inside the same function at once
        counter[0] += 1
        if counter[0] <= failures:
            raise Transient()
        return "ok"

    threads = [threading.Thread(target=work, args=(n, [0]), name=f"t{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(finished) == sorted((f"t{n}", n + 1) for n in range(8))


def test_hooks_run_in_the_loop_form(face, clock):
    """attempts() calls before_attempt per attempt and after_call once."""
    seen: list[tuple[str, int]] = []
    policy = retry(
        3,
        backoff=[0.1],
        before_attempt=lambda s: seen.append(("before", s.attempt)),
        after_call=lambda s: seen.append(("after", s.attempt)),
        clock=clock,
    )

    def block() -> None:
        for attempt in policy.attempts():
            with attempt:
                if attempt.number == 1:
                    raise Transient()

    async def ablock() -> None:
        async for attempt in policy.attempts():
            async with attempt:
                if attempt.number == 1:
                    raise Transient()

    face.run(ablock if face.is_async else block)
    assert seen == [("before", 1), ("before", 2), ("after", 2)]


def test_next_wait_is_the_wait_that_follows_a_failure(face, clock):
    """attempt.next_wait, drawn with jitter, is the sleep taken; None on the last attempt."""
    policy = retry(3, backoff=backoff.exponential(1.0, 2.0, 8.0), clock=clock)
    waits: list[float | None] = []

    def block() -> None:
        for attempt in policy.attempts():
            with attempt:
                waits.append(attempt.next_wait)
                assert attempt.next_wait == waits[-1]  # kept, not drawn again
                raise Transient()

    async def ablock() -> None:
        async for attempt in policy.attempts():
            async with attempt:
                waits.append(attempt.next_wait)
                raise Transient()

    with pytest.raises(Transient):
        face.run(ablock if face.is_async else block)
    assert waits[2] is None
    assert clock.sleeps == waits[:2]
    assert 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 2.0  # type: ignore[operator]


def test_async_with_attempt_swallows_and_propagates_like_with():
    """async with attempt: a failure is retried; the last one propagates with the note."""
    clock = FakeClock()

    async def main() -> list[int]:
        numbers = []
        async for attempt in retry(2, backoff=[1.0], clock=clock).attempts():
            async with attempt:
                numbers.append(attempt.number)
                raise Transient()
        return numbers

    with pytest.raises(Transient) as info:
        asyncio.run(main())
    assert "gave up after 2 attempt(s)" in info.value.__notes__[0]
    assert clock.sleeps == [1.0]


def test_retry_with_derives_a_policy_with_changed_options(face, flaky, clock):
    """retry_with keeps every option but the changed ones and the name; unknown keys refused."""
    budget = RetryBudget(clock=clock)
    base = retry(2, on=Transient, backoff=[0.5], budget=budget, name="base", clock=clock)
    derived = base.retry_with(attempts=4)
    assert (derived.max_attempts, derived.budget, derived.name) == (4, budget, None)
    assert base.max_attempts == 2
    behaviour = flaky(Transient(), Transient(), Transient())
    assert face.wrap(derived, behaviour)() == "ok"
    assert clock.sleeps == [0.5, 0.5, 0.5]
    with pytest.raises(Fatal):
        face.wrap(derived, flaky(Fatal()))()
    assert base.retry_with(name="derived").name == "derived"
    with pytest.raises(buttress.ConfigTypeError, match="unknown option"):
        base.retry_with(attemps=3)  # type: ignore[call-arg]
    with pytest.raises(buttress.ConfigValueError, match="attempts"):
        base.retry_with(attempts=0)


def test_is_testing_follows_set_testing():
    """is_testing() reports the switch, and set_testing's context manager restores it."""
    from buttress.testing import is_testing

    assert is_testing() is False
    with set_testing(True):
        assert is_testing() is True
        with set_testing(False):
            assert is_testing() is False
        assert is_testing() is True
    assert is_testing() is False


def test_no_attempt_limit_when_a_deadline_bounds_the_call(face, flaky, clock):
    """attempts=None retries until the deadline; without a deadline it is refused."""
    behaviour = flaky(*[Transient()] * 50)
    policy = retry(None, backoff=[1.0], deadline=10.5, clock=clock)
    with pytest.raises(Transient) as info:
        face.wrap(policy, behaviour)()
    assert behaviour.calls == 11
    assert "deadline exhausted" in info.value.__notes__[0]
    assert policy.snapshot()["attempts"] is None
    with set_testing(True, attempts=3):
        capped = flaky(*[Transient()] * 5)
        with pytest.raises(Transient):
            face.wrap(policy, capped)()
        assert capped.calls == 3
    with pytest.raises(buttress.ConfigValueError, match="needs a deadline"):
        retry(None)


def test_event_details_carry_elapsed_and_the_call_arguments(face, flaky, clock):
    """event_details=True: the three retry events carry elapsed, args and kwargs."""
    behaviour = flaky(Transient())
    policy = retry(3, backoff=[1.5], event_details=True, clock=clock)
    with capture_events() as captured:
        assert face.wrap(policy, behaviour)("a", 1) == "ok"
    assert [(type(e).__name__, e.elapsed, e.args, e.kwargs) for e in captured] == [
        ("RetryScheduled", 0.0, ("a", 1), {}),
        ("RetryRecovered", 1.5, ("a", 1), {}),
    ]
    gave_up = retry(1, event_details=True, clock=clock)
    with capture_events() as captured, pytest.raises(Transient):
        face.wrap(gave_up, flaky(Transient()))("k")
    assert [(type(e).__name__, e.args) for e in captured] == [("RetryGaveUp", ("k",))]


def test_events_carry_no_arguments_by_default(face, flaky, clock):
    """Without event_details the retry events leave elapsed, args and kwargs as None."""
    with capture_events() as captured:
        face.wrap(retry(3, clock=clock), flaky(Transient()))("secret")
    assert captured and all((e.elapsed, e.args, e.kwargs) == (None, None, None) for e in captured)
    with pytest.raises(buttress.ConfigTypeError, match="event_details"):
        retry(3, event_details=1)  # type: ignore[arg-type]


def test_a_predicate_is_asked_about_every_error_not_once_per_class(clock):
    """Verdicts are remembered per class only when `on` has no predicate: a predicate
    that looks at the instance is asked again for each error of the same class."""
    errors = [Transient("again"), Transient("stop"), Transient("again")]
    policy = retry(3, on=lambda e: e.args == ("again",), backoff=[0], clock=clock)
    calls = 0

    @policy
    def sometimes() -> None:
        nonlocal calls
        calls += 1
        raise errors.pop(0)

    with pytest.raises(Transient, match="stop"):
        sometimes()
    assert calls == 2
    errors[:] = [Transient("stop")]
    with pytest.raises(Transient, match="stop"):
        sometimes()
    assert calls == 3


def test_class_verdicts_stay_exact_across_calls(clock):
    """A policy that has already retried one class still refuses other classes (and
    subclasses of a refused class stay refused)."""
    policy = retry(3, on=Transient, backoff=[0], clock=clock)
    for error, expected_calls in [(Transient(), 3), (Fatal(), 1), (Transient(), 3)]:
        behaviour = _always(error)
        with pytest.raises(type(error)):
            policy(behaviour)()
        assert behaviour.calls == expected_calls


def test_a_zero_delay_never_retries_past_an_expired_enclosing_timeout(clock):
    """With backoff [0] inside a timeout whose deadline has passed, the retry gives up
    at once (deadline exhausted) rather than attempt again."""
    behaviour = _always(Transient())

    def slow_then_failing() -> None:
        clock.advance(5.0)
        behaviour()

    inner = retry(5, backoff=[0], clock=clock)(slow_then_failing)
    with pytest.raises(Transient) as info:
        buttress.timeout(1.0, clock=clock)(inner)()
    assert behaviour.calls == 1
    assert info.value.__notes__ == ["buttress: gave up after 1 attempt(s) (deadline exhausted)"]


class _always:
    """A function that raises ``error`` on every call and counts them."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        raise self.error
