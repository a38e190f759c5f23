"""buttress's metric set for ``prometheus_client`` (extra ``buttress[prometheus]``).

:func:`instrument` registers the metrics on a ``CollectorRegistry`` (the client's
default one, or yours): counters and histograms fed by events and by
``measured``/``traced`` calls, and gauges read from the primitives' snapshots at
each scrape. Expose them the usual ways (``start_http_server``, ``make_wsgi_app``,
``make_asgi_app``, ``generate_latest``).

The metric names are the OpenTelemetry ones with ``_`` for ``.``, a ``_seconds``
suffix on durations and ``_total`` on counters: ``buttress_calls_total``,
``buttress_call_duration_seconds``, ``buttress_circuit_breaker_state``...
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "buttress.telemetry.prometheus needs prometheus_client: pip install 'buttress[prometheus]'"
    ) from exc

from buttress import events as _events
from buttress.exceptions import ConfigTypeError, ConfigValueError
from buttress.registry import Registry

from . import _metrics
from ._core import Installation

__all__ = ["instrument"]

_GAUGES = tuple(metric for metric in _metrics.METRICS if metric.kind == "gauge")


class _Gauges(Collector):
    """The gauges, read from the primitives' snapshots at each scrape."""

    def __init__(self, primitives: Registry | None) -> None:
        self._primitives = primitives

    def _families(self) -> dict[_metrics.Metric, GaugeMetricFamily]:
        return {
            metric: GaugeMetricFamily(
                metric.prometheus_name, metric.description, labels=metric.labels
            )
            for metric in _GAUGES
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        for reading in _metrics.observe_gauges(self._primitives):
            families[reading.metric].add_metric(list(reading.labels), reading.value)
        return list(families.values())


class _Sink:
    """The counters and histograms of the metric set, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.collectors: list[Any] = []
        self.by_metric: dict[str, Any] = {}
        try:
            for metric in _metrics.METRICS:
                if metric.kind == "counter":
                    collector: Any = Counter(
                        metric.prometheus_name,
                        metric.description,
                        labelnames=metric.labels,
                        registry=registry,
                    )
                elif metric.kind == "histogram":
                    collector = Histogram(
                        metric.prometheus_name,
                        metric.description,
                        labelnames=metric.labels,
                        buckets=_metrics.SECONDS_BUCKETS,
                        registry=registry,
                    )
                else:
                    continue
                self.collectors.append(collector)
                self.by_metric[metric.name] = collector
        except ValueError as exc:  # a name taken on that registry
            for collector in self.collectors:
                registry.unregister(collector)
            raise ConfigValueError(
                f"buttress metrics are already registered on {registry!r} "
                f"(uninstall the first instrument() or use another CollectorRegistry): {exc}"
            ) from exc

    def record(self, measurements: Iterable[_metrics.Measurement]) -> None:
        by_metric = self.by_metric
        for metric, value, labels in measurements:
            child = by_metric[metric.name].labels(*labels)
            if metric.kind == "counter":
                child.inc(value)
            else:
                child.observe(value)


def instrument(
    registry: CollectorRegistry | None = None,
    *,
    primitives: Registry | None = None,
) -> Installation:
    """Register buttress's metrics on ``registry``; returns the handle that unregisters them.

    Args:
        registry: the ``prometheus_client.CollectorRegistry`` to register on (default:
            the client's global ``REGISTRY``). One install per registry at a time.
        primitives: the buttress registry whose primitives the gauges read (default:
            the default registry at the time of each scrape).
    """
    target = REGISTRY if registry is None else registry
    if not isinstance(target, CollectorRegistry):
        raise ConfigTypeError(
            f"registry must be a prometheus_client.CollectorRegistry, got {registry!r} "
            f"({type(registry).__name__})"
        )
    if primitives is not None and not isinstance(primitives, Registry):
        raise ConfigTypeError(
            f"primitives must be a buttress.Registry, got {primitives!r} "
            f"({type(primitives).__name__})"
        )
    sink = _Sink(target)
    gauges = _Gauges(primitives)
    try:
        target.register(gauges)
    except ValueError as exc:
        for collector in sink.collectors:
            target.unregister(collector)
        raise ConfigValueError(f"buttress gauges are already registered on {target!r}") from exc
    mapper = _metrics.EventMapper()

    def listener(event: _events.Event) -> None:
        sink.record(mapper.measure(event))

    unsubscribe = _events.subscribe(listener)
    _metrics.sinks.add(sink)

    def close() -> None:
        unsubscribe()
        _metrics.sinks.remove(sink)
        for collector in (*sink.collectors, gauges):
            target.unregister(collector)

    return Installation(close, "prometheus")
