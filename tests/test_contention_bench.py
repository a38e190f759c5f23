"""The contention benchmark section's verdicts and series (no measuring)."""

from __future__ import annotations

from benchmarks import contention as c


def _report(bulkhead_us: float, health_ms: float) -> c.ContentionReport:
    return c.ContentionReport(
        quick=True,
        rows=[
            c.ContentionRow("tasks", c.TARGET_TASKS, c.SEMAPHORE, 5.0),
            c.ContentionRow("tasks", c.TARGET_TASKS, c.BULKHEAD_ASYNC, bulkhead_us),
            c.ContentionRow("threads", 8, c.BOUNDED, 15.0),
            c.ContentionRow("threads", 8, c.BULKHEAD_SYNC, 16.0),
        ],
        operations=[
            c.OperationRow("health()", c.PRIMITIVES, health_ms),
            c.OperationRow("state()", c.PRIMITIVES, 1.0),
        ],
        slowdown=1.5,
    )


def test_the_async_ratio_gets_a_fixed_slack_in_quick_mode_and_times_stretch(monkeypatch) -> None:
    """The in-run ratio fails just above its target in a full check (factor 1) and above
    target x RATIO_SLACK in the quick guard (factor > 1), whatever the machine; an
    absolute time fails only above target x factor x slowdown, once enforced."""
    monkeypatch.setattr(c, "OPERATIONS_ENFORCED", True)
    # _report(µs per contended call, health ms): the semaphore's figure is 5.0 µs.
    assert _report(6.4, 14.9).failures(2.0) == []
    assert len(_report(6.6, 1.0).failures(1.0)) == 1  # 1.32x > 1.3x, full check
    assert _report(6.6, 1.0).failures(2.0) == []  # 1.32x within the quick slack
    over = 5.0 * c.ASYNC_TARGET * c.RATIO_SLACK + 0.1
    failing = _report(over, 15.1).failures(2.0)
    assert len(failing) == 2
    assert "asyncio.Semaphore, target 1.3x" in failing[0]
    assert failing[1].startswith("health() with 10,000 primitives: 15.1 ms")
    monkeypatch.setattr(c, "OPERATIONS_ENFORCED", False)
    assert len(_report(over, 15.1).failures(2.0)) == 1  # the known miss is shown, not failed


def test_series_and_tables_name_every_figure() -> None:
    """series gives (callers, µs) per implementation and face, and (primitives, ms) per
    operation; the console and Markdown tables show the ratios."""
    report = _report(6.0, 3.0)
    series = report.series
    assert series["buttress.Bulkhead (async) (tasks)"] == [(c.TARGET_TASKS, 6.0)]
    assert series["threading.BoundedSemaphore (threads)"] == [(8, 15.0)]
    assert series["health()"] == [(c.PRIMITIVES, 3.0)]
    assert "1.20x" in report.console()
    assert report.markdown().startswith("## Contention and operations")
