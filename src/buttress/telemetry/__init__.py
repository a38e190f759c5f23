"""Telemetry: buttress's events as logs, traces and metrics.

- :mod:`buttress.telemetry.logging`: every event as a :mod:`logging` record with
  structured ``extra`` fields (works with structlog's stdlib integration). No
  dependency.
- :mod:`buttress.telemetry.otel`: OpenTelemetry spans (``traced()`` calls, saga runs
  and steps) and metrics. Extra ``buttress[otel]``.
- :mod:`buttress.telemetry.prometheus`: the same metrics for ``prometheus_client``.
  Extra ``buttress[prometheus]``.
- :func:`measured`: the call-level hook that feeds the call metrics (calls,
  failures, durations) to whichever metrics backends are installed.

The optional libraries are imported only by the module that needs them.
"""

from ._core import Installation as Installation
from ._core import Measured as Measured
from ._core import measured as measured

__all__ = ["Installation", "Measured", "measured"]
