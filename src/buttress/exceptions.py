"""Every error buttress raises.

The hierarchy::

    ButtressError
    ├── ConfigError                 a policy was built with a bad option
    │   ├── ConfigTypeError         (also a TypeError)
    │   └── ConfigValueError        (also a ValueError)
    ├── DuplicateNameError          (also a ValueError) that kind and name are taken
    ├── RejectedError               the call never ran; ``retry_after`` says when to retry
    │   ├── CircuitOpenError        the circuit breaker is open (or its half-open probes are taken)
    │   ├── BulkheadFull            no slot and no room (or no time) to queue for one
    │   ├── RateLimited             no permit within ``max_wait`` or the enclosing deadline
    │   └── SagaClosed              the saga is shutting down and starts no new run
    ├── TimeoutExceeded             (also the built-in TimeoutError) the call ran too long
    ├── RetryExhausted              every result was rejected by ``retry_if_result``
    ├── Permanent                   raised by a step (or wrapping its error): never retry
    ├── TryAgain                    raised by a retried function to ask for another attempt
    ├── IdempotencyConflict         a saga key is taken by another input or needs an operator
    ├── SagaError                   a saga run could not go on as asked
    │   ├── WaitTimedOut            (also a TimeoutError) ``ctx.wait_for`` passed its deadline
    │   ├── RunCancelled            the run was cancelled (``Saga.cancel``, ``runs cancel``)
    │   ├── ChildFailed             a child saga's run failed (its report is ``.result``)
    │   └── VersionMismatch         (also a ValueError) the run started under a saga version
    │                               this code does not define
    ├── BackendError                a store (SQLite, Redis, PostgreSQL) failed
    │   └── BackendUnavailable      (also a RejectedError) the shared backend is down and the
    │                               primitive fails closed: the call was not run
    └── LoopBlockingWarning         (also a RuntimeWarning) a blocking call on a thread whose
                                    event loop is running; a warning unless filters make it an error

A retry that runs out of attempts because of exceptions re-raises the *last exception itself*,
unchanged, with a note saying how many attempts were made; it never wraps it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BulkheadFull",
    "ButtressError",
    "ChildFailed",
    "CircuitOpenError",
    "ConfigError",
    "ConfigTypeError",
    "ConfigValueError",
    "DuplicateNameError",
    "IdempotencyConflict",
    "LoopBlockingWarning",
    "Permanent",
    "RateLimited",
    "RejectedError",
    "RetryExhausted",
    "RunCancelled",
    "SagaClosed",
    "SagaError",
    "TimeoutExceeded",
    "TryAgain",
    "VersionMismatch",
    "WaitTimedOut",
]


def _rebuild(cls: type[ButtressError], args: tuple[object, ...]) -> ButtressError:
    """Unpickle an error without calling its ``__init__`` (its attributes follow)."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class ButtressError(Exception):
    """Base class of every error raised by buttress.

    Every buttress error survives a pickle round-trip (process pools and task queues
    ship exceptions between processes), keyword-only attributes and notes included.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds by calling cls(*args), which fails for errors whose
        # __init__ takes required keyword-only arguments (RetryExhausted's result=).
        slots = {
            name: getattr(self, name)
            for cls in type(self).__mro__
            for name in cls.__dict__.get("__slots__", ())
            if hasattr(self, name)
        }
        # BaseException.__setstate__ sets every key with setattr: slots included.
        return (_rebuild, (type(self), self.args), {**self.__dict__, **slots} or None)


class ConfigError(ButtressError):
    """A policy option was rejected when the policy was built."""


class ConfigTypeError(ConfigError, TypeError):
    """An option had the wrong type (the message names the parameter and the value)."""


class ConfigValueError(ConfigError, ValueError):
    """An option was out of range (the message names the parameter and the value)."""


class DuplicateNameError(ButtressError, ValueError):
    """A live primitive of the same kind is already registered under that name."""


class RejectedError(ButtressError):
    """The protected call was not run.

    Attributes:
        retry_after: seconds after which trying again may succeed, or ``None`` when unknown.
        name: the name of the primitive that rejected the call, if it has one.
        reason: why, in one word (``"circuit_open"``, ``"bulkhead_full"``,
            ``"bulkhead_wait_timeout"``, ``"rate_limited"``, ``"backend_unavailable"``...);
            the same word as the ``reason`` of the :class:`~buttress.events.CallRejected`
            event.
    """

    # Rejections are what a service raises most during an outage, so building one stays
    # cheap: two slots instead of an instance dict, and no call to the base __init__
    # (BaseException.__new__ already stored the message as ``args``).
    __slots__ = ("name", "retry_after")

    reason: str = "rejected"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        name: str | None = None,
        reason: str | None = None,
    ) -> None:
        args = self.args
        if len(args) != 1 or args[0] is not message:  # given by keyword, or by a subclass
            self.args = (message,)
        self.retry_after = retry_after
        self.name = name
        if reason is not None:
            self.reason = reason


class CircuitOpenError(RejectedError):
    """The circuit breaker is open, or half-open with every probe slot taken."""

    reason = "circuit_open"


class BulkheadFull(RejectedError):
    """The bulkhead had no free slot and the call could not queue (``reason``
    ``"bulkhead_full"``) or waited too long (``"bulkhead_wait_timeout"``)."""

    reason = "bulkhead_full"


class SagaClosed(RejectedError):
    """The saga is shutting down (``Saga.shutdown()``): it starts no new run."""

    reason = "saga_closed"


class RateLimited(RejectedError):
    """The rate limiter could not admit the call within ``max_wait`` or the deadline."""

    reason = "rate_limited"


class TimeoutExceeded(ButtressError, TimeoutError):
    """The call ran longer than its timeout.

    Attributes:
        timeout: the timeout in seconds that was exceeded.
    """

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class RetryExhausted(ButtressError):
    """Every attempt returned a result that ``retry_if_result`` asked to retry.

    Attributes:
        result: the result of the last attempt.
        attempts: how many attempts were made.
    """

    def __init__(self, message: str, *, result: object, attempts: int) -> None:
        super().__init__(message)
        self.result = result
        self.attempts = attempts


class Permanent(ButtressError):
    """A failure that retrying cannot fix: no retry policy retries it.

    Raise it from a step (``raise Permanent("card declined") from exc``) to fail the
    step at once. ``error`` holds the wrapped exception, if any.
    """

    def __init__(self, message: str = "", *, error: BaseException | None = None) -> None:
        super().__init__(message or (str(error) if error is not None else "permanent failure"))
        self.error = error


class TryAgain(ButtressError):
    """Raised by a function under :func:`~buttress.retry` to ask for another attempt.

    It is retried whatever the policy's ``on=`` says (the function asked for it), within
    the same attempts, deadline and budget; when those run out, it propagates like any
    last error. ``retry_after`` (seconds) lengthens the wait before the next attempt.
    """

    def __init__(self, message: str = "", *, retry_after: float | timedelta | None = None) -> None:
        super().__init__(message or "try again")
        self.retry_after: float | None = (
            retry_after.total_seconds() if isinstance(retry_after, timedelta) else retry_after
        )


class IdempotencyConflict(ButtressError):
    """An idempotency key is already bound to a different input, or its run is stuck in
    ``compensation_failed`` and needs an operator before the key can run again.

    Attributes:
        key: the idempotency key.
        run_id: the run that holds it.
    """

    def __init__(self, message: str, *, key: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.run_id = run_id


class SagaError(ButtressError):
    """A saga run could not go on as asked (see the subclasses)."""


class WaitTimedOut(SagaError, TimeoutError):
    """``ctx.wait_for(name)`` passed its deadline before the signal arrived.

    Attributes:
        signal: the signal waited for.
        deadline: the absolute deadline that passed (epoch seconds).

    A step that does not catch it fails without retrying (waiting again would only time
    out again), so the saga compensates.
    """

    def __init__(self, message: str, *, signal: str = "", deadline: float | None = None) -> None:
        super().__init__(message)
        self.signal = signal
        self.deadline = deadline


class RunCancelled(SagaError):
    """The run was cancelled (``Saga.cancel`` or ``python -m buttress runs cancel``); it
    compensates what completed."""


class ChildFailed(SagaError):
    """A child saga's run failed (and compensated); ``result`` is its report."""

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class VersionMismatch(SagaError, ValueError):
    """A run was recorded under a version of its saga that this code does not define.

    Attributes:
        run_id: the run.
        run_version: the version it started under.
        versions: the versions this code defines for the saga, newest first.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        run_version: str = "",
        versions: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.run_version = run_version
        self.versions = versions


class BackendError(ButtressError):
    """A backing store failed; the original error is chained as ``__cause__``."""


class BackendUnavailable(BackendError, RejectedError):
    """The shared backend of a primitive with ``on_backend_error="fail_closed"`` is down, so
    the call was refused without running (a :class:`RejectedError`: breakers stay neutral,
    and ``retry_after`` says when the backend will be tried again)."""

    reason = "backend_unavailable"


class LoopBlockingWarning(ButtressError, RuntimeWarning):
    """A blocking call was made on a thread whose event loop is running: a sync
    ``with timeout(...)`` inside a coroutine (it cancels nothing), a blocking
    ``acquire()`` of a limiter or bulkhead (it stalls every task of the loop).

    A warning, pointing at the calling line; make it an error with
    ``warnings.simplefilter("error", buttress.LoopBlockingWarning)`` (or
    ``-W error::RuntimeWarning``, ``filterwarnings = error`` in pytest). Raised as an
    error, it is a :class:`ButtressError` like every other.
    """
