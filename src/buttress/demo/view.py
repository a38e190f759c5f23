"""The live terminal view and the plain progress lines: what the demo draws, with or
without colours, and the screen it draws on.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from buttress.backends import LogEntry
from buttress.demo.scenario import (
    ATTEMPT_TIMEOUT,
    ATTEMPTS,
    BURST,
    MAX_CONCURRENT,
    MAX_QUEUE,
    PHASES,
    RATE,
    TOTAL_TIMEOUT,
    Demo,
    phase_at,
)
from buttress.demo.shop import (
    CHARGE_ATTEMPTS,
    CHARGE_TIMEOUT,
    SAGA_TIMEOUT,
    STOCK,
    UNDO,
    Checkout,
    SagaRun,
    SagaWatch,
    error_text,
    shell_quote,
)
from buttress.saga import SagaResult

# -- drawing --------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

RESET = "\x1b[0m"
BOLD, DIM = "1", "2"
RED, GREEN, YELLOW, BLUE, CYAN, GREY = "31", "32", "33", "34", "36", "90"

STATE_COLOURS = {"closed": GREEN, "half_open": YELLOW, "open": RED}
STATUS_COLOURS = {"pass": GREEN, "warn": YELLOW, "fail": RED}
PHASE_COLOURS = {"healthy": GREEN, "degraded": YELLOW, "outage": RED, "recovering": CYAN}
SAGA_COLOURS = {
    "completed": GREEN,
    "failed": RED,
    "compensated": YELLOW,
    "compensation_failed": RED,
    "running": CYAN,
    "retrying": YELLOW,
}


@dataclass(frozen=True)
class Glyphs:
    """The characters the view draws with (Unicode, or ASCII for terminals that lack it)."""

    full: str
    empty: str
    dot: str
    arrow: str
    sep: str
    spark: str
    closed: str
    half_open: str
    open: str
    rule: str
    undo: str
    spinner: str


UNICODE = Glyphs("█", "░", "●", "→", "·", " ▁▂▃▄▅▆▇█", "▁", "▄", "█", "─", "↩", "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")
ASCII = Glyphs("#", ".", "*", "->", "|", " .:-=+*#%@", "_", "~", "#", "-", "<", "|/-\\")


def pick_glyphs(stream: TextIO) -> Glyphs:
    """Unicode when ``stream`` can encode it."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(str(v) for v in vars(UNICODE).values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


def visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def fit(line: str, width: int) -> str:
    """Cut ``line`` to ``width`` visible characters, keeping every escape code."""
    if visible_len(line) <= width:
        return line
    out: list[str] = []
    shown = pos = 0
    for match in _ANSI.finditer(line):
        text = line[pos : match.start()][: max(width - shown, 0)]
        out.append(text)
        shown += len(text)
        out.append(match.group())
        pos = match.end()
    out.append(line[pos:][: max(width - shown, 0)])
    return "".join(out)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


# A line of the view and how readily it goes when the terminal is too short for all of
# them: 0 always stays, then lines go from the highest number down, bottom first on ties.
Line = tuple[float, str]
INDENT = " " * 11


def fit_height(lines: Sequence[Line], rows: int) -> list[str]:
    """The lines that fit in ``rows``, dropping the least important ones first."""
    kept = list(lines)
    while len(kept) > rows:
        top = max(priority for priority, _ in kept)
        if top <= 0:
            break
        del kept[max(i for i, (priority, _) in enumerate(kept) if priority == top)]
    return [text for _, text in kept[:rows]]


class View:
    """Turns a :class:`Demo` into lines of text, with or without colour."""

    def __init__(self, demo: Demo, colour: bool, glyphs: Glyphs) -> None:
        self.demo = demo
        self.colour = colour
        self.g = glyphs

    # -- small pieces ----------------------------------------------------------------------

    def paint(self, text: str, *codes: str) -> str:
        if not self.colour or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}{RESET}"

    def label(self, text: str) -> str:
        return self.paint(f"{text:<11}", BOLD, BLUE)

    def num(self, value: int, colour: str | None = None) -> str:
        """A count: dim when zero, bold (in ``colour``) otherwise."""
        if value == 0:
            return self.paint("0", GREY)
        return self.paint(f"{value:,}", *((BOLD, colour) if colour else (BOLD,)))

    def bar(self, value: float, maximum: float, width: int = 10) -> str:
        share = 0.0 if maximum <= 0 else min(max(value / maximum, 0.0), 1.0)
        filled = round(share * width)
        colour = GREEN if share < 0.7 else YELLOW if share < 0.95 else RED
        full = self.paint(self.g.full * filled, colour)
        return full + self.paint(self.g.empty * (width - filled), GREY)

    def join(self, parts: Iterable[str]) -> str:
        return f" {self.paint(self.g.sep, GREY)} ".join(parts)

    def counts(self, pairs: Iterable[tuple[str, int]], colour: str | None = None) -> str:
        return self.join(f"{name} {self.num(n, colour)}" for name, n in pairs)

    def rule(self) -> Line:
        return 3, self.paint(self.g.rule * 96, GREY)

    # -- sections --------------------------------------------------------------------------

    def header(self, final: bool) -> list[Line]:
        demo, s, g = self.demo, self.demo.settings, self.g
        title = self.paint(" buttress demo ", BOLD, "7") if self.colour else "buttress demo"
        info = self.paint(f"payment gateway {g.sep} {s.callers} callers {g.sep} seed {s.seed}", DIM)
        if final:
            clock = self.paint(f"finished in {demo.elapsed():.1f}s", BOLD)
        else:
            elapsed = min(demo.elapsed(), s.seconds)
            clock = f"{self.paint(f'{elapsed:4.1f}s', BOLD)} / {s.seconds:g}s "
            clock += self.bar(elapsed, s.seconds, 16)
            if demo.stopping:
                clock += self.paint("  draining", YELLOW)
        pipeline = f" {g.arrow} ".join(
            [
                "fallback",
                f"timeout {TOTAL_TIMEOUT:g}s",
                f"retry x{ATTEMPTS}",
                "breaker",
                f"bulkhead {MAX_CONCURRENT}+{MAX_QUEUE}",
                f"limiter {RATE:g}/s",
                f"timeout {ATTEMPT_TIMEOUT:g}s",
            ]
        )
        if final:
            story = f" {g.arrow} ".join(p.name for p in PHASES)
            phase_line = f"{self.label('GATEWAY')}{story}"
        else:
            phase = demo.gateway.phase()
            name = self.paint(f"{phase.name.upper():<11}", BOLD, PHASE_COLOURS.get(phase.name, ""))
            phase_line = f"{self.label('GATEWAY')}{name}{phase.note} " + self.paint(
                f"({phase.error_rate:.0%} 503s, {phase.slow_rate:.0%} hang, "
                f"latency x{phase.latency:g})",
                GREY,
            )
        gw = demo.gateway
        return [
            (0, f"{title}  {info}   {clock}"),
            (3, self.paint(pipeline, GREY)),
            (3, ""),
            (0, phase_line),
            (
                2,
                INDENT
                + self.counts(
                    [
                        ("calls", gw.calls),
                        ("503s", gw.errors),
                        ("hangs", gw.slow),
                        ("in flight", gw.in_flight),
                    ]
                ),
            ),
        ]

    def checkouts(self, final: bool) -> list[Line]:
        demo, out = self.demo, self.demo.outcomes
        if final:
            window, span = demo.all_latencies, "whole run"
        else:
            window, span = [seconds for _, seconds in demo.latencies], "last 2s"
        answered = (
            f"latency p50 {self.paint(ms(percentile(window, 0.5)), BOLD)} "
            f"p99 {self.paint(ms(percentile(window, 0.99)), BOLD)} "
            + self.paint(f"(ok calls, {span})", GREY)
        )
        why = ""
        if demo.failures:
            why = "  " + self.paint(
                "(" + ", ".join(f"{k} {v}" for k, v in demo.failures.most_common()) + ")", GREY
            )
        return [
            (
                0,
                f"{self.label('CHECKOUTS')}"
                + self.counts([("started", out.started), ("in progress", out.in_progress)])
                + f"   {answered}",
            ),
            (
                0,
                INDENT
                + self.join(
                    [
                        f"ok {self.num(out.ok, GREEN)}",
                        f"declined {self.num(out.declined)}",
                        f"fallback {self.num(out.deferred, YELLOW)}",
                        f"failed {self.num(out.failed, RED)}",
                    ]
                )
                + why,
            ),
        ]

    def retry_lines(self) -> list[Line]:
        t = self.demo.tally
        budget = self.demo.retry.budget
        causes = self.join(f"{name} {n}" for name, n in t.retry_causes.most_common())
        refused = f" (budget refused {budget.rejected})" if budget is not None else ""
        return [
            (
                0,
                f"{self.label('RETRY')}"
                + self.join(
                    [
                        f"attempts {self.num(self.demo.outcomes.started + t.retries)}",
                        f"retries {self.num(t.retries, YELLOW)}",
                        f"recovered {self.num(t.recovered, GREEN)}",
                        f"gave up {self.num(sum(t.gave_up.values()), RED)}",
                    ]
                ),
            ),
            (
                2,
                INDENT
                + "gave up on "
                + self.counts((r, t.gave_up[r]) for r in ("attempts", "deadline", "budget"))
                + self.paint(f"   retried on {causes or 'nothing yet'}{refused}", GREY),
            ),
        ]

    def breaker_lines(self, final: bool) -> list[Line]:
        breaker = self.demo.breaker
        snap = breaker.snapshot()
        state = str(snap["state"])
        word = self.paint(
            f"{self.g.dot} {state.upper().replace('_', '-')}", BOLD, STATE_COLOURS[state]
        )
        until = snap["seconds_until_half_open"]
        if state == "open" and until is not None:
            word += self.paint(f" half-open in {float(until):.2f}s", GREY)
        elif state == "half_open":
            word += self.paint(f" probing ({snap['half_open_probes']} in flight)", GREY)
        transitions = self.demo.tally.transitions
        opened = sum(1 for tr in transitions if tr.new == "open")
        rate = snap["failure_rate"]
        rate_text = "-" if rate is None else f"{float(rate):.0%}"
        lines: list[Line] = [
            (
                0,
                f"{self.label('BREAKER')}{word}   "
                + self.counts([("opened", opened), ("rejected", int(snap["rejections"]))], RED),
            ),
            (
                2,
                INDENT + f"failed {self.paint(rate_text, BOLD)} of the last {snap['window_calls']} "
                f"calls (opens at {breaker.failure_rate:.0%}) {self.g.sep} reset timeout "
                f"{breaker.reset_timeout:g}s",
            ),
            (
                3,
                INDENT
                + self.paint(
                    f"calls {snap['calls']}: {snap['successes']} ok, {snap['failures']} "
                    f"failed, {snap['neutral']} neutral (declines, our own refusals)",
                    GREY,
                ),
            ),
        ]
        shown = transitions if final else transitions[-4:]
        if len(shown) < len(transitions):
            lines.append((2.9, INDENT + self.paint("...", GREY)))
        for index, tr in enumerate(shown):
            old = self.paint(f"{tr.old:<9}", STATE_COLOURS[tr.old])
            new = self.paint(f"{tr.new:<9}", BOLD, STATE_COLOURS[tr.new])
            at = self.paint(f"+{tr.at:5.2f}s", CYAN)
            text = f"{INDENT}{at}  {old} {self.g.arrow} {new} {self.paint(tr.reason, GREY)}"
            # On a short terminal the oldest go first; the newest two stay with the timeline.
            age = len(shown) - 1 - index
            lines.append((1.0 if age < 2 else 2.0 + age / 10, text))
        if not transitions:
            lines.append((1, INDENT + self.paint("no transitions yet", GREY)))
        return lines

    def bulkhead_lines(self) -> list[Line]:
        bh = self.demo.bulkhead.snapshot()
        in_flight, queued = int(bh["in_flight"]), int(bh["queued"])
        return [
            (
                0,
                f"{self.label('BULKHEAD')}in flight {self.bar(in_flight, MAX_CONCURRENT, 6)} "
                f"{in_flight:>2}/{MAX_CONCURRENT}  queued {self.bar(queued, MAX_QUEUE, 6)} "
                f"{queued:>2}/{MAX_QUEUE}  "
                + self.counts([("rejected", int(bh["rejected"]))], RED)
                + f" {self.g.sep} "
                + self.counts([("waited", self.demo.tally.waited["bulkhead"])]),
            )
        ]

    def limiter_lines(self, final: bool) -> list[Line]:
        demo = self.demo
        rl = demo.limiter.snapshot()
        if final:
            what, rate = "average", int(rl["admitted"]) / max(demo.elapsed(), 1e-9)
        else:
            what, rate = "admitting", demo.admitted_rate()
        return [
            (
                0,
                f"{self.label('LIMITER')}{what} {self.paint(f'{rate:3.0f}/s', BOLD)} "
                f"{self.bar(rate, RATE, 8)} of {RATE:g}/s  "
                + self.counts([("rejected", int(rl["rejected"]))], RED)
                + f" {self.g.sep} "
                + self.counts([("waited", int(rl["waited"]))])
                + self.paint(f"   peak {demo.peak_rate:.0f}/s (burst {BURST})", GREY),
            )
        ]

    def outcome_lines(self) -> list[Line]:
        t = self.demo.tally
        rejected = [
            ("circuit open", t.rejected["circuit_open"]),
            ("rate limited", t.rejected["rate_limited"]),
            ("bulkhead full", t.rejected["bulkhead_full"]),
            ("bulkhead wait", t.rejected["bulkhead_wait_timeout"]),
        ]
        timeouts = [
            (f"attempt {ATTEMPT_TIMEOUT:g}s", t.timeouts["attempt"]),
            (f"checkout {TOTAL_TIMEOUT:g}s", t.timeouts["checkout"]),
        ]
        fallbacks = self.join(f"{name} {n}" for name, n in t.fallbacks.most_common())
        return [
            (0, f"{self.label('REJECTIONS')}{self.counts(rejected, RED)}"),
            (0, f"{self.label('TIMEOUTS')}{self.counts(timeouts, YELLOW)}"),
            (
                2,
                f"{self.label('FALLBACK')}used {self.num(sum(t.fallbacks.values()), YELLOW)}"
                + (self.paint(f"   on {fallbacks}", GREY) if fallbacks else ""),
            ),
        ]

    def health_lines(self) -> list[Line]:
        report = self.demo.registry.health()
        status = str(report["status"])
        word = self.paint(f"{self.g.dot} {status}", BOLD, STATUS_COLOURS[status])
        notes = [
            self.paint(f"{key} {check['status']}", STATUS_COLOURS[check["status"]])
            for key, (check,) in report["checks"].items()
            if check["status"] != "pass"
        ]
        return [(0, f"{self.label('HEALTH')}{word}   " + "  ".join(notes))]

    def timeline_lines(self) -> list[Line]:
        tl, g = self.demo.timeline, self.g
        upto = tl.column(self.demo.elapsed()) + 1
        pad = " " * (tl.columns - upto)
        levels = len(g.spark) - 1

        def spark(values: Sequence[float], top: float) -> str:
            return "".join(
                g.spark[0 if top <= 0 else math.ceil(min(values[i] / top, 1.0) * levels)]
                for i in range(upto)
            )

        # The scenario's own failure rate: the truth the breaker reacts to.
        phases = [phase_at((i + 0.5) / tl.columns) for i in range(upto)]
        gateway = "".join(
            self.paint(g.spark[math.ceil(p.failing * levels)], PHASE_COLOURS[p.name])
            for p in phases
        )
        glyph = {"closed": g.closed, "half_open": g.half_open, "open": g.open}
        breaker = "".join(
            self.paint(glyph[state], STATE_COLOURS[state]) for state in self.breaker_columns(upto)
        )
        top = max(*tl.ok, *tl.bad, 1)
        end = self.paint(f"{self.demo.settings.seconds:g}s", GREY)
        return [
            (1, f"{self.label('TIMELINE')}{self.paint('0s', GREY)}{' ' * (tl.columns - 2)}{end}"),
            (1, f"  {'gateway':<9}{gateway}{pad}" + self.paint("  503s and hangs", GREY)),
            (
                1,
                f"  {'breaker':<9}{breaker}{pad}"
                + self.paint(f"  {g.closed} closed {g.half_open} half-open {g.open} open", GREY),
            ),
            (1, f"  {'ok':<9}{self.paint(spark(tl.ok, top), GREEN)}{pad}"),
            (
                1,
                f"  {'not ok':<9}{self.paint(spark(tl.bad, top), YELLOW)}{pad}"
                + self.paint("  fallback or failed", GREY),
            ),
        ]

    def breaker_columns(self, upto: int) -> list[str]:
        """The state shown in each timeline column: half-open (a probe) over open over closed."""
        tl = self.demo.timeline
        rank = {"closed": 0, "open": 1, "half_open": 2}
        transitions = self.demo.tally.transitions
        shown: list[str] = []
        state, index = "closed", 0
        for column in range(upto):
            end = (column + 1) * tl.seconds / tl.columns
            seen = state
            while index < len(transitions) and transitions[index].at < end:
                state = transitions[index].new
                if rank[state] > rank[seen]:
                    seen = state
                index += 1
            shown.append(seen)
        return shown

    # -- whole views -----------------------------------------------------------------------

    def frame(self, final: bool = False) -> list[Line]:
        return [
            *self.header(final),
            *self.checkouts(final),
            self.rule(),
            *self.retry_lines(),
            *self.breaker_lines(final),
            *self.bulkhead_lines(),
            *self.limiter_lines(final),
            *self.outcome_lines(),
            *self.health_lines(),
            self.rule(),
            *self.timeline_lines(),
        ]

    def progress(self) -> str:
        """The plain one-line report printed every second when not on a terminal."""
        demo, out, t = self.demo, self.demo.outcomes, self.demo.tally
        bh = demo.bulkhead.snapshot()
        phase = "draining" if demo.stopping else demo.gateway.phase().name
        bulkhead = t.rejected["bulkhead_full"] + t.rejected["bulkhead_wait_timeout"]
        return (
            f"[{demo.elapsed():5.1f}s] {phase:<10} | checkouts {out.started}: ok {out.ok}, "
            f"declined {out.declined}, fallback {out.deferred}, failed {out.failed} | "
            f"retries {t.retries}, gave up {sum(t.gave_up.values())} | "
            f"breaker {demo.breaker.state} ({len(t.transitions)} transitions) | "
            f"rejected: circuit open {t.rejected['circuit_open']}, bulkhead {bulkhead}, "
            f"rate limited {t.rejected['rate_limited']}, timeouts {sum(t.timeouts.values())} | "
            f"in flight {bh['in_flight']}/{MAX_CONCURRENT}, queued {bh['queued']} | "
            f"admitted {demo.admitted_rate():.0f}/s of {RATE:g}/s"
        )

    # -- the payment saga ------------------------------------------------------------------

    def saga_status(self, status: str, spin: int | None = None) -> str:
        """A step's (or run's) status, padded and coloured; a spinner while it runs."""
        word = status.replace("_", " ") if status == "not_run" else status
        if spin is not None and status in ("running", "retrying"):
            word = f"{word} {self.g.spinner[spin % len(self.g.spinner)]}"
        colour = SAGA_COLOURS.get(status)
        return (self.paint(word, BOLD, colour) if colour else self.paint(word, GREY)) + " " * max(
            12 - len(word), 1
        )

    def step_row(
        self,
        at: float | None,
        name: str,
        status: str,
        *,
        attempts: int | None = None,
        took: float | None = None,
        detail: str = "",
        spin: int | None = None,
    ) -> str:
        """One line of a run's timeline: when, what, how long, how it ended, in how many
        attempts (the columns of :meth:`attempt_row` too)."""
        when = self.paint("      " if at is None else f"+{ms(max(at, 0.0)):>5}", CYAN)
        tries = "" if not attempts else f"{attempts} attempt{'s' if attempts > 1 else ''}"
        took_text = "" if took is None else ms(took)
        return (
            f"{INDENT}{when}  {name:<15} {took_text:>6}  {self.saga_status(status, spin)}"
            f"{tries:<11}{detail}"
        ).rstrip()

    def attempt_row(self, at: float, number: int, took: float, outcome: str) -> str:
        """One attempt of a step that took several, under the step's line."""
        label = f"  attempt {number}"
        return self.paint(
            f"{INDENT}+{ms(max(at, 0.0)):>5}  {label:<15} {ms(took):>6}  {outcome}", GREY
        )

    def saga_intro(self, checkout: Checkout) -> list[str]:
        g, saga = self.g, checkout.saga
        undo = ", ".join(
            f"{step.name} with {self.paint(UNDO[step.name], BOLD)}"
            for step in saga.all_steps
            if step.name in UNDO
        )
        return [
            self.paint(f"{g.rule * 3} payment saga {g.rule * 3}", BOLD, BLUE),
            f"{self.label('SAGA')}{self.paint(saga.name, BOLD)}: "
            + f" {g.arrow} ".join(step.name for step in saga.all_steps)
            + self.paint(f"   timeout {SAGA_TIMEOUT:g}s, input validated", GREY),
            f"{INDENT}compensate {undo}" + self.paint(" (newest first)", GREY),
            INDENT
            + self.paint(
                f"charge-card: {CHARGE_TIMEOUT:g}s per attempt, retry x{CHARGE_ATTEMPTS} on 503s "
                "and timeouts, a decline is permanent",
                GREY,
            ),
            f"{self.label('RUN LOG')}SQLiteStore {checkout.path}",
        ]

    def run_title(self, run: SagaRun) -> list[Line]:
        order, g = run.order, self.g
        items = ", ".join(f"{item} x{n}" for item, n in order["items"].items())
        facts = f" {g.sep} ".join(
            [
                f"order {order['order']}",
                items,
                f"${order['amount_cents'] / 100:,.2f}",
                order["card"],
                f"key {run.key}",
            ]
        )
        return [
            (0, f"{self.label(f'RUN {run.number}')}{self.paint(run.title, BOLD)}"),
            (2, INDENT + self.paint(facts, GREY)),
        ]

    def saga_live(self, run: SagaRun, watch: SagaWatch, spin: int) -> list[Line]:
        """A run in progress, as its events tell it."""
        now = time.monotonic()
        lines = self.run_title(run)
        undos: list[Line] = []
        for name, step in watch.steps.items():
            at = None if step.started is None else step.started - watch.started
            took = None if step.started is None else (step.ended or now) - step.started
            detail = ""
            if step.error:
                # While it retries, only the message: the line is full enough.
                failed = step.status == "failed"
                text = step.error if failed else step.error.partition(": ")[2] or step.error
                detail = self.paint(text, RED if failed else YELLOW)
            lines.append(
                (
                    1,
                    self.step_row(
                        at,
                        name,
                        step.status,
                        attempts=step.attempt,
                        took=took,
                        detail=detail,
                        spin=spin,
                    ),
                )
            )
            if step.undo_status is not None and step.undo_started is not None:
                undo_took = (step.undo_ended or now) - step.undo_started
                undos.append(
                    (
                        1,
                        self.step_row(
                            step.undo_started - watch.started,
                            f"{self.g.undo} {UNDO.get(name, name)}",
                            step.undo_status,
                            took=undo_took,
                            detail=self.paint(f"undoes {name}", GREY),
                            spin=spin,
                        ),
                    )
                )
        lines.extend(reversed(undos))  # compensations run newest first
        return lines

    def saga_run(self, run: SagaRun, first: SagaRun | None = None) -> list[Line]:
        """A finished run: its step timeline, its compensations, and its result."""
        result, g = run.result, self.g
        assert result is not None
        lines = self.run_title(run)
        if result.replayed:
            calls = run.calls_after - run.calls_before
            lines.append(
                (
                    1,
                    f"{INDENT}no step ran: the key's stored result came back "
                    + self.paint(f"({calls} calls to the services during this run)", GREY),
                )
            )
            stored = ", ".join(f"{step.name} {step.status}" for step in result.steps)
            lines.append((2, INDENT + self.paint(f"stored: {stored}", GREY)))
        else:
            lines.extend(self.timeline_rows(result, run.log or []))
        same = ""
        if first is not None and first.result is not None and result.replayed:
            same = " (same as run 1)" if first.result.run_id == result.run_id else " (NOT run 1's)"
        word = self.paint(f"{g.dot} {result.status}", BOLD, SAGA_COLOURS[result.status])
        facts = [word, f"compensated={result.compensated}", f"replayed={result.replayed}"]
        if not result.replayed:
            facts.append(f"took {ms(result.duration)}")
        lines.append((0, INDENT + self.join(facts)))
        lines.append((0, f"{INDENT}run_id={result.run_id}" + self.paint(same, BOLD)))
        if result.error is not None:
            lines.append((0, INDENT + "error " + self.paint(error_text(result.error), RED)))
        return lines

    def timeline_rows(self, result: SagaResult, log: Sequence[LogEntry]) -> list[Line]:
        """The steps (from the result) and the compensations (from the run log)."""
        starts = [step.started_at for step in result.steps if step.started_at is not None]
        starts += [entry.at for entry in log[:1]]
        zero = min(starts, default=0.0)
        rows: list[Line] = []
        for step in result.steps:
            at = None if step.started_at is None else step.started_at - zero
            if step.status == "failed" and step.error is not None:
                detail = self.paint(error_text(step.error), RED)
            elif step.status in ("compensated", "compensation_failed"):
                detail = self.paint(f"then undone by {UNDO.get(step.name, '?')}", GREY)
            else:
                detail = ""
            rows.append(
                (
                    1,
                    self.step_row(
                        at,
                        step.name,
                        step.status,
                        attempts=step.attempts,
                        took=step.duration,
                        detail=detail,
                    ),
                )
            )
            if len(step.history) > 1:  # each attempt, when there were several
                for number, attempt in enumerate(step.history, 1):
                    what = attempt.error or "ok"
                    rows.append(
                        (
                            2,
                            self.attempt_row(
                                attempt.started_at - zero, number, attempt.duration, what
                            ),
                        )
                    )
        started: dict[str, LogEntry] = {}
        for entry in log:  # compensations, in the order they ran
            if entry.event == "compensation_started":
                started[entry.step] = entry
            elif entry.event in ("compensated", "compensation_failed") and entry.step in started:
                begun = started[entry.step]
                detail = self.paint(f"undoes {entry.step}", GREY)
                if entry.error:
                    detail = self.paint(entry.error, RED) + "  " + detail
                rows.append(
                    (
                        1,
                        self.step_row(
                            begun.at - zero,
                            f"{self.g.undo} {UNDO.get(entry.step, entry.step)}",
                            entry.event,
                            attempts=entry.attempt or None,
                            took=entry.at - begun.at,
                            detail=detail,
                        ),
                    )
                )
        return rows

    def saga_outro(self, checkout: Checkout) -> list[str]:
        calls = checkout.shop.calls
        runs, entries = checkout.log_size()
        services = self.counts(
            (name, calls[name]) for name in ("reserve", "charge", "email", "release", "refund")
        )
        stock = ", ".join(f"{item} {n}" for item, n in checkout.shop.stock.items())
        failed = [run for run in checkout.runs if run.result and run.result.status == "failed"]
        command = f"python -m buttress runs --db {shell_quote(checkout.path)}"
        lines = [
            f"{self.label('SERVICES')}calls: {services}",
            INDENT
            + self.paint(f"stock left: {stock} (of {STOCK}: the declined items are back)", GREY),
            f"{self.label('RUN LOG')}{runs} runs, {entries} log entries "
            + self.paint("(the replay added none), kept after the demo:", GREY),
            f"{INDENT}{self.paint(f'{command} list', BOLD)}",
        ]
        if failed and failed[0].result is not None:
            show = f"{command} show {failed[0].result.run_id[:8]}"
            lines.append(f"{INDENT}{self.paint(show, BOLD)}")
        return lines

    def json_block(self, title: str, payload: dict[str, Any]) -> list[str]:
        text = json.dumps(payload, indent=2, default=str)
        lines = [self.paint(f"{self.g.rule * 3} {title} {self.g.rule * 3}", BOLD, BLUE)]
        if not self.colour:
            return [*lines, *text.splitlines()]
        for line in text.splitlines():
            keyed = re.sub(r'^(\s*)("[^"]*"):', lambda m: f"{m[1]}{self.paint(m[2], CYAN)}:", line)
            lines.append(
                re.sub(
                    r'"(pass|warn|fail)"',
                    lambda m: f'"{self.paint(m[1], BOLD, STATUS_COLOURS[m[1]])}"',
                    keyed,
                )
            )
        return lines


# -- the terminal ---------------------------------------------------------------------------


class Screen:
    """Writes frames: redrawn in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.height = 0

    def draw(self, lines: Sequence[Line], *, clip: bool = True) -> None:
        """Replace the previous frame by ``lines``, cut to the terminal's size if ``clip``."""
        size = shutil.get_terminal_size((100, 40))
        width = max(size.columns - 1, 20)
        if clip:
            texts = fit_height(lines, max(size.lines - 1, 5))
        else:
            texts = [text for _, text in lines]
        parts = []
        if self.height:
            parts.append(f"\x1b[{self.height}A\r")  # back to the top of the last frame
        parts.extend(f"{fit(text, width)}\x1b[K\n" for text in texts)
        parts.append("\x1b[J")  # and clear whatever the last frame left below
        self.stream.write("".join(parts))
        self.stream.flush()
        self.height = len(texts)

    def detach(self) -> None:
        """Leave the last frame where it is: the next :meth:`draw` starts below it."""
        self.height = 0

    def print(self, lines: Iterable[str] = ("",)) -> None:
        self.stream.write("".join(f"{line}\n" for line in lines))
        self.stream.flush()

    def __enter__(self) -> Screen:
        if self.live:
            self.stream.write("\x1b[?25l")  # hide the cursor while redrawing
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live:
            self.stream.write("\x1b[?25h")
            self.stream.flush()
