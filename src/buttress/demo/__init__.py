"""``python -m buttress demo``: a flaky payment gateway behind a full pipeline, watched live.

Concurrent callers check out against a fake, async payment gateway whose health changes
during the run: healthy, degraded, an outage, recovery. Every charge goes through::

    fallback -> timeout (whole checkout) -> retry (jittered backoff, shared budget)
        -> circuit breaker -> bulkhead -> rate limiter -> timeout (one attempt) -> gateway

A listener counts the events of every primitive. On a terminal the view redraws in place
several times a second; anywhere else (pipes, CI, ``--no-color``, ``NO_COLOR``) the demo
prints one plain progress line per second and no escape codes. Both end with a summary.

Then one checkout runs as a payment saga (reserve-stock -> charge-card -> send-email, with
release-stock and refund as compensations) on a SQLite run log in a temporary directory,
kept for ``python -m buttress runs --db PATH list``: a run that completes (after 503s), one
whose card is declined and compensates, and the first run's idempotency key again, which
replays its stored result. On a terminal each run is drawn live from the saga's events.
Last come the registry's ``health()`` and ``state()`` as JSON, the saga included.

The modules, by concern: ``scenario`` (the gateway, its phases, the pipeline and the
counts), ``shop`` (the payment saga), ``view`` (the terminal view and the plain lines),
``plot`` (``--plot``, with matplotlib) and ``app`` (running it all). The primitives live
in a registry of their own, so the demo never touches the default one. Standard library
only, like the rest of buttress; ``--plot`` needs matplotlib.
"""

from buttress.demo.app import colour_wanted, run
from buttress.demo.plot import MATPLOTLIB_MISSING, matplotlib_available, plot_path_problem
from buttress.demo.scenario import Settings

__all__ = [
    "MATPLOTLIB_MISSING",
    "Settings",
    "colour_wanted",
    "matplotlib_available",
    "plot_path_problem",
    "run",
]
