"""The payment saga: reserve-stock -> charge-card -> send-email, with release-stock and
refund as compensations, on a SQLite run log; watched live from the saga's events.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from buttress import events
from buttress.backends import LogEntry
from buttress.backends.sqlite import SQLiteStore
from buttress.backoff import exponential
from buttress.demo.scenario import CardDeclined, GatewayError, Settings
from buttress.exceptions import (
    TimeoutExceeded,
)
from buttress.registry import Registry
from buttress.retry import Retry, retry
from buttress.saga import Context, Saga, SagaResult, StoredError

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
