"""The scenario: a fake payment gateway whose health changes during the run, the
pipeline that protects each checkout, and the counts of what happened.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from buttress import events
from buttress.backoff import exponential
from buttress.bulkhead import Bulkhead
from buttress.circuit_breaker import CircuitBreaker
from buttress.exceptions import (
    BulkheadFull,
    RateLimited,
    RejectedError,
    TimeoutExceeded,
)
from buttress.fallback import Fallback, fallback
from buttress.pipeline import pipeline
from buttress.rate_limiter import RateLimiter
from buttress.registry import Registry
from buttress.retry import Retry, RetryBudget, retry
from buttress.timeout import Timeout, timeout

# -- the scenario ---------------------------------------------------------------------------

# Pipeline settings. The breaker's reset timeout scales with the run (see Settings).
TOTAL_TIMEOUT = 0.6  # seconds for a whole checkout, retries included
ATTEMPT_TIMEOUT = 0.35  # seconds for one call to the gateway
ATTEMPTS = 3
MAX_CONCURRENT = 10
MAX_QUEUE = 10
QUEUE_WAIT = 0.1
RATE = 150.0  # admissions per second
BURST = 15
RATE_WAIT = 0.02
THINK_TIME = 0.3  # mean seconds a caller pauses between checkouts
BASE_LATENCY = 0.035  # median gateway latency in seconds


@dataclass(frozen=True)
class Phase:
    """A stretch of the run during which the gateway behaves one way."""

    name: str
    note: str
    until: float  # the fraction of the run at which the phase ends
    error_rate: float  # share of calls answered 503
    slow_rate: float  # share of calls that hang far past the attempt timeout
    latency: float  # multiplier of the base latency

    @property
    def failing(self) -> float:
        """The share of calls that fail one way or the other."""
        return self.error_rate + self.slow_rate


PHASES = (
    Phase("healthy", "answering normally", 0.25, 0.02, 0.015, 1.0),
    Phase("degraded", "slow, with more errors", 0.35, 0.15, 0.05, 4.0),
    Phase("outage", "down: calls fail or hang", 0.65, 0.75, 0.22, 0.5),
    Phase("recovering", "coming back", 0.75, 0.15, 0.03, 1.5),
    Phase("healthy", "answering normally again", 1.0, 0.02, 0.015, 1.0),
)


def phase_at(fraction: float) -> Phase:
    """The phase the gateway is in at ``fraction`` of the run."""
    for phase in PHASES:
        if fraction < phase.until:
            return phase
    return PHASES[-1]


@dataclass(frozen=True)
class Settings:
    """What ``python -m buttress demo`` was asked to do."""

    seconds: float = 8.0
    callers: int = 50
    seed: int = 0
    colour: bool = False  # ANSI colours and an in-place live view (a terminal only)
    plot: str | None = None  # where to write a timeline chart of the run (PNG), if anywhere

    @property
    def reset_timeout(self) -> float:
        """The breaker's reset timeout: a few open/half-open cycles fit in the outage."""
        return min(max(self.seconds * 0.08, 0.25), 2.0)


class GatewayError(Exception):
    """The gateway answered 503: transient, worth retrying."""


class CardDeclined(Exception):
    """The card was declined: a real answer, neither retried nor a breaker failure."""


@dataclass(frozen=True)
class Receipt:
    """What a checkout returns: a charge id, or why the charge was deferred."""

    charge_id: str | None
    deferred_because: str | None = None


class Timeline:
    """Checkout outcomes per column of the timeline (each column a slice of the run)."""

    def __init__(self, seconds: float, columns: int) -> None:
        self.seconds = seconds
        self.columns = columns
        self.ok = [0] * columns
        self.bad = [0] * columns  # fallbacks and failures

    def column(self, elapsed: float) -> int:
        return min(max(int(elapsed / self.seconds * self.columns), 0), self.columns - 1)


class FakeGateway:
    """An async payment API with a long latency tail and a failure rate that changes."""

    def __init__(self, rng: random.Random, started: float, seconds: float) -> None:
        self._rng = rng
        self._started = started
        self._seconds = seconds
        self.calls = 0
        self.errors = 0
        self.slow = 0
        self.in_flight = 0

    def phase(self) -> Phase:
        return phase_at((time.monotonic() - self._started) / self._seconds)

    async def charge(self, amount_cents: int) -> Receipt:
        """Charge ``amount_cents``; raises GatewayError (503) or CardDeclined."""
        rng, phase = self._rng, self.phase()
        self.calls += 1
        draw = rng.random()
        failing = draw < phase.error_rate
        if phase.error_rate <= draw < phase.error_rate + phase.slow_rate:
            self.slow += 1
            latency = rng.uniform(0.5, 2.5)  # a hang: only a timeout ends this call
        else:
            latency = rng.lognormvariate(math.log(BASE_LATENCY), 0.6) * phase.latency
            if failing:
                latency *= 0.5  # an overloaded gateway answers 503 quickly
        self.in_flight += 1
        try:
            await asyncio.sleep(latency)
        finally:
            self.in_flight -= 1
        if failing:
            self.errors += 1
            raise GatewayError("503 Service Unavailable")
        if rng.random() < 0.01:
            raise CardDeclined(f"card declined for {amount_cents} cents")
        return Receipt(f"ch_{rng.getrandbits(40):010x}")


# -- counting what happened -----------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """One move of the circuit breaker, ``at`` seconds into the run."""

    at: float
    old: str
    new: str
    reason: str


class Tally:
    """The listener: counts the events of every primitive in the pipeline."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.retries = 0
        self.retry_causes: Counter[str] = Counter()
        self.recovered = 0
        self.gave_up: Counter[str] = Counter()
        self.transitions: list[Transition] = []
        self.rejected: Counter[str] = Counter()
        self.waited: Counter[str] = Counter()
        self.timeouts: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        # When things happened, for the timeline chart: (seconds into the run, what).
        # What: "retry", "rejected:<reason>", "timeout:<name>" or "fallback".
        self.marks: list[tuple[float, str]] = []

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.RetryScheduled):
            self.retries += 1
            self.retry_causes[_error_name(event.error)] += 1
            self.marks.append((event.time - self.started, "retry"))
        elif isinstance(event, events.RetryGaveUp):
            self.gave_up[event.reason] += 1
        elif isinstance(event, events.RetryRecovered):
            self.recovered += 1
        elif isinstance(event, events.CircuitStateChanged):
            at = event.time - self.started
            self.transitions.append(Transition(at, event.old, event.new, event.reason))
        elif isinstance(event, events.CallRejected):
            self.rejected[event.reason] += 1
            self.marks.append((event.time - self.started, f"rejected:{event.reason}"))
        elif isinstance(event, events.AcquiredAfterWait):
            self.waited[event.source] += 1
        elif isinstance(event, events.TimeoutFired):
            self.timeouts[event.name or "timeout"] += 1
            self.marks.append((event.time - self.started, f"timeout:{event.name or 'timeout'}"))
        elif isinstance(event, events.FallbackUsed):
            self.fallbacks[_error_name(event.error)] += 1
            self.marks.append((event.time - self.started, "fallback"))


def _error_name(error: BaseException | None) -> str:
    return "result" if error is None else type(error).__name__


@dataclass
class Outcomes:
    """What the callers saw."""

    started: int = 0
    ok: int = 0
    declined: int = 0
    deferred: int = 0
    failed: int = 0
    in_progress: int = 0


# -- the demo itself ------------------------------------------------------------------------


class Demo:
    """The gateway, the pipeline in front of it, the callers, and what they all did."""

    def __init__(self, settings: Settings, columns: int) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.rng = random.Random(settings.seed)
        self.timeline = Timeline(settings.seconds, columns)
        self.gateway = FakeGateway(self.rng, self.started, settings.seconds)
        self.tally = Tally(self.started)
        self.outcomes = Outcomes()
        self.failures: Counter[str] = Counter()
        # How long answered checkouts took: (finished at, seconds), recent and all.
        self.latencies: deque[tuple[float, float]] = deque()
        self.all_latencies: list[float] = []
        self.admissions: deque[tuple[float, int]] = deque([(self.started, 0)])  # (at, count)
        # The whole run, for the timeline chart: every finished checkout as (seconds into
        # the run when it ended, how long it took, "ok", "declined", "fallback" or
        # "failed"), and the limiter's admitted count at every tick.
        self.finished: list[tuple[float, float, str]] = []
        self.admission_log: list[tuple[float, int]] = [(0.0, 0)]
        self.peak_rate = 0.0
        self.stopping = False

        self.registry = Registry()
        common: dict[str, Any] = {"registry": self.registry, "listeners": [self.tally]}
        self.fallback: Fallback = fallback(
            handler=self._defer, on=RejectedError, name="payments", **common
        )
        self.total_timeout: Timeout = timeout(TOTAL_TIMEOUT, name="checkout", **common)
        self.retry: Retry = retry(
            ATTEMPTS,
            on=(GatewayError, TimeoutExceeded, BulkheadFull, RateLimited),
            backoff=exponential(0.05, 2.0, 0.4, jitter="full"),
            budget=RetryBudget(0.2, window=2.0, min_per_second=5.0),
            name="payments",
            **common,
        )
        self.breaker = CircuitBreaker(
            "payments",
            failure_rate=0.5,
            window=20,
            minimum_calls=10,
            reset_timeout=settings.reset_timeout,
            half_open_max_calls=2,
            # A declined card is an answer, and our own bulkhead or limiter turning a call
            # away says nothing about the gateway: neither counts against it.
            exclude=(CardDeclined, RejectedError),
            **common,
        )
        self.bulkhead = Bulkhead(
            "payments",
            max_concurrent=MAX_CONCURRENT,
            max_queue=MAX_QUEUE,
            max_wait=QUEUE_WAIT,
            **common,
        )
        self.limiter = RateLimiter("payments", rate=RATE, burst=BURST, max_wait=RATE_WAIT, **common)
        # The per-attempt timeout sits inside the breaker so that a hung call counts as a
        # failure there: the outer timeout cancels calls, and the breaker rightly treats a
        # cancellation as neither success nor failure.
        self.attempt_timeout: Timeout = timeout(ATTEMPT_TIMEOUT, name="attempt", **common)
        self.checkout = pipeline(
            self.fallback,
            self.total_timeout,
            self.retry,
            self.breaker,
            self.bulkhead,
            self.limiter,
            self.attempt_timeout,
        )(self.gateway.charge)

    @staticmethod
    def _defer(error: BaseException) -> Receipt:
        return Receipt(None, deferred_because=type(error).__name__)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def caller(self) -> None:
        """One customer after another: check out, then pause."""
        rng, out = self.rng, self.outcomes
        await asyncio.sleep(rng.uniform(0.0, 2 * THINK_TIME))  # customers trickle in
        while not self.stopping:
            out.started += 1
            out.in_progress += 1
            began = time.monotonic()
            good = False
            outcome = "failed"
            try:
                receipt = await self.checkout(rng.randrange(500, 50_000))
            except CardDeclined:
                out.declined += 1
                good, outcome = True, "declined"
            except Exception as exc:
                out.failed += 1
                self.failures[type(exc).__name__] += 1
            else:
                if receipt.deferred_because is None:
                    out.ok += 1
                    good, outcome = True, "ok"
                else:
                    out.deferred += 1
                    outcome = "fallback"
            finally:
                out.in_progress -= 1
            now = time.monotonic()
            self.finished.append((now - self.started, now - began, outcome))
            if good:
                self.latencies.append((now, now - began))
                self.all_latencies.append(now - began)
            if now - self.started < self.settings.seconds:  # not those that end the drain
                column = self.timeline.column(now - self.started)
                (self.timeline.ok if good else self.timeline.bad)[column] += 1
            await asyncio.sleep(min(rng.expovariate(1 / THINK_TIME), 4 * THINK_TIME))

    def sample(self) -> None:
        """Refresh the windows behind the rates and percentiles (called every tick)."""
        now = time.monotonic()
        while self.latencies and self.latencies[0][0] < now - 2.0:
            self.latencies.popleft()
        admitted = int(self.limiter.snapshot()["admitted"])
        self.admissions.append((now, admitted))
        self.admission_log.append((now - self.started, admitted))
        while len(self.admissions) > 2 and self.admissions[1][0] <= now - 1.0:
            self.admissions.popleft()
        self.peak_rate = max(self.peak_rate, self.admitted_rate())

    def admitted_rate(self) -> float:
        """Rate-limiter admissions per second over the last second (or a little more).

        Never over a shorter span: the burst allowance would inflate the rate.
        """
        (t0, n0), (t1, n1) = self.admissions[0], self.admissions[-1]
        return (n1 - n0) / max(t1 - t0, 1.0)
