"""What a primitive does when its shared backend fails: ``on_backend_error``.

Every shared store takes one of three modes:

- ``"fail_closed"``: refuse the protected call (:class:`~buttress.BackendUnavailable`, a
  :class:`~buttress.RejectedError`, so breakers stay neutral and retries may wait);
- ``"fail_open"``: let the call through as if the primitive were not there;
- ``"local"``: use the primitive's own in-process state, with the same settings.

After a failure the backend is not asked again for ``retry_interval`` seconds (every call
in between takes the fallback at once, so a hung server costs one timeout, not one per
call); then one call tries it again. Going down emits
:class:`~buttress.events.BackendDegraded`, coming back :class:`~buttress.events.BackendRecovered`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from buttress import events as _events
from buttress._validate import check_choice
from buttress.exceptions import BackendUnavailable

__all__ = ["MODES", "Gate", "check_mode"]

MODES = ("fail_closed", "fail_open", "local")


def check_mode(value: object) -> str:
    return check_choice("on_backend_error", value, MODES)


class Gate:
    """Whether to ask the backend now, and the degraded/recovered bookkeeping.

    ``emit`` is the owning primitive's ``emit``; ``now`` its clock.
    """

    __slots__ = (
        "backend",
        "down_since",
        "emit",
        "lock",
        "mode",
        "next_try",
        "now",
        "retry_interval",
    )

    def __init__(
        self,
        backend: str,
        mode: str,
        retry_interval: float,
        now: Callable[[], float],
        emit: Callable[..., None],
    ) -> None:
        self.backend = backend
        self.mode = mode
        self.retry_interval = retry_interval
        self.now = now
        self.emit = emit
        self.lock = threading.Lock()
        self.down_since: float | None = None
        self.next_try = 0.0

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    def should_try(self) -> bool:
        """True when the backend is up, or when this caller is the one to probe it again."""
        if self.down_since is None:
            return True
        with self.lock:
            now = self.now()
            if self.down_since is not None and now < self.next_try:
                return False
            self.next_try = now + self.retry_interval
            return True

    def failed(self, error: BaseException) -> None:
        with self.lock:
            now = self.now()
            first = self.down_since is None
            if first:
                self.down_since = now
            self.next_try = now + self.retry_interval
        if first:
            self.emit(_events.BackendDegraded, backend=self.backend, mode=self.mode, error=error)

    def succeeded(self) -> None:
        if self.down_since is None:  # the common case: no lock
            return
        with self.lock:
            since, self.down_since = self.down_since, None
        if since is not None:
            self.emit(_events.BackendRecovered, backend=self.backend, downtime=self.now() - since)

    def unavailable(
        self, what: str, error: BaseException | None = None, *, name: str | None = None
    ) -> BackendUnavailable:
        """The error a fail-closed primitive raises (``name``: the primitive's)."""
        retry_after = max(self.next_try - self.now(), 0.0)
        exc = BackendUnavailable(
            f"{what}: the {self.backend} backend is unavailable and on_backend_error is "
            f"'fail_closed'" + (f" ({type(error).__name__}: {error})" if error else ""),
            retry_after=retry_after,
            name=name,
        )
        if error is not None:
            exc.__cause__ = error
        return exc

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "on_backend_error": self.mode,
            "degraded": self.down_since is not None,
        }
