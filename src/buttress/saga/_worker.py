"""The recovery worker: finishes abandoned saga runs, on a timer, for as long as it runs.

Run it as a sidecar (``python -m buttress runs --db ... worker --app module:attr``) or
inside a service (a thread with :meth:`RecoveryWorker.start`, or a task awaiting
:meth:`RecoveryWorker.run_async`). Every ``interval`` seconds it asks each saga's
store for incomplete runs and takes, one at a time, those whose lease has expired
(on any host) or whose holder is known dead (on this host): a take-over is one
conditional write, so any number of workers on one store never recover a run twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from buttress._policy import Policy
from buttress._validate import check_seconds
from buttress.clock import Clock
from buttress.exceptions import ConfigTypeError, ConfigValueError
from buttress.registry import Registry

from ._model import RecoveryReport, describe
from ._saga import Saga

__all__ = ["RecoveryWorker"]


class RecoveryWorker(Policy):
    """Recovers the incomplete runs of some sagas every ``interval`` seconds.

    Args:
        sagas: the saga, or sagas, whose runs it recovers (each with its own store),
            with their child sagas.
        interval: seconds between passes (default 5).
        grace: seconds :meth:`stop` gives the recoveries in progress to finish
            (default 30); a run still going then is left with its log to the next
            worker.
        name: the worker's name in the registry (default ``"<saga>-recovery"``).
        registry: the registry to join (its ``health()`` then includes the worker).
        clock: time source for the interval and the health checks.

    A pass also refreshes each saga's health answer (see ``Saga.refresh_health``), so a
    service whose worker runs never has ``health()`` query a store.
    """

    kind = "saga_worker"

    def __init__(
        self,
        sagas: Saga | Iterable[Saga],
        *,
        interval: float | timedelta = 5.0,
        grace: float | timedelta = 30.0,
        name: str | None = None,
        registry: Registry | None = None,
        clock: Clock | None = None,
    ) -> None:
        listed = [sagas] if isinstance(sagas, Saga) else list(sagas)
        if not listed:
            raise ConfigValueError("sagas must name at least one Saga, got none")
        for index, saga in enumerate(listed):
            if not isinstance(saga, Saga):
                raise ConfigTypeError(f"sagas[{index}] must be a buttress Saga, got {saga!r}")
        every = check_seconds("interval", interval)
        wait = check_seconds("grace", grace)
        assert every is not None
        assert wait is not None
        if every <= 0:
            raise ConfigValueError(f"interval must be > 0, got {interval!r}")
        super().__init__(
            name=name if name is not None else f"{listed[0].name}-recovery",
            registry=registry,
            clock=clock,
        )
        # A parent's child sagas are recovered with it (a child wakes its parent when it
        # ends, and a parked child is due like any run).
        self.sagas: list[Saga] = []
        pending = list(listed)
        while pending:
            saga = pending.pop(0)
            if all(saga is not known for known in self.sagas):
                self.sagas.append(saga)
                pending.extend(saga.children)
        self.interval = every
        self.grace = wait
        self._stopping = threading.Event()
        self._active = 0  # recoveries in progress
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.recovered = 0
        self.skipped = 0
        self.last_error: str | None = None
        self.last_pass_at: float | None = None
        self._register()

    # -- one pass ----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """:meth:`stop` was called: the worker claims nothing more."""
        return self._stopping.is_set()

    def _account(self, reports: list[RecoveryReport], error: str | None) -> int:
        done = sum(len(report) for report in reports)
        with self._lock:
            self.passes += 1
            self.recovered += done
            self.skipped += sum(len(report.skipped) for report in reports)
            self.last_error = error
            self.last_pass_at = self.clock.now()
        return done

    def run_once(self) -> int:
        """One pass over every saga; returns how many runs it finished."""
        reports: list[RecoveryReport] = []
        error = None
        for saga in self.sagas:
            if self.stopping:
                break
            saga.refresh_health()
            with self._lock:
                self._active += 1
            try:
                reports.append(saga.recover(stop=self._stopping.is_set))
            except Exception as exc:  # the store is down: say so, try again next pass
                error = f"saga {saga.name!r}: {describe(exc)}"
            finally:
                with self._lock:
                    self._active -= 1
        return self._account(reports, error)

    async def run_once_async(self) -> int:
        """Async twin of :meth:`run_once`."""
        reports: list[RecoveryReport] = []
        error = None
        for saga in self.sagas:
            if self.stopping:
                break
            await saga.refresh_health_async()
            with self._lock:
                self._active += 1
            try:
                reports.append(await saga.recover_async(stop=self._stopping.is_set))
            except Exception as exc:
                error = f"saga {saga.name!r}: {describe(exc)}"
            finally:
                with self._lock:
                    self._active -= 1
        return self._account(reports, error)

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Pass every ``interval`` seconds until :meth:`stop` (blocks this thread)."""
        while not self.stopping:
            self.run_once()
            self.clock.wait(self._stopping, self.interval)

    async def run_async(self) -> None:
        """Async twin of :meth:`run`: pass every ``interval`` seconds until :meth:`stop`
        (or until the task is cancelled)."""
        while not self.stopping:
            await self.run_once_async()
            waited = 0.0
            while waited < self.interval and not self.stopping:
                step = min(0.1, self.interval - waited)
                await self.clock.asleep(step)
                waited += step

    def start(self) -> threading.Thread:
        """Run the worker on a daemon thread; returns it."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"recovery worker {self.name!r} is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self.run, name=f"buttress-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, *, wait: bool = True) -> bool:
        """Claim nothing more; with ``wait``, give the recovery in progress up to
        ``grace`` seconds to finish. Returns True when the worker is idle (a run it did
        not finish keeps its log: the next worker takes it once its lease expires, or
        at once on this host after this process exits)."""
        self._stopping.set()
        thread = self._thread
        if not wait or thread is None or thread is threading.current_thread():
            return self.idle
        thread.join(self.grace)
        return not thread.is_alive()

    @property
    def idle(self) -> bool:
        """No recovery is in progress."""
        with self._lock:
            return self._active == 0

    # -- state ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kind": self.kind,
                "name": self.name,
                "sagas": [saga.name for saga in self.sagas],
                "interval": self.interval,
                "passes": self.passes,
                "recovered": self.recovered,
                "skipped": self.skipped,
                "active": self._active,
                "stopping": self.stopping,
                "last_error": self.last_error,
                "seconds_since_pass": None
                if self.last_pass_at is None
                else self.clock.now() - self.last_pass_at,
            }

    def health_check(self) -> tuple[str, Any, str]:
        with self._lock:
            error, last = self.last_error, self.last_pass_at
        if error is not None:
            return "fail", None, f"the last pass failed: {error}"
        if last is None:
            return "warn", None, "no pass has finished yet"
        age = self.clock.now() - last
        if age > 3 * self.interval + self.grace:
            return "warn", age, f"no pass finished for {age:.0f}s (every {self.interval:g}s)"
        return "pass", age, ""

    def __call__(self, fn: Any) -> Any:
        raise ConfigTypeError("a RecoveryWorker is not a decorator; call start() or run()")
