"""An exact event counter that is cheap on the hot path.

With the GIL, ``next()`` on an ``itertools.count`` is one C call and atomic, so
it needs no lock. On a free-threaded interpreter (no GIL) the counter falls back
to a lock, so counts stay exact there too.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable

__all__ = ["GIL_ENABLED", "Counter"]

GIL_ENABLED: bool = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


class Counter:
    """Counts calls of ``incr``; ``reset`` keeps the same ``incr`` (wrappers bind it once)."""

    __slots__ = ("_base", "_count", "_lock", "_value", "incr")

    def __init__(self) -> None:
        self._value = 0
        self._base = 0
        self._lock = None if GIL_ENABLED else threading.Lock()
        self._count = itertools.count()
        self.incr: Callable[[], object]
        if GIL_ENABLED:
            self.incr = self._count.__next__
        else:  # pragma: no cover - free-threaded interpreters only
            self.incr = self._locked_incr

    def _locked_incr(self) -> None:  # pragma: no cover - free-threaded interpreters only
        assert self._lock is not None
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        if GIL_ENABLED:  # _raw(), inlined: snapshots read two counters per primitive
            return int(repr(self._count)[6:-1]) - self._base
        return self._value  # pragma: no cover

    def _raw(self) -> int:
        # repr is "count(N)": the next value, i.e. the number of increments so far.
        return int(repr(self._count)[6:-1])

    def reset(self) -> None:
        """Start again from zero. The ``incr`` that wrappers already hold keeps counting:
        replacing the underlying counter would silently drop their increments."""
        if GIL_ENABLED:
            self._base = self._raw()
        else:  # pragma: no cover - free-threaded interpreters only
            assert self._lock is not None
            with self._lock:
                self._value = 0
