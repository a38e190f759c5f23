"""``python -m buttress demo``: a flaky payment gateway behind a full pipeline, watched live.

Concurrent callers check out against a fake, async payment gateway whose health changes
during the run: healthy, degraded, an outage, recovery. Every charge goes through::

    fallback -> timeout (whole checkout) -> retry (jittered backoff, shared budget)
        -> circuit breaker -> bulkhead -> rate limiter -> timeout (one attempt) -> gateway

A listener counts the events of every primitive. On a terminal the view redraws in place
several times a second; anywhere else (pipes, CI, ``--no-color``, ``NO_COLOR``) the demo
prints one plain progress line per second and no escape codes. Both end with a summary.

Then one checkout runs as a payment saga (reserve-stock -> charge-card -> send-email, with
release-stock and refund as compensations) on a SQLite run log in a temporary directory,
kept for ``python -m buttress runs --db PATH list``: a run that completes (after 503s), one
whose card is declined and compensates, and the first run's idempotency key again, which
replays its stored result. On a terminal each run is drawn live from the saga's events.
Last come the registry's ``health()`` and ``state()`` as JSON, the saga included.

The primitives live in a registry of their own, so the demo never touches the default one.
Standard library only, like the rest of buttress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from . import events
from .backends import LogEntry
from .backends.sqlite import SQLiteStore
from .backoff import exponential
from .bulkhead import Bulkhead
from .circuit_breaker import CircuitBreaker
from .exceptions import (
    BackendError,
    BulkheadFull,
    RateLimited,
    RejectedError,
    TimeoutExceeded,
)
from .fallback import Fallback, fallback
from .pipeline import pipeline
from .rate_limiter import RateLimiter
from .registry import Registry
from .retry import Retry, RetryBudget, retry
from .saga import Context, Saga, SagaResult, StoredError
from .timeout import Timeout, timeout

__all__ = ["Settings", "run"]

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


# -- the payment saga -----------------------------------------------------------------------

# After the pipeline, one checkout as a saga: reserve stock, charge the card, send the
# receipt; if a step fails, the completed ones are undone in reverse (refund, release).
SAGA_STEPS = ("reserve-stock", "charge-card", "send-email")
UNDO = {"reserve-stock": "release-stock", "charge-card": "refund"}  # step -> compensation
CHARGE_ATTEMPTS = 3
CHARGE_TIMEOUT = 0.5  # seconds for one attempt of charge-card
SAGA_TIMEOUT = 5.0  # seconds for the forward part of a run
SAGA_PAUSE = 0.4  # seconds between runs on a terminal, to follow along
PRICES = {"tea": 850, "mug": 1200, "kettle": 3900, "filters": 450}  # cents
STOCK = 20  # of each item, at the start
GOOD_CARD, DECLINED_CARD = "tok_visa", "tok_chargeDeclined"  # card tokens, never numbers


def order_for(rng: random.Random, card: str) -> dict[str, Any]:
    """A random order (the saga's input: JSON, as a durable store needs)."""
    chosen = rng.sample(sorted(PRICES), 2)
    items = {item: rng.randint(1, 3) for item in chosen}
    number = f"A-{rng.randrange(1000, 10_000)}"
    return {
        "order": number,
        "email": f"{rng.choice(['ada', 'grace', 'alan', 'edsger'])}@example.com",
        "items": items,
        "amount_cents": sum(PRICES[item] * n for item, n in items.items()),
        "card": card,
    }


def check_order(order: Any) -> None:
    """The saga's ``validate=``: refuse an order no step could handle."""
    if not isinstance(order, dict) or not order.get("items"):
        raise ValueError("an order needs items")
    if not isinstance(order.get("amount_cents"), int) or order["amount_cents"] <= 0:
        raise ValueError("an order needs a positive amount_cents")


class Shop:
    """The saga's fake services: a stock ledger, a card processor and a mailer.

    The processor answers 503 to the first ``outages[order]`` calls for an order, and
    declines :data:`DECLINED_CARD`. Charges are idempotent by key (the saga's run id), as
    a real processor's are, so a retried charge never bills twice.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.stock = dict.fromkeys(PRICES, STOCK)
        self.reservations: dict[str, dict[str, int]] = {}
        self.charges: dict[str, str] = {}  # idempotency key -> charge id
        self.outages: dict[str, int] = {}  # order -> 503s left to answer
        self.calls: Counter[str] = Counter()  # every call, by service

    async def _latency(self, median: float) -> None:
        await asyncio.sleep(self.rng.lognormvariate(math.log(median), 0.25))

    async def reserve(self, items: dict[str, int]) -> str:
        self.calls["reserve"] += 1
        await self._latency(0.03)
        for item, n in items.items():
            self.stock[item] -= n
        reservation = f"rsv_{self.rng.getrandbits(24):06x}"
        self.reservations[reservation] = dict(items)
        return reservation

    async def release(self, reservation: str) -> None:
        self.calls["release"] += 1
        await self._latency(0.02)
        for item, n in self.reservations.pop(reservation, {}).items():
            self.stock[item] += n

    async def charge(self, order: str, amount_cents: int, card: str, key: str) -> str:
        self.calls["charge"] += 1
        if self.outages.get(order, 0) > 0:
            self.outages[order] -= 1
            await self._latency(0.015)  # an overloaded gateway answers 503 quickly
            raise GatewayError("503 Service Unavailable")
        await self._latency(0.06)
        if card == DECLINED_CARD:
            raise CardDeclined("insufficient funds")
        if key not in self.charges:
            self.charges[key] = f"ch_{self.rng.getrandbits(40):010x}"
        return self.charges[key]

    async def refund(self, charge_id: str) -> None:
        self.calls["refund"] += 1
        await self._latency(0.04)

    async def email(self, to: str, order: str) -> None:
        self.calls["email"] += 1
        await self._latency(0.025)


@dataclass
class LiveStep:
    """What the events said about one step of the run in progress (for the live view)."""

    status: str = "pending"
    attempt: int = 0
    started: float | None = None  # time.monotonic() when it started
    ended: float | None = None
    error: str | None = None
    undo_status: str | None = None  # its compensation: running, compensated, failed
    undo_started: float | None = None
    undo_ended: float | None = None


class SagaWatch:
    """The saga's listener: follows the run in progress, step by step, from its events."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps: dict[str, LiveStep] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the last run: every step pending."""
        self.started = time.monotonic()
        self.steps = {name: LiveStep() for name in SAGA_STEPS}

    def __call__(self, event: events.Event) -> None:
        step = self.steps.get(getattr(event, "step", ""))
        if step is None:
            return
        now = time.monotonic()
        if isinstance(event, events.StepStarted):
            step.status, step.attempt, step.started = "running", 1, now
        elif isinstance(event, events.StepRetrying):
            step.status, step.attempt, step.error = "retrying", event.attempt, event.error
        elif isinstance(event, events.StepCompleted):
            step.status, step.attempt, step.ended, step.error = (
                "completed",
                event.attempts,
                now,
                None,
            )
        elif isinstance(event, events.StepFailed):
            step.status, step.ended, step.error = "failed", now, event.error
        elif isinstance(event, events.CompensationStarted):
            step.undo_status, step.undo_started = "running", now
        elif isinstance(event, events.CompensationCompleted):
            step.undo_status, step.undo_ended = "compensated", now
        elif isinstance(event, events.CompensationFailed):
            step.undo_status, step.undo_ended = "compensation_failed", now


@dataclass
class SagaRun:
    """One run of the demo's saga: what it was, and what came back."""

    number: int
    title: str
    order: dict[str, Any]
    key: str
    result: SagaResult | None = None
    log: list[LogEntry] | None = None  # the run's entries, read back from the SQLite log
    calls_before: int = 0  # calls to the shop's services before the run
    calls_after: int = 0


class Checkout:
    """The ``checkout`` saga on a SQLite run log in a temporary directory (kept)."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.rng = random.Random(f"{settings.seed}:saga")
        self.shop = Shop(self.rng)
        self.watch = SagaWatch()
        self.directory = tempfile.mkdtemp(prefix="buttress-demo-")
        self.path = os.path.join(self.directory, "checkout.db")
        self.store = SQLiteStore(self.path)
        self.saga = Saga(
            "checkout",
            store=self.store,
            validate=check_order,
            timeout=SAGA_TIMEOUT,
            registry=registry,
            listeners=[self.watch],
        )
        self.charge_retry: Retry = retry(
            CHARGE_ATTEMPTS,
            on=(GatewayError, TimeoutExceeded),  # charges are idempotent by run id
            backoff=exponential(0.05, 2.0, 0.4, jitter="equal"),
            name="charge-card",
            registry=registry,
        )
        self.saga.step("reserve-stock", self.reserve_stock, compensate=self.release_stock)
        self.saga.step(
            "charge-card",
            self.charge_card,
            compensate=self.refund,
            retry=self.charge_retry,
            timeout=CHARGE_TIMEOUT,
            permanent=CardDeclined,  # a decline is an answer: fail at once, never retry
        )
        self.saga.step("send-email", self.send_email)
        first = order_for(self.rng, GOOD_CARD)
        declined = order_for(self.rng, DECLINED_CARD)
        self.shop.outages[first["order"]] = self.rng.randint(1, CHARGE_ATTEMPTS - 1)
        self.shop.outages[declined["order"]] = self.rng.randint(0, 1)
        self.runs = [
            SagaRun(1, "a checkout that goes through", first, f"order-{first['order']}"),
            SagaRun(2, "the card is declined", declined, f"order-{declined['order']}"),
            SagaRun(
                3,
                "run 1 again, same idempotency key (a client retrying after a lost response)",
                first,
                f"order-{first['order']}",
            ),
        ]

    # -- the steps and their compensations ----------------------------------------------------

    async def reserve_stock(self, ctx: Context) -> dict[str, str]:
        return {"reservation": await self.shop.reserve(ctx.input["items"])}

    async def release_stock(self, ctx: Context) -> None:
        await self.shop.release(ctx.results["reserve-stock"]["reservation"])

    async def charge_card(self, ctx: Context) -> dict[str, str]:
        order = ctx.input
        charge_id = await self.shop.charge(
            order["order"], order["amount_cents"], order["card"], key=ctx.run_id
        )
        return {"charge": charge_id}

    async def refund(self, ctx: Context) -> None:
        await self.shop.refund(ctx.results["charge-card"]["charge"])

    async def send_email(self, ctx: Context) -> dict[str, str]:
        await self.shop.email(ctx.input["email"], ctx.input["order"])
        return {"email": f"receipt sent to {ctx.input['email']}"}

    # -- running ------------------------------------------------------------------------------

    async def play(self, run: SagaRun) -> None:
        """Run ``run`` (its result and its log entries land on it)."""
        self.watch.reset()
        run.calls_before = sum(self.shop.calls.values())
        run.result = await self.saga.run_async(run.order, key=run.key)
        run.calls_after = sum(self.shop.calls.values())
        loaded = self.store.load(run.result.run_id)
        run.log = None if loaded is None else loaded[1]

    def log_size(self) -> tuple[int, int]:
        """Runs and log entries in the SQLite file."""
        records = self.store.runs(saga=self.saga.name, limit=1000)
        entries = 0
        for record in records:
            loaded = self.store.load(record.run_id)
            entries += 0 if loaded is None else len(loaded[1])
        return len(records), entries

    def close(self) -> None:
        self.store.close()


def error_text(error: BaseException) -> str:
    """``"Type: message"`` (an error stored by an earlier run already reads so)."""
    if isinstance(error, StoredError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def shell_quote(path: str) -> str:
    """``path`` as one word of a shell command line (POSIX shells, or Windows)."""
    if sys.platform == "win32":
        return f'"{path}"' if any(c in path for c in ' &()^"') else path
    return shlex.quote(path)


# -- drawing --------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

RESET = "\x1b[0m"
BOLD, DIM = "1", "2"
RED, GREEN, YELLOW, BLUE, CYAN, GREY = "31", "32", "33", "34", "36", "90"

STATE_COLOURS = {"closed": GREEN, "half_open": YELLOW, "open": RED}
STATUS_COLOURS = {"pass": GREEN, "warn": YELLOW, "fail": RED}
PHASE_COLOURS = {"healthy": GREEN, "degraded": YELLOW, "outage": RED, "recovering": CYAN}
SAGA_COLOURS = {
    "completed": GREEN,
    "failed": RED,
    "compensated": YELLOW,
    "compensation_failed": RED,
    "running": CYAN,
    "retrying": YELLOW,
}


@dataclass(frozen=True)
class Glyphs:
    """The characters the view draws with (Unicode, or ASCII for terminals that lack it)."""

    full: str
    empty: str
    dot: str
    arrow: str
    sep: str
    spark: str
    closed: str
    half_open: str
    open: str
    rule: str
    undo: str
    spinner: str


UNICODE = Glyphs("█", "░", "●", "→", "·", " ▁▂▃▄▅▆▇█", "▁", "▄", "█", "─", "↩", "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
ASCII = Glyphs("#", ".", "*", "->", "|", " .:-=+*#%@", "_", "~", "#", "-", "<", "|/-\\")


def pick_glyphs(stream: TextIO) -> Glyphs:
    """Unicode when ``stream`` can encode it."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(str(v) for v in vars(UNICODE).values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def fit(line: str, width: int) -> str:
    """Cut ``line`` to ``width`` visible characters, keeping every escape code."""
    if visible_len(line) <= width:
        return line
    out: list[str] = []
    shown = pos = 0
    for match in _ANSI.finditer(line):
        text = line[pos : match.start()][: max(width - shown, 0)]
        out.append(text)
        shown += len(text)
        out.append(match.group())
        pos = match.end()
    out.append(line[pos:][: max(width - shown, 0)])
    return "".join(out)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


# A line of the view and how readily it goes when the terminal is too short for all of
# them: 0 always stays, then lines go from the highest number down, bottom first on ties.
Line = tuple[float, str]
INDENT = " " * 11


def fit_height(lines: Sequence[Line], rows: int) -> list[str]:
    """The lines that fit in ``rows``, dropping the least important ones first."""
    kept = list(lines)
    while len(kept) > rows:
        top = max(priority for priority, _ in kept)
        if top <= 0:
            break
        del kept[max(i for i, (priority, _) in enumerate(kept) if priority == top)]
    return [text for _, text in kept[:rows]]


class View:
    """Turns a :class:`Demo` into lines of text, with or without colour."""

    def __init__(self, demo: Demo, colour: bool, glyphs: Glyphs) -> None:
        self.demo = demo
        self.colour = colour
        self.g = glyphs

    # -- small pieces ----------------------------------------------------------------------

    def paint(self, text: str, *codes: str) -> str:
        if not self.colour or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}{RESET}"

    def label(self, text: str) -> str:
        return self.paint(f"{text:<11}", BOLD, BLUE)

    def num(self, value: int, colour: str | None = None) -> str:
        """A count: dim when zero, bold (in ``colour``) otherwise."""
        if value == 0:
            return self.paint("0", GREY)
        return self.paint(f"{value:,}", *((BOLD, colour) if colour else (BOLD,)))

    def bar(self, value: float, maximum: float, width: int = 10) -> str:
        share = 0.0 if maximum <= 0 else min(max(value / maximum, 0.0), 1.0)
        filled = round(share * width)
        colour = GREEN if share < 0.7 else YELLOW if share < 0.95 else RED
        full = self.paint(self.g.full * filled, colour)
        return full + self.paint(self.g.empty * (width - filled), GREY)

    def join(self, parts: Iterable[str]) -> str:
        return f" {self.paint(self.g.sep, GREY)} ".join(parts)

    def counts(self, pairs: Iterable[tuple[str, int]], colour: str | None = None) -> str:
        return self.join(f"{name} {self.num(n, colour)}" for name, n in pairs)

    def rule(self) -> Line:
        return 3, self.paint(self.g.rule * 96, GREY)

    # -- sections --------------------------------------------------------------------------

    def header(self, final: bool) -> list[Line]:
        demo, s, g = self.demo, self.demo.settings, self.g
        title = self.paint(" buttress demo ", BOLD, "7") if self.colour else "buttress demo"
        info = self.paint(f"payment gateway {g.sep} {s.callers} callers {g.sep} seed {s.seed}", DIM)
        if final:
            clock = self.paint(f"finished in {demo.elapsed():.1f}s", BOLD)
        else:
            elapsed = min(demo.elapsed(), s.seconds)
            clock = f"{self.paint(f'{elapsed:4.1f}s', BOLD)} / {s.seconds:g}s "
            clock += self.bar(elapsed, s.seconds, 16)
            if demo.stopping:
                clock += self.paint("  draining", YELLOW)
        pipeline = f" {g.arrow} ".join(
            [
                "fallback",
                f"timeout {TOTAL_TIMEOUT:g}s",
                f"retry x{ATTEMPTS}",
                "breaker",
                f"bulkhead {MAX_CONCURRENT}+{MAX_QUEUE}",
                f"limiter {RATE:g}/s",
                f"timeout {ATTEMPT_TIMEOUT:g}s",
            ]
        )
        if final:
            story = f" {g.arrow} ".join(p.name for p in PHASES)
            phase_line = f"{self.label('GATEWAY')}{story}"
        else:
            phase = demo.gateway.phase()
            name = self.paint(f"{phase.name.upper():<11}", BOLD, PHASE_COLOURS.get(phase.name, ""))
            phase_line = f"{self.label('GATEWAY')}{name}{phase.note} " + self.paint(
                f"({phase.error_rate:.0%} 503s, {phase.slow_rate:.0%} hang, "
                f"latency x{phase.latency:g})",
                GREY,
            )
        gw = demo.gateway
        return [
            (0, f"{title}  {info}   {clock}"),
            (3, self.paint(pipeline, GREY)),
            (3, ""),
            (0, phase_line),
            (
                2,
                INDENT
                + self.counts(
                    [
                        ("calls", gw.calls),
                        ("503s", gw.errors),
                        ("hangs", gw.slow),
                        ("in flight", gw.in_flight),
                    ]
                ),
            ),
        ]

    def checkouts(self, final: bool) -> list[Line]:
        demo, out = self.demo, self.demo.outcomes
        if final:
            window, span = demo.all_latencies, "whole run"
        else:
            window, span = [seconds for _, seconds in demo.latencies], "last 2s"
        answered = (
            f"latency p50 {self.paint(ms(percentile(window, 0.5)), BOLD)} "
            f"p99 {self.paint(ms(percentile(window, 0.99)), BOLD)} "
            + self.paint(f"(ok calls, {span})", GREY)
        )
        why = ""
        if demo.failures:
            why = "  " + self.paint(
                "(" + ", ".join(f"{k} {v}" for k, v in demo.failures.most_common()) + ")", GREY
            )
        return [
            (
                0,
                f"{self.label('CHECKOUTS')}"
                + self.counts([("started", out.started), ("in progress", out.in_progress)])
                + f"   {answered}",
            ),
            (
                0,
                INDENT
                + self.join(
                    [
                        f"ok {self.num(out.ok, GREEN)}",
                        f"declined {self.num(out.declined)}",
                        f"fallback {self.num(out.deferred, YELLOW)}",
                        f"failed {self.num(out.failed, RED)}",
                    ]
                )
                + why,
            ),
        ]

    def retry_lines(self) -> list[Line]:
        t = self.demo.tally
        budget = self.demo.retry.budget
        causes = self.join(f"{name} {n}" for name, n in t.retry_causes.most_common())
        refused = f" (budget refused {budget.rejected})" if budget is not None else ""
        return [
            (
                0,
                f"{self.label('RETRY')}"
                + self.join(
                    [
                        f"attempts {self.num(self.demo.outcomes.started + t.retries)}",
                        f"retries {self.num(t.retries, YELLOW)}",
                        f"recovered {self.num(t.recovered, GREEN)}",
                        f"gave up {self.num(sum(t.gave_up.values()), RED)}",
                    ]
                ),
            ),
            (
                2,
                INDENT
                + "gave up on "
                + self.counts((r, t.gave_up[r]) for r in ("attempts", "deadline", "budget"))
                + self.paint(f"   retried on {causes or 'nothing yet'}{refused}", GREY),
            ),
        ]

    def breaker_lines(self, final: bool) -> list[Line]:
        breaker = self.demo.breaker
        snap = breaker.snapshot()
        state = str(snap["state"])
        word = self.paint(
            f"{self.g.dot} {state.upper().replace('_', '-')}", BOLD, STATE_COLOURS[state]
        )
        until = snap["seconds_until_half_open"]
        if state == "open" and until is not None:
            word += self.paint(f" half-open in {float(until):.2f}s", GREY)
        elif state == "half_open":
            word += self.paint(f" probing ({snap['half_open_probes']} in flight)", GREY)
        transitions = self.demo.tally.transitions
        opened = sum(1 for tr in transitions if tr.new == "open")
        rate = snap["failure_rate"]
        rate_text = "-" if rate is None else f"{float(rate):.0%}"
        lines: list[Line] = [
            (
                0,
                f"{self.label('BREAKER')}{word}   "
                + self.counts([("opened", opened), ("rejected", int(snap["rejections"]))], RED),
            ),
            (
                2,
                INDENT + f"failed {self.paint(rate_text, BOLD)} of the last {snap['window_calls']} "
                f"calls (opens at {breaker.failure_rate:.0%}) {self.g.sep} reset timeout "
                f"{breaker.reset_timeout:g}s",
            ),
            (
                3,
                INDENT
                + self.paint(
                    f"calls {snap['calls']}: {snap['successes']} ok, {snap['failures']} "
                    f"failed, {snap['neutral']} neutral (declines, our own refusals)",
                    GREY,
                ),
            ),
        ]
        shown = transitions if final else transitions[-4:]
        if len(shown) < len(transitions):
            lines.append((2.9, INDENT + self.paint("...", GREY)))
        for index, tr in enumerate(shown):
            old = self.paint(f"{tr.old:<9}", STATE_COLOURS[tr.old])
            new = self.paint(f"{tr.new:<9}", BOLD, STATE_COLOURS[tr.new])
            at = self.paint(f"+{tr.at:5.2f}s", CYAN)
            text = f"{INDENT}{at}  {old} {self.g.arrow} {new} {self.paint(tr.reason, GREY)}"
            # On a short terminal the oldest go first; the newest two stay with the timeline.
            age = len(shown) - 1 - index
            lines.append((1.0 if age < 2 else 2.0 + age / 10, text))
        if not transitions:
            lines.append((1, INDENT + self.paint("no transitions yet", GREY)))
        return lines

    def bulkhead_lines(self) -> list[Line]:
        bh = self.demo.bulkhead.snapshot()
        in_flight, queued = int(bh["in_flight"]), int(bh["queued"])
        return [
            (
                0,
                f"{self.label('BULKHEAD')}in flight {self.bar(in_flight, MAX_CONCURRENT, 6)} "
                f"{in_flight:>2}/{MAX_CONCURRENT}  queued {self.bar(queued, MAX_QUEUE, 6)} "
                f"{queued:>2}/{MAX_QUEUE}  "
                + self.counts([("rejected", int(bh["rejected"]))], RED)
                + f" {self.g.sep} "
                + self.counts([("waited", self.demo.tally.waited["bulkhead"])]),
            )
        ]

    def limiter_lines(self, final: bool) -> list[Line]:
        demo = self.demo
        rl = demo.limiter.snapshot()
        if final:
            what, rate = "average", int(rl["admitted"]) / max(demo.elapsed(), 1e-9)
        else:
            what, rate = "admitting", demo.admitted_rate()
        return [
            (
                0,
                f"{self.label('LIMITER')}{what} {self.paint(f'{rate:3.0f}/s', BOLD)} "
                f"{self.bar(rate, RATE, 8)} of {RATE:g}/s  "
                + self.counts([("rejected", int(rl["rejected"]))], RED)
                + f" {self.g.sep} "
                + self.counts([("waited", int(rl["waited"]))])
                + self.paint(f"   peak {demo.peak_rate:.0f}/s (burst {BURST})", GREY),
            )
        ]

    def outcome_lines(self) -> list[Line]:
        t = self.demo.tally
        rejected = [
            ("circuit open", t.rejected["circuit_open"]),
            ("rate limited", t.rejected["rate_limited"]),
            ("bulkhead full", t.rejected["bulkhead_full"]),
            ("bulkhead wait", t.rejected["bulkhead_wait_timeout"]),
        ]
        timeouts = [
            (f"attempt {ATTEMPT_TIMEOUT:g}s", t.timeouts["attempt"]),
            (f"checkout {TOTAL_TIMEOUT:g}s", t.timeouts["checkout"]),
        ]
        fallbacks = self.join(f"{name} {n}" for name, n in t.fallbacks.most_common())
        return [
            (0, f"{self.label('REJECTIONS')}{self.counts(rejected, RED)}"),
            (0, f"{self.label('TIMEOUTS')}{self.counts(timeouts, YELLOW)}"),
            (
                2,
                f"{self.label('FALLBACK')}used {self.num(sum(t.fallbacks.values()), YELLOW)}"
                + (self.paint(f"   on {fallbacks}", GREY) if fallbacks else ""),
            ),
        ]

    def health_lines(self) -> list[Line]:
        report = self.demo.registry.health()
        status = str(report["status"])
        word = self.paint(f"{self.g.dot} {status}", BOLD, STATUS_COLOURS[status])
        notes = [
            self.paint(f"{key} {check['status']}", STATUS_COLOURS[check["status"]])
            for key, (check,) in report["checks"].items()
            if check["status"] != "pass"
        ]
        return [(0, f"{self.label('HEALTH')}{word}   " + "  ".join(notes))]

    def timeline_lines(self) -> list[Line]:
        tl, g = self.demo.timeline, self.g
        upto = tl.column(self.demo.elapsed()) + 1
        pad = " " * (tl.columns - upto)
        levels = len(g.spark) - 1

        def spark(values: Sequence[float], top: float) -> str:
            return "".join(
                g.spark[0 if top <= 0 else math.ceil(min(values[i] / top, 1.0) * levels)]
                for i in range(upto)
            )

        # The scenario's own failure rate: the truth the breaker reacts to.
        phases = [phase_at((i + 0.5) / tl.columns) for i in range(upto)]
        gateway = "".join(
            self.paint(g.spark[math.ceil(p.failing * levels)], PHASE_COLOURS[p.name])
            for p in phases
        )
        glyph = {"closed": g.closed, "half_open": g.half_open, "open": g.open}
        breaker = "".join(
            self.paint(glyph[state], STATE_COLOURS[state]) for state in self.breaker_columns(upto)
        )
        top = max(*tl.ok, *tl.bad, 1)
        end = self.paint(f"{self.demo.settings.seconds:g}s", GREY)
        return [
            (1, f"{self.label('TIMELINE')}{self.paint('0s', GREY)}{' ' * (tl.columns - 2)}{end}"),
            (1, f"  {'gateway':<9}{gateway}{pad}" + self.paint("  503s and hangs", GREY)),
            (
                1,
                f"  {'breaker':<9}{breaker}{pad}"
                + self.paint(f"  {g.closed} closed {g.half_open} half-open {g.open} open", GREY),
            ),
            (1, f"  {'ok':<9}{self.paint(spark(tl.ok, top), GREEN)}{pad}"),
            (
                1,
                f"  {'not ok':<9}{self.paint(spark(tl.bad, top), YELLOW)}{pad}"
                + self.paint("  fallback or failed", GREY),
            ),
        ]

    def breaker_columns(self, upto: int) -> list[str]:
        """The state shown in each timeline column: half-open (a probe) over open over closed."""
        tl = self.demo.timeline
        rank = {"closed": 0, "open": 1, "half_open": 2}
        transitions = self.demo.tally.transitions
        shown: list[str] = []
        state, index = "closed", 0
        for column in range(upto):
            end = (column + 1) * tl.seconds / tl.columns
            seen = state
            while index < len(transitions) and transitions[index].at < end:
                state = transitions[index].new
                if rank[state] > rank[seen]:
                    seen = state
                index += 1
            shown.append(seen)
        return shown

    # -- whole views -----------------------------------------------------------------------

    def frame(self, final: bool = False) -> list[Line]:
        return [
            *self.header(final),
            *self.checkouts(final),
            self.rule(),
            *self.retry_lines(),
            *self.breaker_lines(final),
            *self.bulkhead_lines(),
            *self.limiter_lines(final),
            *self.outcome_lines(),
            *self.health_lines(),
            self.rule(),
            *self.timeline_lines(),
        ]

    def progress(self) -> str:
        """The plain one-line report printed every second when not on a terminal."""
        demo, out, t = self.demo, self.demo.outcomes, self.demo.tally
        bh = demo.bulkhead.snapshot()
        phase = "draining" if demo.stopping else demo.gateway.phase().name
        bulkhead = t.rejected["bulkhead_full"] + t.rejected["bulkhead_wait_timeout"]
        return (
            f"[{demo.elapsed():5.1f}s] {phase:<10} | checkouts {out.started}: ok {out.ok}, "
            f"declined {out.declined}, fallback {out.deferred}, failed {out.failed} | "
            f"retries {t.retries}, gave up {sum(t.gave_up.values())} | "
            f"breaker {demo.breaker.state} ({len(t.transitions)} transitions) | "
            f"rejected: circuit open {t.rejected['circuit_open']}, bulkhead {bulkhead}, "
            f"rate limited {t.rejected['rate_limited']}, timeouts {sum(t.timeouts.values())} | "
            f"in flight {bh['in_flight']}/{MAX_CONCURRENT}, queued {bh['queued']} | "
            f"admitted {demo.admitted_rate():.0f}/s of {RATE:g}/s"
        )

    # -- the payment saga ------------------------------------------------------------------

    def saga_status(self, status: str, spin: int | None = None) -> str:
        """A step's (or run's) status, padded and coloured; a spinner while it runs."""
        word = status.replace("_", " ") if status == "not_run" else status
        if spin is not None and status in ("running", "retrying"):
            word = f"{word} {self.g.spinner[spin % len(self.g.spinner)]}"
        colour = SAGA_COLOURS.get(status)
        return (self.paint(word, BOLD, colour) if colour else self.paint(word, GREY)) + " " * max(
            12 - len(word), 1
        )

    def step_row(
        self,
        at: float | None,
        name: str,
        status: str,
        *,
        attempts: int | None = None,
        took: float | None = None,
        detail: str = "",
        spin: int | None = None,
    ) -> str:
        """One line of a run's timeline: when, what, how long, how it ended, in how many
        attempts (the columns of :meth:`attempt_row` too)."""
        when = self.paint("      " if at is None else f"+{ms(max(at, 0.0)):>5}", CYAN)
        tries = "" if not attempts else f"{attempts} attempt{'s' if attempts > 1 else ''}"
        took_text = "" if took is None else ms(took)
        return (
            f"{INDENT}{when}  {name:<15} {took_text:>6}  {self.saga_status(status, spin)}"
            f"{tries:<11}{detail}"
        ).rstrip()

    def attempt_row(self, at: float, number: int, took: float, outcome: str) -> str:
        """One attempt of a step that took several, under the step's line."""
        label = f"  attempt {number}"
        return self.paint(
            f"{INDENT}+{ms(max(at, 0.0)):>5}  {label:<15} {ms(took):>6}  {outcome}", GREY
        )

    def saga_intro(self, checkout: Checkout) -> list[str]:
        g, saga = self.g, checkout.saga
        undo = ", ".join(
            f"{step.name} with {self.paint(UNDO[step.name], BOLD)}"
            for step in saga.all_steps
            if step.name in UNDO
        )
        return [
            self.paint(f"{g.rule * 3} payment saga {g.rule * 3}", BOLD, BLUE),
            f"{self.label('SAGA')}{self.paint(saga.name, BOLD)}: "
            + f" {g.arrow} ".join(step.name for step in saga.all_steps)
            + self.paint(f"   timeout {SAGA_TIMEOUT:g}s, input validated", GREY),
            f"{INDENT}compensate {undo}" + self.paint(" (newest first)", GREY),
            INDENT
            + self.paint(
                f"charge-card: {CHARGE_TIMEOUT:g}s per attempt, retry x{CHARGE_ATTEMPTS} on 503s "
                "and timeouts, a decline is permanent",
                GREY,
            ),
            f"{self.label('RUN LOG')}SQLiteStore {checkout.path}",
        ]

    def run_title(self, run: SagaRun) -> list[Line]:
        order, g = run.order, self.g
        items = ", ".join(f"{item} x{n}" for item, n in order["items"].items())
        facts = f" {g.sep} ".join(
            [
                f"order {order['order']}",
                items,
                f"${order['amount_cents'] / 100:,.2f}",
                order["card"],
                f"key {run.key}",
            ]
        )
        return [
            (0, f"{self.label(f'RUN {run.number}')}{self.paint(run.title, BOLD)}"),
            (2, INDENT + self.paint(facts, GREY)),
        ]

    def saga_live(self, run: SagaRun, watch: SagaWatch, spin: int) -> list[Line]:
        """A run in progress, as its events tell it."""
        now = time.monotonic()
        lines = self.run_title(run)
        undos: list[Line] = []
        for name, step in watch.steps.items():
            at = None if step.started is None else step.started - watch.started
            took = None if step.started is None else (step.ended or now) - step.started
            detail = ""
            if step.error:
                # While it retries, only the message: the line is full enough.
                failed = step.status == "failed"
                text = step.error if failed else step.error.partition(": ")[2] or step.error
                detail = self.paint(text, RED if failed else YELLOW)
            lines.append(
                (
                    1,
                    self.step_row(
                        at,
                        name,
                        step.status,
                        attempts=step.attempt,
                        took=took,
                        detail=detail,
                        spin=spin,
                    ),
                )
            )
            if step.undo_status is not None and step.undo_started is not None:
                undo_took = (step.undo_ended or now) - step.undo_started
                undos.append(
                    (
                        1,
                        self.step_row(
                            step.undo_started - watch.started,
                            f"{self.g.undo} {UNDO.get(name, name)}",
                            step.undo_status,
                            took=undo_took,
                            detail=self.paint(f"undoes {name}", GREY),
                            spin=spin,
                        ),
                    )
                )
        lines.extend(reversed(undos))  # compensations run newest first
        return lines

    def saga_run(self, run: SagaRun, first: SagaRun | None = None) -> list[Line]:
        """A finished run: its step timeline, its compensations, and its result."""
        result, g = run.result, self.g
        assert result is not None
        lines = self.run_title(run)
        if result.replayed:
            calls = run.calls_after - run.calls_before
            lines.append(
                (
                    1,
                    f"{INDENT}no step ran: the key's stored result came back "
                    + self.paint(f"({calls} calls to the services during this run)", GREY),
                )
            )
            stored = ", ".join(f"{step.name} {step.status}" for step in result.steps)
            lines.append((2, INDENT + self.paint(f"stored: {stored}", GREY)))
        else:
            lines.extend(self.timeline_rows(result, run.log or []))
        same = ""
        if first is not None and first.result is not None and result.replayed:
            same = " (same as run 1)" if first.result.run_id == result.run_id else " (NOT run 1's)"
        word = self.paint(f"{g.dot} {result.status}", BOLD, SAGA_COLOURS[result.status])
        facts = [word, f"compensated={result.compensated}", f"replayed={result.replayed}"]
        if not result.replayed:
            facts.append(f"took {ms(result.duration)}")
        lines.append((0, INDENT + self.join(facts)))
        lines.append((0, f"{INDENT}run_id={result.run_id}" + self.paint(same, BOLD)))
        if result.error is not None:
            lines.append((0, INDENT + "error " + self.paint(error_text(result.error), RED)))
        return lines

    def timeline_rows(self, result: SagaResult, log: Sequence[LogEntry]) -> list[Line]:
        """The steps (from the result) and the compensations (from the run log)."""
        starts = [step.started_at for step in result.steps if step.started_at is not None]
        starts += [entry.at for entry in log[:1]]
        zero = min(starts, default=0.0)
        rows: list[Line] = []
        for step in result.steps:
            at = None if step.started_at is None else step.started_at - zero
            if step.status == "failed" and step.error is not None:
                detail = self.paint(error_text(step.error), RED)
            elif step.status in ("compensated", "compensation_failed"):
                detail = self.paint(f"then undone by {UNDO.get(step.name, '?')}", GREY)
            else:
                detail = ""
            rows.append(
                (
                    1,
                    self.step_row(
                        at,
                        step.name,
                        step.status,
                        attempts=step.attempts,
                        took=step.duration,
                        detail=detail,
                    ),
                )
            )
            if len(step.history) > 1:  # each attempt, when there were several
                for number, attempt in enumerate(step.history, 1):
                    what = attempt.error or "ok"
                    rows.append(
                        (
                            2,
                            self.attempt_row(
                                attempt.started_at - zero, number, attempt.duration, what
                            ),
                        )
                    )
        started: dict[str, LogEntry] = {}
        for entry in log:  # compensations, in the order they ran
            if entry.event == "compensation_started":
                started[entry.step] = entry
            elif entry.event in ("compensated", "compensation_failed") and entry.step in started:
                begun = started[entry.step]
                detail = self.paint(f"undoes {entry.step}", GREY)
                if entry.error:
                    detail = self.paint(entry.error, RED) + "  " + detail
                rows.append(
                    (
                        1,
                        self.step_row(
                            begun.at - zero,
                            f"{self.g.undo} {UNDO.get(entry.step, entry.step)}",
                            entry.event,
                            attempts=entry.attempt or None,
                            took=entry.at - begun.at,
                            detail=detail,
                        ),
                    )
                )
        return rows

    def saga_outro(self, checkout: Checkout) -> list[str]:
        calls = checkout.shop.calls
        runs, entries = checkout.log_size()
        services = self.counts(
            (name, calls[name]) for name in ("reserve", "charge", "email", "release", "refund")
        )
        stock = ", ".join(f"{item} {n}" for item, n in checkout.shop.stock.items())
        failed = [run for run in checkout.runs if run.result and run.result.status == "failed"]
        command = f"python -m buttress runs --db {shell_quote(checkout.path)}"
        lines = [
            f"{self.label('SERVICES')}calls: {services}",
            INDENT
            + self.paint(f"stock left: {stock} (of {STOCK}: the declined items are back)", GREY),
            f"{self.label('RUN LOG')}{runs} runs, {entries} log entries "
            + self.paint("(the replay added none), kept after the demo:", GREY),
            f"{INDENT}{self.paint(f'{command} list', BOLD)}",
        ]
        if failed and failed[0].result is not None:
            show = f"{command} show {failed[0].result.run_id[:8]}"
            lines.append(f"{INDENT}{self.paint(show, BOLD)}")
        return lines

    def json_block(self, title: str, payload: dict[str, Any]) -> list[str]:
        text = json.dumps(payload, indent=2, default=str)
        lines = [self.paint(f"{self.g.rule * 3} {title} {self.g.rule * 3}", BOLD, BLUE)]
        if not self.colour:
            return [*lines, *text.splitlines()]
        for line in text.splitlines():
            keyed = re.sub(r'^(\s*)("[^"]*"):', lambda m: f"{m[1]}{self.paint(m[2], CYAN)}:", line)
            lines.append(
                re.sub(
                    r'"(pass|warn|fail)"',
                    lambda m: f'"{self.paint(m[1], BOLD, STATUS_COLOURS[m[1]])}"',
                    keyed,
                )
            )
        return lines


# -- the terminal ---------------------------------------------------------------------------


class Screen:
    """Writes frames: redrawn in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.height = 0

    def draw(self, lines: Sequence[Line], *, clip: bool = True) -> None:
        """Replace the previous frame by ``lines``, cut to the terminal's size if ``clip``."""
        size = shutil.get_terminal_size((100, 40))
        width = max(size.columns - 1, 20)
        if clip:
            texts = fit_height(lines, max(size.lines - 1, 5))
        else:
            texts = [text for _, text in lines]
        parts = []
        if self.height:
            parts.append(f"\x1b[{self.height}A\r")  # back to the top of the last frame
        parts.extend(f"{fit(text, width)}\x1b[K\n" for text in texts)
        parts.append("\x1b[J")  # and clear whatever the last frame left below
        self.stream.write("".join(parts))
        self.stream.flush()
        self.height = len(texts)

    def detach(self) -> None:
        """Leave the last frame where it is: the next :meth:`draw` starts below it."""
        self.height = 0

    def print(self, lines: Iterable[str] = ("",)) -> None:
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def __enter__(self) -> Screen:
        if self.live:
            self.stream.write("\x1b[?25l")  # hide the cursor while redrawing
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live:
            self.stream.write("\x1b[?25h")
            self.stream.flush()


# -- the timeline chart (``--plot``) --------------------------------------------------------

MATPLOTLIB_MISSING = (
    "--plot draws with matplotlib, which is not installed: "
    "pip install matplotlib  (or pip install 'buttress[bench]')"
)

# Colours of the chart (hex, as matplotlib takes them).
C_OK, C_WARN, C_BAD, C_INFO = "#2e7d32", "#f9a825", "#c62828", "#1565c0"
C_PURPLE, C_BROWN, C_GREY = "#6a1b9a", "#8d6e63", "#757575"
CHART_STATE = {"closed": "#a5d6a7", "half_open": "#ffe082", "open": "#ef9a9a"}
CHART_PHASE = {
    "healthy": "#c8e6c9",
    "degraded": "#fff59d",
    "outage": "#ffab91",
    "recovering": "#b3e5fc",
}
REJECTION_STYLE = (  # reason, label, colour
    ("circuit_open", "circuit open", C_BAD),
    ("rate_limited", "rate limited", C_PURPLE),
    ("bulkhead_full", "bulkhead full", C_BROWN),
    ("bulkhead_wait_timeout", "bulkhead wait timed out", "#bcaaa4"),
)


def matplotlib_available() -> bool:
    """Whether ``--plot`` can work (matplotlib is an optional, benchmark-only dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def breaker_spans(transitions: Sequence[Transition], end: float) -> list[tuple[float, float, str]]:
    """The breaker's states as ``(start, stop, state)`` spans from 0 to ``end`` seconds."""
    spans: list[tuple[float, float, str]] = []
    state, since = "closed", 0.0
    for tr in transitions:
        at = min(max(tr.at, 0.0), end)
        if at > since:
            spans.append((since, at, state))
        state, since = tr.new, max(at, since)
    if end > since:
        spans.append((since, end, state))
    return spans


def per_second(times: Iterable[float], edges: Sequence[float]) -> list[float]:
    """How many of ``times`` fall in each bin between ``edges``, per second."""
    counts = [0] * (len(edges) - 1)
    first, width = edges[0], edges[1] - edges[0]
    for at in times:
        index = int((at - first) // width)
        if 0 <= index < len(counts):
            counts[index] += 1
    return [n / width for n in counts]


def _sampled_rate(log: Sequence[tuple[float, int]], edges: Sequence[float]) -> list[float]:
    """Rates per bin from a cumulative counter sampled now and then (step interpolation)."""
    values, index, last = [], 0, 0
    for edge in edges:
        while index < len(log) and log[index][0] <= edge:
            last = log[index][1]
            index += 1
        values.append(last)
    width = edges[1] - edges[0]
    return [(b - a) / width for a, b in itertools.pairwise(values)]


def _rolling(
    points: Sequence[tuple[float, float]], edges: Sequence[float], q: float
) -> list[float]:
    """The ``q`` quantile of the values in each bin (NaN where a bin is empty)."""
    bins: list[list[float]] = [[] for _ in range(len(edges) - 1)]
    first, width = edges[0], edges[1] - edges[0]
    for at, value in points:
        index = int((at - first) // width)
        if 0 <= index < len(bins):
            bins[index].append(value)
    return [percentile(b, q) or math.nan for b in bins]


def _level(
    ax: Any, y: float, label: str, color: str, *, ls: str, rise: float, alpha: float | None = None
) -> None:
    """A horizontal reference line across ``ax`` at ``y``, labelled at its left end."""
    ax.axhline(y, color=color, lw=1, ls=ls, alpha=alpha)
    ax.annotate(
        label,
        (0.0, y),
        xytext=(4, rise),
        textcoords="offset points",
        color=color,
        fontsize=8,
        va="bottom",
    )


def plot_timeline(demo: Demo, path: str) -> None:
    """Draw one run of the demo as a PNG timeline: gateway and breaker state, throughput,
    retries and rejections, latency. Needs matplotlib (imported here, not before)."""
    import platform

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    settings, tally = demo.settings, demo.tally
    end = max([settings.seconds, *(at for at, _, _ in demo.finished)])
    width = max(settings.seconds / 40, 0.1)
    edges = [i * width for i in range(math.ceil(end / width) + 1)]
    mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    spans = breaker_spans(tally.transitions, end)

    fig, axes = plt.subplots(
        4,
        1,
        figsize=(12, 9.6),
        sharex=True,
        gridspec_kw={"height_ratios": [0.75, 2, 1.6, 2]},
        layout="constrained",
    )
    strip, flow, trouble, latency = axes
    story = " \u2192 ".join(dict.fromkeys(p.name for p in PHASES))
    fig.suptitle(
        f"buttress demo: {settings.callers} callers check out against a payment gateway "
        f"that degrades, goes down and recovers\n"
        f"gateway {story}; {settings.seconds:g} s, seed {settings.seed}",
        fontsize=13,
        fontweight="bold",
    )

    # Gateway phases (the scenario) over breaker states (what buttress did about it).
    start = 0.0
    for phase in PHASES:
        stop = phase.until * settings.seconds
        strip.axvspan(start, stop, 0.52, 1.0, color=CHART_PHASE[phase.name], lw=0)
        strip.text(
            (start + stop) / 2,
            1.5,
            f"{phase.name}\n{phase.failing:.0%} fail",
            ha="center",
            va="center",
            fontsize=8.5,
        )
        start = stop
    strip.axvspan(settings.seconds, end, 0.52, 1.0, color="#eeeeee", lw=0)
    for left, right, state in spans:
        strip.axvspan(left, right, 0.0, 0.48, color=CHART_STATE[state], lw=0)
    opened = sum(1 for tr in tally.transitions if tr.new == "open")
    strip.set_ylim(0, 2)
    strip.set_yticks([0.5, 1.5], ["breaker", "gateway"])
    strip.tick_params(axis="y", length=0)
    strip.set_title(
        f"The gateway's health, and the circuit breaker's state (opened {opened} times: at "
        f"{demo.breaker.failure_rate:.0%} failures; probes after {demo.breaker.reset_timeout:g} s)",
        loc="left",
        fontsize=10,
    )
    strip.legend(
        handles=[
            Patch(color=CHART_STATE["closed"], label="closed"),
            Patch(color=CHART_STATE["half_open"], label="half-open"),
            Patch(color=CHART_STATE["open"], label="open"),
        ],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=3,
        fontsize=8,
        frameon=False,
    )

    # The breaker's open and half-open spells, faintly, behind every other panel.
    for ax in (flow, trouble, latency):
        for left, right, state in spans:
            if state != "closed":
                ax.axvspan(left, right, color=CHART_STATE[state], alpha=0.35, lw=0)
        ax.axvline(settings.seconds, color=C_GREY, lw=1, ls=":")
        ax.grid(axis="y", alpha=0.3)
    latency.text(
        settings.seconds,
        0.02,
        "callers stop ",
        transform=latency.get_xaxis_transform(),
        fontsize=7.5,
        color=C_GREY,
        ha="right",
        va="bottom",
    )

    # Throughput.
    by_outcome: dict[str, list[float]] = {}
    for at, _, outcome in demo.finished:
        by_outcome.setdefault(outcome, []).append(at)
    flow.plot(
        mids,
        _sampled_rate(demo.admission_log, edges),
        color=C_INFO,
        lw=1.8,
        label="gateway calls admitted by the rate limiter",
    )
    flow.plot(
        mids,
        per_second(by_outcome.get("ok", []) + by_outcome.get("declined", []), edges),
        color=C_OK,
        lw=1.8,
        label="checkouts answered (charged or declined)",
    )
    flow.plot(
        mids,
        per_second(by_outcome.get("fallback", []), edges),
        color=C_WARN,
        lw=1.8,
        label="checkouts deferred by the fallback",
    )
    failed = by_outcome.get("failed", [])
    if failed:
        flow.plot(mids, per_second(failed, edges), color=C_BAD, lw=1.5, label="checkouts failed")
    _level(flow, RATE, f"limiter rate {RATE:g}/s", C_INFO, ls="--", alpha=0.7, rise=3)
    flow.set_ylabel("per second")
    flow.set_ylim(bottom=0)
    flow.set_title("Throughput", loc="left", fontsize=10)
    flow.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=2, frameon=False)

    # Retries, timeouts and rejections.
    kinds: dict[str, list[float]] = {}
    for at, what in tally.marks:
        kinds.setdefault(what, []).append(at)
    bottom = [0.0] * len(mids)
    for reason, label, colour in REJECTION_STYLE:
        rates = per_second(kinds.get(f"rejected:{reason}", []), edges)
        if any(rates):
            total = len(kinds.get(f"rejected:{reason}", []))
            trouble.bar(
                mids,
                rates,
                width * 0.9,
                bottom=bottom,
                color=colour,
                alpha=0.75,
                label=f"rejected: {label} ({total:,})",
            )
            bottom = [b + r for b, r in zip(bottom, rates, strict=True)]
    trouble.plot(
        mids,
        per_second(kinds.get("retry", []), edges),
        color=C_INFO,
        lw=1.8,
        label=f"retries ({len(kinds.get('retry', [])):,})",
    )
    timeouts = kinds.get("timeout:attempt", [])
    trouble.plot(
        mids,
        per_second(timeouts, edges),
        color="black",
        lw=1.2,
        ls="--",
        label=f"attempts timed out after {ATTEMPT_TIMEOUT:g} s ({len(timeouts):,})",
    )
    trouble.set_ylabel("per second")
    trouble.set_ylim(bottom=0)
    trouble.set_title("Retries, timeouts and rejections", loc="left", fontsize=10)
    trouble.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3, frameon=False)

    # Latency of the checkouts, as the callers saw it.
    colours = {"ok": C_OK, "declined": C_OK, "fallback": C_WARN, "failed": C_BAD}
    for outcome, label in (
        ("ok", "answered"),
        ("fallback", "deferred by the fallback"),
        ("failed", "failed"),
    ):
        points = [
            (at, took * 1000) for at, took, o in demo.finished if colours[o] == colours[outcome]
        ]
        if points:
            latency.scatter(
                [at for at, _ in points],
                [took for _, took in points],
                s=6,
                color=colours[outcome],
                alpha=0.35,
                lw=0,
                label=label,
            )
    answered = [(at, took * 1000) for at, took, o in demo.finished if o in ("ok", "declined")]
    latency.plot(mids, _rolling(answered, edges, 0.5), color="black", lw=1.6, label="p50 answered")
    latency.plot(
        mids, _rolling(answered, edges, 0.95), color="black", lw=1.2, ls="--", label="p95 answered"
    )
    limit_ms = TOTAL_TIMEOUT * 1000
    _level(latency, limit_ms, f"checkout timeout {limit_ms:.0f} ms", C_BAD, ls=":", rise=2)
    latency.set_yscale("log")
    latency.set_ylim(top=TOTAL_TIMEOUT * 1000 * 4)
    latency.set_ylabel("checkout latency (ms, log scale)")
    latency.set_title("Checkout latency", loc="left", fontsize=10)
    legend = latency.legend(
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        ncol=5,
        frameon=False,
        markerscale=2.5,
    )
    for handle in legend.legend_handles:
        if handle is not None:
            handle.set_alpha(1.0)
    fast = [at for at, took, o in demo.finished if o == "fallback" and took < 0.005]
    if fast:
        latency.text(
            sum(fast) / len(fast),
            0.02,
            "the open breaker fails fast: the fallback answers in well under a millisecond",
            transform=latency.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="#8a6d00",
        )
    latency.set_xlim(0, end)
    latency.set_xlabel("seconds into the run")

    from . import __version__

    fig.supxlabel(
        f"buttress {__version__}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}; pipeline: "
        f"fallback \u2192 timeout {TOTAL_TIMEOUT:g} s \u2192 retry x{ATTEMPTS} \u2192 breaker "
        f"\u2192 bulkhead {MAX_CONCURRENT}+{MAX_QUEUE} \u2192 limiter {RATE:g}/s \u2192 "
        f"timeout {ATTEMPT_TIMEOUT:g} s \u2192 gateway",
        x=0.995,
        ha="right",
        fontsize=7.5,
        color=C_GREY,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def _main(settings: Settings, stream: TextIO) -> int:
    # Room for the labels and legends of the timeline on the terminal (not wider than 64).
    columns = min(max(shutil.get_terminal_size((100, 40)).columns - 41, 20), 64)
    demo = Demo(settings, columns)
    view = View(demo, settings.colour, pick_glyphs(stream))
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        handles_sigint = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        handles_sigint = False

    every = 0.125 if settings.colour else 1.0  # seconds between frames or progress lines
    # Checkouts still running when time is up may finish; none takes longer than this.
    drain_limit = TOTAL_TIMEOUT + 0.5
    with Screen(stream, live=settings.colour) as screen:
        if not settings.colour:
            screen.print(
                [
                    f"buttress demo: {settings.callers} callers, {settings.seconds:g}s, "
                    f"seed {settings.seed}, then a payment saga (a terminal shows a live view)",
                ]
            )
        tasks = [asyncio.create_task(demo.caller()) for _ in range(settings.callers)]
        next_frame = demo.started + every
        try:
            while True:
                now = time.monotonic()
                if now - demo.started >= settings.seconds or interrupted.is_set():
                    demo.stopping = True
                if demo.stopping and (
                    demo.outcomes.in_progress == 0
                    or now - demo.started >= settings.seconds + drain_limit
                ):
                    break  # callers between checkouts start no new one: they can go
                demo.sample()
                if now >= next_frame:
                    if settings.colour:
                        screen.draw(view.frame())
                    else:
                        screen.print([view.progress()])
                    next_frame += every
                with contextlib.suppress(asyncio.TimeoutError):  # woken early by Ctrl-C
                    await asyncio.wait_for(interrupted.wait(), timeout=0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        demo.sample()
        if settings.colour:
            screen.draw(view.frame(final=True), clip=False)
        else:
            screen.print(["", *(text for _, text in view.frame(final=True))])
        if settings.plot is not None:
            try:
                plot_timeline(demo, settings.plot)
            except OSError as exc:
                screen.print(["", f"(no timeline chart: cannot write {settings.plot}: {exc})"])
            else:
                screen.print(["", f"timeline chart written to {settings.plot}"])
        checkout = None
        if not interrupted.is_set():
            try:
                checkout = Checkout(settings, demo.registry)
            except (OSError, BackendError) as exc:  # no writable temporary directory
                screen.print(["", f"(no payment saga: cannot create its run log: {exc})"])
        try:
            if checkout is not None:
                await _play_saga(checkout, view, screen, interrupted)
                # health() reads a cached look at the run log (it never queries it
                # itself); refresh it now, as a recovery worker does on each pass.
                await checkout.saga.refresh_health_async()
            screen.print(["", *view.json_block("registry.health()", demo.registry.health())])
            screen.print(["", *view.json_block("registry.state()", demo.registry.state())])
            if checkout is not None:
                command = f"python -m buttress runs --db {shell_quote(checkout.path)} list"
                screen.print(["", f"the saga's run log is kept: {view.paint(command, BOLD)}"])
        finally:
            if checkout is not None:
                checkout.close()
            if handles_sigint:  # kept until now: Ctrl-C in the saga ends it between runs
                loop.remove_signal_handler(signal.SIGINT)
    return 130 if interrupted.is_set() else 0


async def _play_saga(
    checkout: Checkout, view: View, screen: Screen, interrupted: asyncio.Event
) -> None:
    """The saga section: three runs, each drawn live (terminal) or printed when done."""
    screen.print(["", *view.saga_intro(checkout)])
    first = checkout.runs[0]
    for index, run in enumerate(checkout.runs):
        if interrupted.is_set():
            break
        screen.print([""])
        if not view.colour:
            await checkout.play(run)
            screen.print(text for _, text in view.saga_run(run, first))
            continue
        if index:
            with contextlib.suppress(asyncio.TimeoutError):  # a pause to follow along
                await asyncio.wait_for(interrupted.wait(), timeout=SAGA_PAUSE)
        screen.detach()
        checkout.watch.reset()  # before the first frame, which comes before the run starts
        task = asyncio.create_task(checkout.play(run))
        spin = 0
        while not task.done():
            screen.draw(view.saga_live(run, checkout.watch, spin))
            spin += 1
            await asyncio.wait({task}, timeout=0.06)
        await task
        screen.draw(view.saga_run(run, first), clip=False)
        screen.detach()
    screen.print(["", *view.saga_outro(checkout)])


def colour_wanted(stream: TextIO, no_color: bool) -> bool:
    """Colours and a live view only on a terminal, and never when asked not to."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    if sys.platform == "win32" and not (os.environ.get("WT_SESSION") or os.environ.get("TERM")):
        return False  # the classic console prints escape codes as text
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run(settings: Settings, stream: TextIO | None = None) -> int:
    """Run the demo to ``stream`` (default stdout); returns the exit status."""
    out = sys.stdout if stream is None else stream
    # Backoff jitter draws from the module-level random generator.
    random.seed(settings.seed)
    try:
        return asyncio.run(_main(settings, out))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, without a traceback on exit.
        if stream is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
