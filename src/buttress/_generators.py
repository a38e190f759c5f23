"""Generator functions under a policy: one delegation engine for every primitive.

A decorated generator function returns a generator that forwards everything to the
real one (items out; ``send``, ``throw`` and ``close`` in) while a *session* watches:

- the policy's work that belongs to the whole iteration happens once, when the first
  item is asked for (``open`` takes a breaker or bulkhead permit, a limiter token, or
  starts a deadline), so creating a generator that is never iterated costs nothing;
- ``before()`` / ``after()`` run around each resumption of the real generator (a
  deadline is in force only while the generator's own code runs, and a breaker times
  only that code, not the consumer's pace);
- ``end(exc)`` runs exactly once, when the iteration is over: ``exc`` is ``None`` when
  the generator finished or the consumer closed it, else the error it raised.

A retry is different: it runs the generator again only until the first item arrives
(see ``Retry``), then hands the rest to :func:`delegate` (or, for async generators,
to an :func:`async_driver`) with that item.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .permit import Permit

__all__ = [
    "NOTHING",
    "NO_SESSION",
    "PermitSession",
    "Prelude",
    "Session",
    "async_driver",
    "delegate",
    "wrap_async_generator",
    "wrap_generator",
]

NOTHING: Any = object()
"""No item taken yet (a prelude's third value when the generator has not started)."""


class Session:
    """The hooks of one iteration. The base class does nothing (a limiter's session)."""

    __slots__ = ()

    def before(self) -> object:
        """Called before each resumption; may raise to end the iteration (the real
        generator is closed first). Its value is given back to :meth:`after`."""
        return None

    def after(self, token: object, exc: BaseException | None) -> BaseException | None:
        """Called after each resumption (``exc``: what it raised, ``StopIteration``
        excluded); an error returned here replaces the outcome (the generator is closed
        if it had yielded) and is raised to the consumer."""
        return None

    def end(self, exc: BaseException | None) -> None:
        """The iteration is over (``exc``: the error that ends it, or ``None``)."""

    async def end_async(self, exc: BaseException | None) -> None:
        """:meth:`end` for async generators."""
        self.end(exc)


NO_SESSION = Session()


class PermitSession(Session):
    """A breaker's or bulkhead's permit held for the whole iteration and settled once at
    its end, with the time spent inside the generator as the call's duration (the
    consumer's pace between items is not the dependency's slowness)."""

    __slots__ = ("busy", "now", "permit")

    def __init__(self, permit: Permit, now: Callable[[], float]) -> None:
        self.permit = permit
        self.now = now
        self.busy = 0.0

    def before(self) -> object:
        return self.now()

    def after(self, token: object, exc: BaseException | None) -> BaseException | None:
        self.busy += self.now() - token  # type: ignore[operator]
        return None

    def end(self, exc: BaseException | None) -> None:
        if exc is None:
            self.permit.success(self.busy)
        else:
            self.permit.failure(exc, self.busy)

    async def end_async(self, exc: BaseException | None) -> None:
        if exc is None:
            await self.permit.success_async(self.busy)
        else:
            await self.permit.failure_async(exc, self.busy)


def delegate(gen: Generator[Any, Any, Any], session: Session, first: Any = NOTHING) -> Any:
    """Drive ``gen`` for the consumer of the generator this one is delegated from
    (``yield from delegate(...)``); ``first``: an item already taken from ``gen``."""
    value: Any = None
    thrown: BaseException | None = None
    item = first
    while True:
        if item is NOTHING:
            try:
                token = session.before()
            except BaseException as exc:
                gen.close()
                session.end(exc)
                raise
            try:
                item = gen.send(value) if thrown is None else gen.throw(thrown)
            except StopIteration as stop:
                error = session.after(token, None)
                session.end(error)
                if error is not None:
                    raise error from None
                return stop.value
            except BaseException as exc:
                error = session.after(token, exc)
                session.end(exc if error is None else error)
                if error is not None:
                    raise error from exc
                raise
            finally:
                thrown = None
            error = session.after(token, None)
            if error is not None:
                gen.close()
                session.end(error)
                raise error
        try:
            value = yield item
        except GeneratorExit:
            try:
                gen.close()
            finally:
                session.end(None)
            raise
        except BaseException as exc:
            thrown = exc
        item = NOTHING


Prelude = Callable[[tuple[Any, ...], dict[str, Any]], Awaitable[tuple[Any, Session, Any]]]
"""What an async driver runs when the first item is asked for: given the call's
arguments, ``(async generator or None, session, first item or NOTHING)``; ``None`` ends
the iteration at once (a retried generator that finished before yielding)."""


def async_driver(prelude: Prelude) -> Callable[..., AsyncGenerator[Any, Any]]:
    """An async generator function that runs ``prelude`` on the first ``asend`` and then
    delegates to the generator it returns (:func:`delegate` for async generators, which
    cannot ``yield from``)."""

    async def guarded(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        agen, session, item = await prelude(args, kwargs)
        if agen is None:
            return
        value: Any = None
        thrown: BaseException | None = None
        while True:
            if item is NOTHING:
                try:
                    token = session.before()
                except BaseException as exc:
                    await agen.aclose()
                    await session.end_async(exc)
                    raise
                try:
                    item = await (agen.asend(value) if thrown is None else agen.athrow(thrown))
                except StopAsyncIteration:
                    error = session.after(token, None)
                    await session.end_async(error)
                    if error is not None:
                        raise error from None
                    return
                except BaseException as exc:
                    error = session.after(token, exc)
                    await session.end_async(exc if error is None else error)
                    if error is not None:
                        raise error from exc
                    raise
                finally:
                    thrown = None
                error = session.after(token, None)
                if error is not None:
                    await agen.aclose()
                    await session.end_async(error)
                    raise error
            try:
                value = yield item
            except GeneratorExit:
                try:
                    await agen.aclose()
                finally:
                    await session.end_async(None)
                raise
            except BaseException as exc:
                thrown = exc
            item = NOTHING

    return guarded


def wrap_generator(
    fn: Callable[..., Generator[Any, Any, Any]], open_session: Callable[[], Session]
) -> Callable[..., Generator[Any, Any, Any]]:
    """A generator function that opens a session when its first item is asked for and
    delegates to ``fn``'s generator under it."""

    def guarded(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        session = open_session()
        try:
            gen = fn(*args, **kwargs)
        except BaseException as exc:
            session.end(exc)
            raise
        return (yield from delegate(gen, session))

    return guarded


def wrap_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], open_session: Callable[[], Awaitable[Session]]
) -> Callable[..., AsyncGenerator[Any, Any]]:
    """:func:`wrap_generator` for async generator functions."""

    async def prelude(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Session, Any]:
        session = await open_session()
        try:
            agen = fn(*args, **kwargs)
        except BaseException as exc:
            await session.end_async(exc)
            raise
        return agen, session, NOTHING

    return async_driver(prelude)
