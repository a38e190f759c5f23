"""Named primitives, and the health and state views built from them.

Every primitive built with ``name=`` registers itself in a :class:`Registry`
(the default one unless ``registry=`` says otherwise). :func:`health`,
:func:`readiness`, :func:`liveness` and :func:`state` are plain callables returning
JSON-ready dicts, so any web framework can serve them.

Three questions, three answers:

- :func:`liveness`: is this process alive? Always ``"pass"``: it never reads a
  primitive, so no dependency can get the process restarted.
- :func:`readiness`: should this process receive traffic? ``"fail"`` only when a
  primitive built with ``critical=True`` fails its check, or the registry is draining.
- :func:`health`: is anything degraded? Every check; a failing critical check makes it
  ``"fail"``, any other failing or warning check ``"warn"``.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigTypeError, DuplicateNameError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["Registry", "default_registry", "health", "liveness", "readiness", "state"]

# A registry entry: (kind, name), the health-check name "name:kind", a weak reference,
# and whether the primitive is critical for readiness.
_Entry = tuple[tuple[str, str], str, "weakref.ref[Policy]", bool]


def _entry_key(entry: _Entry) -> tuple[str, str]:
    return entry[0]


class Registry:
    """A set of live, named primitives.

    Primitives are held weakly: a primitive that is garbage collected leaves the
    registry, and its name may be reused. Registering a second *live* primitive
    of the same kind under the same name raises :class:`DuplicateNameError`.

    Iteration (and so :meth:`state` and :meth:`health`) goes in ``(kind, name)`` order.
    That order is kept, not recomputed per call: a new member is appended and the list
    is sorted by the next reader (one sorted run plus the newcomers: close to linear),
    and a reader copies one reference under the lock and walks the list outside it.
    """

    def __init__(self) -> None:
        self._items: weakref.WeakValueDictionary[tuple[str, str], Policy] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        # The members as (key, health-check name, weak reference), in key order once
        # sorted. A collected primitive's entry stays (its reference dead) until dead
        # entries outnumber live ones, when a reader rebuilds the list.
        self._entries: list[_Entry] = []
        self._sorted = True
        self._shared = False  # handed to a reader: copy before changing it
        self._draining = False

    def register(self, primitive: Policy) -> None:
        name = primitive.name
        if name is None:
            raise ConfigTypeError(f"cannot register the unnamed primitive {primitive!r}")
        key = (primitive.kind, name)
        with self._lock:
            existing = self._items.get(key)
            if existing is not None and existing is not primitive:
                raise DuplicateNameError(
                    f"a {primitive.kind} named {name!r} is already registered; "
                    f"names must be unique per kind (or pass registry= to keep a separate set)"
                )
            self._items[key] = primitive
            if existing is None:
                label = f"{name}:{primitive.kind}"
                entry = (key, label, weakref.ref(primitive), bool(primitive.critical))
                self._own().append(entry)
                self._sorted = False

    def unregister(self, primitive: Policy) -> None:
        """Remove ``primitive`` from the registry (a no-op if it is not registered); its
        name is free again."""
        if primitive.name is None:
            return
        with self._lock:
            key = (primitive.kind, primitive.name)
            if self._items.get(key) is primitive:
                del self._items[key]
                self._drop(key, primitive)

    # -- the order (lock held) ----------------------------------------------------------------

    def _own(self) -> list[_Entry]:
        """The entries, copied first if a reader may still be walking them."""
        if self._shared:
            self._entries = list(self._entries)
            self._shared = False
        return self._entries

    def _settle(self) -> list[_Entry]:
        """The entries in key order (sorted here if members joined since the last read)."""
        if not self._sorted:
            self._own().sort(key=_entry_key)
            self._sorted = True
        return self._entries

    def _drop(self, key: tuple[str, str], primitive: Policy) -> None:
        entries = self._settle()
        at = bisect.bisect_left(entries, key, key=_entry_key)
        while at < len(entries) and entries[at][0] == key:
            if entries[at][2]() is primitive:
                del self._own()[at]
                return
            at += 1

    def _read(self) -> list[_Entry]:
        """The entries in order, for a reader: one reference copied under the lock; the
        list is never changed from then on (the next change copies it)."""
        with self._lock:
            entries = self._settle()
            self._shared = True
        return entries

    def _tidy(self, seen: list[_Entry], dead: int) -> None:
        """A reader met ``dead`` collected primitives: once they are most of the entries,
        keep only the live ones (amortised O(1) per collected primitive)."""
        if dead * 2 <= len(seen):
            return
        with self._lock:
            if self._entries is seen:  # else it changed meanwhile: the next reader decides
                self._entries = [entry for entry in seen if entry[2]() is not None]
                self._shared = False

    # -- views --------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Policy | None:
        """The live primitive of ``kind`` named ``name``, or ``None``."""
        with self._lock:
            return self._items.get((kind, name))

    def __iter__(self) -> Iterator[Policy]:
        entries, live = self._read(), []
        for _, _, ref, _ in entries:
            primitive = ref()
            if primitive is not None:
                live.append(primitive)
        self._tidy(entries, len(entries) - len(live))
        return iter(live)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        """Forget every registered primitive (tests use it between cases)."""
        with self._lock:
            self._items.clear()
            self._entries = []
            self._sorted, self._shared = True, False

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of every registered primitive, grouped by kind."""
        out: dict[str, Any] = {}
        group: dict[str, Any] = {}
        kind = None
        entries, dead = self._read(), 0
        for key, _, ref, _ in entries:
            primitive = ref()
            if primitive is None:
                dead += 1
                continue
            if key[0] != kind:  # entries come grouped by kind
                kind = key[0]
                group = out.setdefault(kind, {})
            group[key[1]] = primitive.snapshot()
        self._tidy(entries, dead)
        return out

    def health(self) -> dict[str, Any]:
        """Health in the shape of the IETF health-check response draft.

        Every primitive has a check: an open breaker fails, a half-open breaker or a
        saturated bulkhead or limiter warns. ``status`` is ``"fail"`` when a *critical*
        primitive fails; any other failing or warning check makes it ``"warn"``
        (degraded: still serving); else ``"pass"``.
        """
        checks, failed, degraded = self._checks(critical_only=False)
        status = "fail" if failed else "warn" if degraded else "pass"
        return {"status": status, "checks": checks}

    def readiness(self) -> dict[str, Any]:
        """Whether this process should receive traffic, in the shape of :meth:`health`.

        ``checks`` holds the critical primitives only (``critical=True``); ``status`` is
        ``"fail"`` when one of them fails or while the registry is :meth:`drain`-ing
        (then ``output`` says so), ``"warn"`` when one of them warns, else ``"pass"``.
        A failing primitive that is not critical never fails readiness.
        """
        checks, failed, degraded = self._checks(critical_only=True)
        report: dict[str, Any] = {
            "status": "fail" if failed or self._draining else "warn" if degraded else "pass",
            "checks": checks,
        }
        if self._draining:
            report["output"] = "draining: shutting down, send no new traffic"
        return report

    def liveness(self) -> dict[str, Any]:
        """Whether this process is alive: always ``{"status": "pass"}``.

        It reads no primitive on purpose: an answer at all is the signal. A restart
        cures a wedged process, never a failing dependency, so no dependency (and no
        critical primitive) may fail liveness.
        """
        return {"status": "pass"}

    def drain(self) -> None:
        """Fail :meth:`readiness` from now on (graceful shutdown: the load balancer stops
        sending new requests while those in flight finish); :meth:`health` and
        :meth:`liveness` are unchanged."""
        self._draining = True

    def resume(self) -> None:
        """Stop draining: :meth:`readiness` reports the critical checks again."""
        self._draining = False

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called (and not :meth:`resume` since)."""
        return self._draining

    def _checks(self, *, critical_only: bool) -> tuple[dict[str, list[dict[str, Any]]], bool, bool]:
        """The checks of the members (the critical ones only, if asked), and whether a
        critical one failed and whether any other one is not ``"pass"``."""
        checks: dict[str, list[dict[str, Any]]] = {}
        failed = degraded = False
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries, dead = self._read(), 0
        for key, label, ref, critical in entries:
            if critical_only and not critical:
                continue
            primitive = ref()
            if primitive is None:
                dead += 1
                continue
            status, observed, output = primitive.health_check()
            entry: dict[str, Any] = {
                "componentId": key[1],
                "componentType": key[0],
                "observedValue": observed,
                "status": status,
                "time": now,
            }
            if output:
                entry["output"] = output
            checks[label] = [entry]
            if critical:
                entry["critical"] = True
                if status == "fail":
                    failed = True
                elif status != "pass":
                    degraded = True
            elif status != "pass":
                degraded = True
        if not critical_only:  # a partial walk cannot tell the share of dead entries
            self._tidy(entries, dead)
        return checks, failed, degraded


class _Default:
    __slots__ = ("registry",)

    def __init__(self) -> None:
        self.registry = Registry()


_default = _Default()


def default_registry() -> Registry:
    """The registry that primitives join when built with ``name=`` and no ``registry=``."""
    return _default.registry


def set_default_registry(registry: Registry) -> Registry:
    """Replace the default registry; returns the previous one (used by ``buttress.testing``)."""
    previous = _default.registry
    _default.registry = registry
    return previous


def health() -> dict[str, Any]:
    """Health of every primitive in the default registry (IETF health-check shape):
    ``"fail"`` when a critical primitive fails, ``"warn"`` when anything is degraded."""
    return _default.registry.health()


def readiness() -> dict[str, Any]:
    """Whether this process should receive traffic: :meth:`Registry.readiness` of the
    default registry."""
    return _default.registry.readiness()


def liveness() -> dict[str, Any]:
    """Whether this process is alive: :meth:`Registry.liveness` (always ``"pass"``)."""
    return _default.registry.liveness()


def state() -> dict[str, Any]:
    """JSON-serialisable state of every primitive in the default registry."""
    return _default.registry.state()
