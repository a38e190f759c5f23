"""Hedged requests: when a call is slow, start another one and take the first success.

For tail latency in fan-outs: if the first attempt has not finished after
``delay`` seconds, a second one starts (up to ``max_hedged`` extra attempts); the
first attempt to succeed wins and the others are cancelled. A failed attempt
starts the next hedge at once. If every attempt fails, the last error is raised.
Async only: cancelling the losers is what makes hedging safe, and sync code
cannot cancel a call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import events as _events
from ._policy import Policy, PolicyOptions
from ._validate import check_int, require_seconds
from .exceptions import ConfigTypeError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Hedge", "hedge"]


class Hedge(Policy):
    """Start up to ``max_hedged`` extra attempts of a slow async call, ``delay`` seconds apart.

    Args:
        delay: seconds to wait for an attempt before starting another (>= 0).
        max_hedged: extra attempts allowed (default 1).

    It also takes the options every primitive takes: ``name``, ``listeners``,
    ``registry`` and ``clock`` (see "Every primitive" on the options page).
    """

    kind = "hedge"

    def __init__(
        self,
        delay: float | timedelta,
        *,
        max_hedged: int = 1,
        name: str | None = None,
        **options: Unpack[PolicyOptions],
    ) -> None:
        super().__init__(name=name, **options)
        seconds = require_seconds("delay", delay, allow_zero=True)
        self.delay = seconds
        self.max_hedged = check_int("max_hedged", max_hedged)
        self._lock = threading.Lock()  # one Hedge may serve event loops in several threads
        self._launched = 0
        self._wins = 0
        self._register()

    def _wrap_sync(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ConfigTypeError(
            f"hedge protects coroutine functions only (losing attempts must be cancellable), "
            f"got the sync function {fn!r}"
        )

    def _wrap_async(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        run = self._run

        async def hedged(*args: Any, **kwargs: Any) -> Any:
            return await run(fn, args, kwargs)

        return hedged

    async def _run(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        clock = self._clock
        pending: set[asyncio.Task[Any]] = set()
        first: list[asyncio.Task[Any]] = []
        wake: asyncio.Future[None] = loop.create_future()
        last_error: BaseException | None = None
        launched = 0

        def on_done(_: asyncio.Task[Any]) -> None:
            if not wake.done():
                wake.set_result(None)

        def launch() -> None:
            nonlocal launched
            launched += 1
            if launched > 1:
                with self._lock:
                    self._launched += 1
                self.emit(_events.HedgeLaunched, attempt=launched)
            task = loop.create_task(fn(*args, **kwargs))
            task.add_done_callback(on_done)
            pending.add(task)
            if not first:
                first.append(task)

        launch()
        try:
            while True:
                can_hedge = launched <= self.max_hedged
                await clock.wait_future(wake, self.delay if can_hedge else None)
                if wake.done():
                    wake = loop.create_future()
                finished = [task for task in pending if task.done()]
                for task in finished:
                    pending.discard(task)
                    if task.cancelled():
                        last_error = asyncio.CancelledError()
                        continue
                    error = task.exception()
                    if error is None:
                        if task is not first[0]:
                            with self._lock:
                                self._wins += 1
                        return task.result()
                    last_error = error
                if finished:
                    if not pending:
                        if launched <= self.max_hedged:
                            launch()  # every attempt so far failed: hedge at once
                            continue
                        assert last_error is not None
                        raise last_error
                    if launched <= self.max_hedged:
                        launch()
                elif can_hedge:
                    launch()  # the delay passed with nothing finished
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "delay": self.delay,
            "max_hedged": self.max_hedged,
            "hedges_launched": self._launched,
            "hedges_won": self._wins,
        }


hedge = Hedge
"""``hedge(delay, max_hedged=1)``: the same as :class:`Hedge`."""
