"""Steps made of more than one call: a child saga, and a fan-out over items.

Both are ordinary :class:`Step` objects whose function drives the extra work and logs
it in the parent run as it goes, so a resumed run neither starts a second child nor
runs an item twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from buttress import events as _events
from buttress.backends import ANY_SIGNAL, COMPLETED, INCOMPLETE, RUNNING, WAITING, RunRecord
from buttress.exceptions import ChildFailed, ConfigTypeError, ConfigValueError
from buttress.pipeline import Pipeline

from ._calls import Call, store_call
from ._model import (
    Context,
    SagaResult,
    StoredError,
    check_input,
    default_compensation_retry,
    describe,
    jsonable,
)
from ._runner import Flow, _Run, drive_sync, new_owner, owner_is_dead
from ._waits import CHILD_SIGNAL, Park

if TYPE_CHECKING:
    from ._saga import Saga

__all__ = ["ChildRunner", "FanOut"]


# -- a child saga ----------------------------------------------------------------------------


def child_flow(
    child: Saga, run_id: str, raw: Any, parent: str, deadline: float | None
) -> Flow[SagaResult]:
    """Run, resume or read back the child run ``run_id`` (one per parent step)."""
    loaded = yield Call(child.store, child.store_face, "load", (run_id,), {})
    owner = new_owner()
    now = child.wall()
    if loaded is None:
        check_input(child.name, raw)
        value, invalid = child._check_input(raw)
        limits = [
            t for t in (deadline, None if child.timeout is None else now + child.timeout) if t
        ]
        record = RunRecord(
            run_id=run_id,
            saga=child.name,
            status=RUNNING,
            input=raw,
            created_at=now,
            updated_at=now,
            owner=owner,
            lease_until=now + child.lease,
            version=child.version,
            deadline=min(limits) if limits else None,
            parent=parent,
        )
        yield Call(child.store, child.store_face, "create_run", (record,), {})
        run = _Run(
            child,
            run_id,
            raw,
            value,
            key=None,
            ttl=None,
            owner=owner,
            deadline=record.deadline,
            parent=parent,
        )
        if invalid is not None:
            return (yield from child._reject_input(run, invalid))
        child._track(run)
        return (yield from run.flow())
    record, _ = loaded
    if record.status not in INCOMPLETE:
        assert record.result is not None
        return SagaResult.from_dict(record.result)
    won = yield Call(
        child.store,
        child.store_face,
        "claim_run",
        (run_id, owner),
        {
            "now": now,
            "lease_until": now + child.lease,
            "expected_owner": record.owner if owner_is_dead(record.owner) else None,
        },
    )
    if not won:  # a live process drives the child: the parent waits for it to end
        return SagaResult(saga=child.name, status=WAITING, run_id=run_id, compensated=False)
    resumed = yield from child._resume(run_id, owner)
    return (yield from resumed.flow())


def compensate_child_flow(child: Saga, run_id: str, parent: str) -> Flow[SagaResult | None]:
    """Undo a child run that completed (its parent is compensating); finish one that
    was compensating when it was interrupted."""
    loaded = yield Call(child.store, child.store_face, "load", (run_id,), {})
    if loaded is None:
        return None
    record, entries = loaded
    owner = new_owner()
    if record.status == COMPLETED:
        value, _ = child._check_input(record.input)
        run = _Run(
            child,
            run_id,
            record.input,
            value,
            key=record.key,
            ttl=record.ttl,
            owner=owner,
            deadline=record.deadline,
            parent=record.parent,
        )
        run.replay(entries, record.status, record.error)
        run.compensating = True
        run.failure = StoredError(f"compensated by its parent run {parent}")
        run.note("", "compensating", error=describe(run.failure))
        child._track(run)
        return (yield from run.flow())
    if record.status in INCOMPLETE:
        now = child.wall()
        won = yield Call(
            child.store,
            child.store_face,
            "claim_run",
            (run_id, owner),
            {
                "now": now,
                "lease_until": now + child.lease,
                "expected_owner": record.owner if owner_is_dead(record.owner) else None,
            },
        )
        if not won:
            raise ChildFailed(f"child run {run_id} is held by another process; retrying")
        resumed = yield from child._resume(run_id, owner)
        return (yield from resumed.flow())
    return None  # failed (and compensated) already


class ChildRunner:
    """The function and compensation of a step that runs a child saga."""

    def __init__(self, child: Saga, input: Any) -> None:
        self.child = child
        self.input = input

    def child_id(self, ctx: Context) -> str:
        return f"{ctx.run_id}/{ctx.step}"

    def __call__(self, ctx: Context) -> Any:
        run: _Run = ctx._durable()
        child_id = self.child_id(ctx)
        raw = (
            self.input(ctx)
            if callable(self.input)
            else (ctx.input if self.input is None else self.input)
        )
        saga = run.saga
        if (ctx.step, -1) not in run.marks:
            run.marks[(ctx.step, -1)] = {"run_id": child_id}
            entry = run.entry(ctx.step, "child", output={"run_id": child_id})
            saga.store.write(run.run_id, [entry])
            saga.emit(_events.ChildStarted, run_id=run.run_id, step=ctx.step, child_run_id=child_id)
        result = drive_sync(child_flow(self.child, child_id, raw, run.run_id, run.deadline_wall))
        run.children[ctx.step] = result
        if result.status == WAITING:
            raise Park(ctx.step, None, CHILD_SIGNAL)
        if not result.ok:
            raise ChildFailed(
                f"child saga {self.child.name!r} (run {child_id}) failed: {describe(result.error)}",
                result=result,
            )
        return result.output

    def compensate(self, ctx: Context) -> None:
        result = drive_sync(compensate_child_flow(self.child, self.child_id(ctx), ctx.run_id))
        if result is not None and not result.compensated:
            raise ChildFailed(
                f"child saga {self.child.name!r} (run {self.child_id(ctx)}) could not "
                f"compensate: see its report",
                result=result,
            )


# -- a fan-out over items --------------------------------------------------------------------


def merged(step: str, parks: list[Park]) -> Park:
    """One park for the items of a fan-out that wait: due at the earliest, woken by the
    signal they wait for (any signal when they wait for several)."""
    wakes = [park.wake_at for park in parks if park.wake_at is not None]
    names = {park.waiting_for for park in parks if park.waiting_for is not None}
    waiting_for = None if not names else names.pop() if len(names) == 1 else ANY_SIGNAL
    return Park(step, min(wakes) if wakes else None, waiting_for)


class FanOut:
    """The function and compensation of a step that runs ``fn(ctx, item)`` for each item
    of a collection computed at run time, at most ``concurrency`` at a time.

    The items are recorded when the step first runs (a resume uses the same ones), each
    item's outcome is logged as it ends, and when an item fails no new item starts, the
    completed ones are compensated (last index first) and the step fails with the first
    error.
    """

    def __init__(
        self,
        items: Callable[[Context], Iterable[Any]],
        fn: Callable[..., Any],
        *,
        compensate: Callable[..., Any] | None,
        concurrency: int,
        call: Pipeline | None,
        undo: Pipeline,
    ) -> None:
        self.items = items
        self.fn = fn if call is None else call(fn)
        self.undo = None if compensate is None else undo(compensate)
        self.concurrency = concurrency
        self.is_async = asyncio.iscoroutinefunction(fn)

    def _state(self, run: _Run, ctx: Context) -> tuple[dict[str, Any], list[Any] | None]:
        """The step's fan-out state, and the entry recording its items if they are new."""
        state = run.fanout.setdefault(ctx.step, {"items": None, "done": {}, "undone": set()})
        if state["items"] is not None:
            return state, None
        items = list(self.items(ctx))
        stored = jsonable(items)
        if stored != items:
            raise ConfigTypeError(
                f"the items of fan-out step {ctx.step!r} must be JSON values (they are "
                f"recorded in the run log), got {items!r:.200}"
            )
        state["items"] = items
        return state, items

    @staticmethod
    def item_context(ctx: Context, index: int) -> Context:
        """An item's own context: ``step`` is ``"<step>[<index>]"``, so that its durable
        waits are numbered apart from the other items'."""
        return ctx.for_step(f"{ctx.step}[{index}]")

    # The log writes of one item (sync face: the store's sync methods, from its thread).

    def _log(self, run: _Run, ctx: Context, event: str, output: dict[str, Any]) -> Call:
        entry = run.entry(ctx.step, event, output=output)
        return Call(run.saga.store, run.saga.store_face, "write", (run.run_id, [entry]), {})

    @staticmethod
    def _do(call: Call) -> None:
        getattr(call.store, call.method)(*call.args, **call.kwargs)

    def run_sync(self, ctx: Context) -> list[Any]:
        run: _Run = ctx._durable()
        state, new = self._state(run, ctx)
        if new is not None:
            self._do(self._log(run, ctx, "items", {"items": new}))
        items: list[Any] = state["items"]
        done: dict[int, Any] = state["done"]
        todo = [i for i in range(len(items)) if i not in done]
        errors: dict[int, BaseException] = {}
        parks: list[Park] = []
        lock = threading.Lock()

        def one(index: int) -> None:
            if errors:
                return  # an item failed: start no new one
            try:
                value = self.fn(self.item_context(ctx, index), items[index])
            except Park as park:
                with lock:
                    parks.append(park)
                return
            except Exception as exc:
                with lock:
                    errors[index] = exc
                self._do(
                    self._log(run, ctx, "item_failed", {"index": index, "error": describe(exc)})
                )
                self._item_failed(run, ctx, index, exc)
                return
            output = jsonable(value)
            self._do(self._log(run, ctx, "item", {"index": index, "output": output}))
            with lock:
                done[index] = output

        if todo:
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                for future in [pool.submit(one, index) for index in todo]:
                    future.result()
        if errors:
            self._undo_sync(run, ctx, state)
            raise errors[min(errors)]
        if parks:
            raise merged(ctx.step, parks)
        return [done[i] for i in range(len(items))]

    async def run_async(self, ctx: Context) -> list[Any]:
        run: _Run = ctx._durable()
        state, new = self._state(run, ctx)
        if new is not None:
            await self._awrite(self._log(run, ctx, "items", {"items": new}))
        items: list[Any] = state["items"]
        done: dict[int, Any] = state["done"]
        todo = [i for i in range(len(items)) if i not in done]
        errors: dict[int, BaseException] = {}
        parks: list[Park] = []
        gate = asyncio.Semaphore(self.concurrency)

        async def one(index: int) -> None:
            async with gate:
                if errors:
                    return
                try:
                    value = await self.fn(self.item_context(ctx, index), items[index])
                except Park as park:
                    parks.append(park)
                    return
                except Exception as exc:
                    errors[index] = exc
                    await self._awrite(
                        self._log(run, ctx, "item_failed", {"index": index, "error": describe(exc)})
                    )
                    self._item_failed(run, ctx, index, exc)
                    return
                output = jsonable(value)
                await self._awrite(self._log(run, ctx, "item", {"index": index, "output": output}))
                done[index] = output

        await asyncio.gather(*(one(index) for index in todo))
        if errors:
            await self._undo_async(run, ctx, state)
            raise errors[min(errors)]
        if parks:
            raise merged(ctx.step, parks)
        return [done[i] for i in range(len(items))]

    @staticmethod
    def _item_failed(run: _Run, ctx: Context, index: int, exc: BaseException) -> None:
        run.saga.emit(
            _events.ItemFailed, run_id=run.run_id, step=ctx.step, index=index, error=describe(exc)
        )

    @staticmethod
    async def _awrite(call: Call) -> None:
        await store_call(call.store, call.face, call.method, *call.args, **call.kwargs)

    # -- compensation: completed items, last index first --------------------------------------

    def _pending_undo(self, state: dict[str, Any]) -> list[int]:
        if self.undo is None:
            return []
        return sorted((i for i in state["done"] if i not in state["undone"]), reverse=True)

    def _undone(
        self, run: _Run, ctx: Context, state: dict[str, Any], index: int, exc: BaseException | None
    ) -> Call:
        state["undone"].add(index)
        if exc is None:
            return self._log(run, ctx, "item_compensated", {"index": index})
        run.compensation_ok = False
        return self._log(
            run, ctx, "item_compensation_failed", {"index": index, "error": describe(exc)}
        )

    def _undo_sync(self, run: _Run, ctx: Context, state: dict[str, Any]) -> None:
        for index in self._pending_undo(state):
            error: BaseException | None = None
            try:
                assert self.undo is not None
                self.undo(
                    self.item_context(ctx, index), state["items"][index], state["done"][index]
                )
            except Exception as exc:
                error = exc
            self._do(self._undone(run, ctx, state, index, error))

    async def _undo_async(self, run: _Run, ctx: Context, state: dict[str, Any]) -> None:
        for index in self._pending_undo(state):
            error: BaseException | None = None
            try:
                assert self.undo is not None
                await self.undo(
                    self.item_context(ctx, index), state["items"][index], state["done"][index]
                )
            except Exception as exc:
                error = exc
            await self._awrite(self._undone(run, ctx, state, index, error))

    def compensate_sync(self, ctx: Context) -> None:
        """The step's compensation (a later step failed): undo every completed item."""
        run: _Run = ctx._durable()
        state = run.fanout.get(ctx.step)
        if state is not None and state["items"] is not None:
            self._undo_sync(run, ctx, state)

    async def compensate_async(self, ctx: Context) -> None:
        """Async twin of :meth:`compensate_sync`."""
        run: _Run = ctx._durable()
        state = run.fanout.get(ctx.step)
        if state is not None and state["items"] is not None:
            await self._undo_async(run, ctx, state)


def fan_out_step_options(
    concurrency: object, compensate: object, clock: Any
) -> tuple[int, Pipeline]:
    """Validate a fan-out's ``concurrency``; the retry of its item compensations."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise ConfigTypeError(f"concurrency must be an int, got {concurrency!r}")
    if concurrency < 1:
        raise ConfigValueError(f"concurrency must be >= 1, got {concurrency!r}")
    if compensate is not None and not callable(compensate):
        raise ConfigTypeError(f"compensate must be callable, got {compensate!r}")
    return concurrency, Pipeline(default_compensation_retry(clock))
