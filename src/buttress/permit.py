"""Permits: the permission protocol of the circuit breaker and the bulkhead.

``breaker.acquire()`` and ``bulkhead.acquire()`` return a :class:`Permit` (or raise a
:class:`~buttress.RejectedError`): permission for one call, which the caller settles
exactly once when the call is over:

- ``permit.success(duration=None)``: the call worked;
- ``permit.failure(exc=None, duration=None)``: it failed (``exc`` is classified as the
  decorator would: an excluded or non-included error, a cancellation or a rejection by
  another primitive is neutral);
- ``permit.release()``: neutral, counted as neither (the call never reached the
  dependency, or its outcome says nothing about it).

Settling a permit a second time raises :class:`RuntimeError`. Each of the three has an
``_async`` twin for async code (it awaits a shared store's I/O instead of blocking the
event loop). A permit is also a context manager, sync and async, that settles itself from
the block's outcome exactly as the decorator does::

    with breaker.acquire():
        call_the_dependency()

The decorator, ``with breaker:``, the pipeline and the integrations are all thin layers
over this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ._generators import PermitSession, Session, wrap_async_generator, wrap_generator
from ._policy import ExcType, Traceback, cm_pop, cm_push
from ._validate import require_seconds
from .clock import Clock

__all__ = ["Permit", "PermitGuard"]

G = TypeVar("G", bound="PermitGuard")


class Permit:
    """Permission for one call, settled exactly once. Subclasses implement ``_settle`` and
    ``_settle_async`` (``exc`` is ``None`` for a success, the ``NEUTRAL`` marker for a
    release, else the call's exception; ``failed`` marks a failure without an exception)."""

    __slots__ = ("_open",)

    NEUTRAL: BaseException = BaseException("neutral")

    def __init__(self) -> None:
        # A one-item list: ``pop()`` is atomic, so two racing settlements cannot both pass.
        self._open = [True]

    def _take(self) -> None:
        try:
            self._open.pop()
        except IndexError:
            raise RuntimeError(f"{self!r} was already settled") from None

    @property
    def settled(self) -> bool:
        """Whether the permit was settled (successfully, as a failure, or released)."""
        return not self._open

    # -- settling ---------------------------------------------------------------------------

    def success(self, duration: float | timedelta | None = None) -> None:
        """The call worked; ``duration`` (seconds) defaults to the time since acquisition."""
        if duration is not None:
            duration = require_seconds("duration", duration, allow_zero=True)
        self._take()
        self._settle(None, duration, failed=False)

    def failure(
        self, exc: BaseException | None = None, duration: float | timedelta | None = None
    ) -> None:
        """The call failed with ``exc`` (``None``: a failure without an exception, such as a
        bad response); ``exc`` is classified like the decorator classifies it."""
        if duration is not None:
            duration = require_seconds("duration", duration, allow_zero=True)
        self._take()
        self._settle(exc, duration, failed=True)

    def release(self) -> None:
        """Give the permit back without an outcome (neutral)."""
        self._take()
        self._settle(Permit.NEUTRAL, None, failed=False)

    async def success_async(self, duration: float | timedelta | None = None) -> None:
        """:meth:`success` for async code."""
        if duration is not None:
            duration = require_seconds("duration", duration, allow_zero=True)
        self._take()
        await self._settle_async(None, duration, failed=False)

    async def failure_async(
        self, exc: BaseException | None = None, duration: float | timedelta | None = None
    ) -> None:
        """:meth:`failure` for async code."""
        if duration is not None:
            duration = require_seconds("duration", duration, allow_zero=True)
        self._take()
        await self._settle_async(exc, duration, failed=True)

    async def release_async(self) -> None:
        """:meth:`release` for async code."""
        self._take()
        await self._settle_async(Permit.NEUTRAL, None, failed=False)

    def _settle(self, exc: BaseException | None, duration: float | None, *, failed: bool) -> None:
        raise NotImplementedError

    async def _settle_async(
        self, exc: BaseException | None, duration: float | None, *, failed: bool
    ) -> None:
        self._settle(exc, duration, failed=failed)

    # -- as a context manager ---------------------------------------------------------------

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        if self._open:  # settled inside the block by hand: nothing left to do
            self._take()
            self._settle(exc, None, failed=exc is not None)

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        if self._open:
            self._take()
            await self._settle_async(exc, None, failed=exc is not None)


class PermitGuard:
    """``with policy:`` and ``async with policy:`` over the policy's ``acquire()`` and
    ``acquire_async()``: each entry takes its own permit (remembered per thread and task,
    so concurrent and nested entries never mix them up) and each exit settles it from the
    block's outcome."""

    clock: Clock

    def acquire(self) -> Permit:
        raise NotImplementedError

    async def acquire_async(self) -> Permit:
        raise NotImplementedError

    # A decorated generator function holds one permit for its whole iteration.

    def _wrap_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        now = self.clock.now
        return wrap_generator(fn, lambda: PermitSession(self.acquire(), now))

    def _wrap_async_generator(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        now = self.clock.now

        async def open_session() -> Session:
            return PermitSession(await self.acquire_async(), now)

        return wrap_async_generator(fn, open_session)

    def __enter__(self: G) -> G:
        cm_push(self, self.acquire())
        return self

    def __exit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        permit: Permit = cm_pop(self)
        permit.__exit__(exc_type, exc, tb)

    async def __aenter__(self: G) -> G:
        cm_push(self, await self.acquire_async())
        return self

    async def __aexit__(self, exc_type: ExcType, exc: BaseException | None, tb: Traceback) -> None:
        permit: Permit = cm_pop(self)
        await permit.__aexit__(exc_type, exc, tb)
