"""buttress.telemetry.logging: events as log records, with stdlib logging and structlog."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

import buttress
from buttress import Bulkhead, CircuitBreaker, CircuitOpenError, RateLimiter, Saga, events, retry
from buttress.telemetry import Installation
from buttress.telemetry import logging as blog
from buttress.testing import FakeClock


class Records(logging.Handler):
    """Keeps every record it handles."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def kinds(self) -> list[str]:
        return [record.buttress_event for record in self.records]  # type: ignore[attr-defined]


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A DEBUG logger of its own that does not propagate."""
    log = logging.getLogger(f"tests.telemetry.{id(object())}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers.clear()


@pytest.fixture
def records(logger: logging.Logger) -> Records:
    """The records logged on ``logger``."""
    handler = Records()
    logger.addHandler(handler)
    return handler


FILLERS: dict[str, object] = {"float": 1.0, "int": 1, "bool": False, "BaseException": OSError()}


def every_event() -> list[events.Event]:
    """One instance of each concrete event type, with plausible fields."""
    values: dict[str, Any] = {
        "attempt": 2,
        "attempts": 3,
        "delay": 0.5,
        "error": ConnectionError("down"),
        "reason": "attempts",
        "old": "closed",
        "new": "open",
        "retry_after": 1.0,
        "waited": 0.25,
        "timeout": 2.0,
        "run_id": "r1",
        "step": "charge",
        "key": "k",
        "status": "completed",
        "duration": 1.5,
    }
    out = []
    for name in events.__all__:
        cls = getattr(events, name)
        if not (isinstance(cls, type) and issubclass(cls, events.Event)):
            continue
        if cls in (events.Event, events.SagaEvent):
            continue
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in ("source", "name", "time"):
                continue
            if field.name in values:
                value = values[field.name]
                if issubclass(cls, events.SagaEvent) and field.name == "error":
                    value = "ConnectionError: down"
            else:  # a field this test does not know yet: a value of its declared type
                annotation = str(field.type)
                value = next((v for t, v in FILLERS.items() if annotation.startswith(t)), "unknown")
            kwargs[field.name] = value
        source = "saga" if issubclass(cls, events.SagaEvent) else "retry"
        out.append(cls(source=source, name="payments", time=0.0, **kwargs))
    return out


def test_every_event_kind_has_a_message_and_a_level(logger, records):
    """Each event type logs a readable message (no generic fallback) at a level."""
    listener = blog.LoggingListener(logger)
    samples = every_event()
    assert len(samples) >= 20
    for event in samples:
        listener(event)
    for event, record in zip(samples, records.records, strict=True):
        assert record.getMessage().startswith(f"{event.source} 'payments': ")
        assert record.getMessage() != f"{event.source} 'payments': {event.kind}", event.kind
        assert record.levelno == listener.level_of(event)


@pytest.mark.parametrize(
    ("kind", "level"),
    [
        ("retry_scheduled", logging.INFO),
        ("retry_recovered", logging.INFO),
        ("retry_gave_up", logging.ERROR),
        ("circuit_state_changed", logging.WARNING),
        ("call_rejected", logging.WARNING),
        ("timeout_fired", logging.WARNING),
        ("acquired_after_wait", logging.DEBUG),
        ("hedge_launched", logging.DEBUG),
        ("step_started", logging.DEBUG),
        ("step_failed", logging.WARNING),
        ("run_failed", logging.WARNING),
        ("compensation_failed", logging.ERROR),
    ],
)
def test_default_levels(kind, level):
    """Rejections and state changes WARNING, retries INFO, waits DEBUG, give-ups ERROR."""
    listener = blog.LoggingListener()
    (event,) = [event for event in every_event() if event.kind == kind]
    assert listener.level_of(event) == level


def test_levels_override(logger, records):
    """levels= maps event kinds to other levels."""
    listener = blog.LoggingListener(logger, levels={"retry_gave_up": logging.WARNING})
    (event,) = [event for event in every_event() if event.kind == "retry_gave_up"]
    listener(event)
    assert records.records[0].levelno == logging.WARNING


def test_structured_extra_fields_from_a_real_retry(face, flaky, logger, records):
    """A retried call logs its retries with the attempt, delay and error as fields."""
    clock = FakeClock()
    policy = retry(
        3, backoff=[0.5], name="payments", listeners=[blog.LoggingListener(logger)], clock=clock
    )
    assert face.wrap(policy, flaky(ConnectionError("down")))() == "ok"
    assert records.kinds() == ["retry_scheduled", "retry_recovered"]
    scheduled = records.records[0].__dict__
    assert scheduled["buttress_primitive"] == "retry"
    assert scheduled["buttress_name"] == "payments"
    assert scheduled["buttress_attempt"] == 1
    assert scheduled["buttress_delay"] == 0.5
    assert scheduled["buttress_error"] == "ConnectionError: down"
    assert records.records[0].levelno == logging.INFO
    assert records.records[0].getMessage() == (
        "retry 'payments': attempt 1 failed (ConnectionError: down); retrying in 0.5s"
    )


def test_breaker_fields_name_the_states(logger, records):
    """A state change has buttress_state and buttress_previous_state."""
    breaker = CircuitBreaker(
        "pricing", failure_threshold=1, listeners=[blog.LoggingListener(logger)]
    )

    @breaker
    def price() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        price()
    with pytest.raises(CircuitOpenError):
        price()
    changed, rejected = records.records
    assert changed.__dict__["buttress_state"] == "open"
    assert changed.__dict__["buttress_previous_state"] == "closed"
    assert changed.__dict__["buttress_reason"] == "failure threshold reached"
    assert changed.levelno == logging.WARNING
    assert rejected.__dict__["buttress_event"] == "call_rejected"
    assert rejected.__dict__["buttress_reason"] == "circuit_open"
    assert rejected.getMessage() == "circuit_breaker 'pricing': call rejected (circuit_open)"


def test_install_logs_every_primitive_until_uninstalled(logger, records):
    """install() subscribes globally; the handle uninstalls (also as a context manager)."""
    clock = FakeClock()
    limiter = RateLimiter("partner", rate=1, per=10, max_wait=0, clock=clock)
    limiter.acquire()
    handle = blog.install(logger)
    assert isinstance(handle, Installation)
    with pytest.raises(buttress.RateLimited):
        limiter.acquire()
    handle.uninstall()
    with pytest.raises(buttress.RateLimited):
        limiter.acquire()
    assert records.kinds() == ["call_rejected"]
    with blog.install(logger), pytest.raises(buttress.RateLimited):
        limiter.acquire()
    assert records.kinds() == ["call_rejected", "call_rejected"]
    assert "logging" in repr(handle) and "uninstalled" in repr(handle)


def test_install_by_logger_name(records, logger):
    """A logger name works as well as a logger (the default is "buttress")."""
    listener = blog.LoggingListener(logger.name)
    assert listener.logger is logger
    assert blog.LoggingListener().logger is logging.getLogger("buttress")
    assert logger.name in repr(listener)


def test_disabled_levels_build_nothing(logger, records, monkeypatch):
    """Below the logger's level, the event is not even turned into a dict."""
    logger.setLevel(logging.WARNING)
    listener = blog.LoggingListener(logger)
    (event,) = [event for event in every_event() if event.kind == "retry_scheduled"]

    def explode(self: object) -> dict[str, object]:
        raise AssertionError("to_dict called for a disabled level")

    monkeypatch.setattr(events.RetryScheduled, "to_dict", explode)
    listener(event)
    assert records.records == []


def test_saga_events_carry_run_and_step(logger, records):
    """Saga runs log their run id and step names."""
    saga = Saga("checkout", listeners=[blog.LoggingListener(logger)])

    @saga.step("reserve")
    def reserve(ctx: Any) -> str:
        return "held"

    result = saga.run({})
    assert records.kinds() == ["run_started", "step_started", "step_completed", "run_completed"]
    step = records.records[2].__dict__
    assert step["buttress_run_id"] == result.run_id
    assert step["buttress_step"] == "reserve"
    assert step["buttress_attempts"] == 1


def test_validation():
    """Bad arguments are rejected with the parameter named."""
    with pytest.raises(buttress.ConfigTypeError, match="logger must be"):
        blog.LoggingListener(42)  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigTypeError, match="logger must be"):
        blog.LoggingListener(logging.LoggerAdapter(logging.getLogger("x")))  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigValueError, match=r"levels\['retry_gave_up'\]"):
        blog.LoggingListener(levels={"retry_gave_up": -1})
    with pytest.raises(buttress.ConfigTypeError, match="levels must be a mapping"):
        blog.LoggingListener(levels=[("retry_gave_up", 10)])  # type: ignore[arg-type]
    with pytest.raises(buttress.ConfigTypeError, match="prefix must be a string"):
        blog.LoggingListener(prefix=None)  # type: ignore[arg-type]


def test_custom_prefix(logger, records):
    """prefix= changes the extra keys."""
    listener = blog.LoggingListener(logger, prefix="resilience.")
    Bulkhead("pool", max_concurrent=1, listeners=[listener]).emit(
        events.CallRejected, reason="bulkhead_full", retry_after=None
    )
    assert records.records[0].__dict__["resilience.event"] == "call_rejected"


def test_structlog_renders_the_fields_as_key_values(logger):
    """Through structlog's ProcessorFormatter the extra fields come out as keys."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(sort_keys=True),
            ],
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.ExtraAdder()],
        )
    )
    logger.addHandler(handler)
    clock = FakeClock()
    breaker = CircuitBreaker("pricing", failure_threshold=1, clock=clock)

    @retry(2, on=TimeoutError, backoff=[0.5], clock=clock, name="pricing")
    @breaker
    def price() -> None:
        raise TimeoutError("slow")

    with blog.install(logger), pytest.raises(CircuitOpenError):
        price()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["buttress_event"] for line in lines] == [
        "circuit_state_changed",
        "retry_scheduled",
        "call_rejected",
    ]
    changed, scheduled, rejected = lines
    assert changed["level"] == "warning"
    assert changed["buttress_state"] == "open"
    assert (
        changed["event"]
        == "circuit_breaker 'pricing': circuit closed -> open (failure threshold reached)"
    )
    assert scheduled["level"] == "info"
    assert scheduled["buttress_attempt"] == 1
    assert scheduled["buttress_error"] == "TimeoutError: slow"
    assert rejected["buttress_primitive"] == "circuit_breaker"
    assert rejected["buttress_name"] == "pricing"
