"""Named primitives, and the health and state views built from them.

Every primitive built with ``name=`` registers itself in a :class:`Registry`
(the default one unless ``registry=`` says otherwise). :func:`health` and
:func:`state` are plain callables returning JSON-ready dicts, so any web
framework can serve them.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigTypeError, DuplicateNameError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["Registry", "default_registry", "health", "state"]

_RANK = {"pass": 0, "warn": 1, "fail": 2}


class Registry:
    """A set of live, named primitives.

    Primitives are held weakly: a primitive that is garbage collected leaves the
    registry, and its name may be reused. Registering a second *live* primitive
    of the same kind under the same name raises :class:`DuplicateNameError`.
    """

    def __init__(self) -> None:
        self._items: weakref.WeakValueDictionary[tuple[str, str], Policy] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

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

    def unregister(self, primitive: Policy) -> None:
        """Remove ``primitive`` from the registry (a no-op if it is not registered); its
        name is free again."""
        if primitive.name is None:
            return
        with self._lock:
            key = (primitive.kind, primitive.name)
            if self._items.get(key) is primitive:
                del self._items[key]

    def get(self, kind: str, name: str) -> Policy | None:
        """The live primitive of ``kind`` named ``name``, or ``None``."""
        with self._lock:
            return self._items.get((kind, name))

    def __iter__(self) -> Iterator[Policy]:
        with self._lock:
            items = sorted(self._items.items())
        return iter([primitive for _, primitive in items])

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        """Forget every registered primitive (tests use it between cases)."""
        with self._lock:
            self._items.clear()

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of every registered primitive, grouped by kind."""
        out: dict[str, Any] = {}
        for primitive in self:
            out.setdefault(primitive.kind, {})[primitive.name] = primitive.snapshot()
        return out

    def health(self) -> dict[str, Any]:
        """Health in the shape of the IETF health-check response draft.

        ``status`` is the worst of the checks: an open breaker fails, a half-open
        breaker or a saturated bulkhead or limiter warns.
        """
        checks: dict[str, list[dict[str, Any]]] = {}
        worst = "pass"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for primitive in self:
            status, observed, output = primitive.health_check()
            entry: dict[str, Any] = {
                "componentId": primitive.name,
                "componentType": primitive.kind,
                "observedValue": observed,
                "status": status,
                "time": now,
            }
            if output:
                entry["output"] = output
            checks[f"{primitive.name}:{primitive.kind}"] = [entry]
            if _RANK[status] > _RANK[worst]:
                worst = status
        return {"status": worst, "checks": checks}


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
    """Health of every primitive in the default registry (IETF health-check shape)."""
    return _default.registry.health()


def state() -> dict[str, Any]:
    """JSON-serialisable state of every primitive in the default registry."""
    return _default.registry.state()
