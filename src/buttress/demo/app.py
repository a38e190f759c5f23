"""Running the demo: the callers, the live view, the saga, the summary, the exit status."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import time
from typing import TextIO

from buttress.demo.plot import plot_timeline
from buttress.demo.scenario import TOTAL_TIMEOUT, Demo, Settings
from buttress.demo.shop import SAGA_PAUSE, Checkout, shell_quote
from buttress.demo.view import BOLD, Screen, View, pick_glyphs
from buttress.exceptions import (
    BackendError,
)


async def _main(settings: Settings, stream: TextIO) -> int:
    # Room for the labels and legends of the timeline on the terminal (not wider than 64).
    columns = min(max(shutil.get_terminal_size((100, 40)).columns - 41, 20), 64)
    demo = Demo(settings, columns)
    view = View(demo, settings.colour, pick_glyphs(stream))
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    try:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
        handles_sigint = True
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        handles_sigint = False

    every = 0.125 if settings.colour else 1.0  # seconds between frames or progress lines
    # Checkouts still running when time is up may finish; none takes longer than this.
    drain_limit = TOTAL_TIMEOUT + 0.5
    with Screen(stream, live=settings.colour) as screen:
        if not settings.colour:
            screen.print(
                [
                    f"buttress demo: {settings.callers} callers, {settings.seconds:g}s, "
                    f"seed {settings.seed}, then a payment saga (a terminal shows a live view)",
                ]
            )
        tasks = [asyncio.create_task(demo.caller()) for _ in range(settings.callers)]
        next_frame = demo.started + every
        try:
            while True:
                now = time.monotonic()
                if now - demo.started >= settings.seconds or interrupted.is_set():
                    demo.stopping = True
                if demo.stopping and (
                    demo.outcomes.in_progress == 0
                    or now - demo.started >= settings.seconds + drain_limit
                ):
                    break  # callers between checkouts start no new one: they can go
                demo.sample()
                if now >= next_frame:
                    if settings.colour:
                        screen.draw(view.frame())
                    else:
                        screen.print([view.progress()])
                    next_frame += every
                with contextlib.suppress(asyncio.TimeoutError):  # woken early by Ctrl-C
                    await asyncio.wait_for(interrupted.wait(), timeout=0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        demo.sample()
        if settings.colour:
            screen.draw(view.frame(final=True), clip=False)
        else:
            screen.print(["", *(text for _, text in view.frame(final=True))])
        if settings.plot is not None:
            try:
                plot_timeline(demo, settings.plot)
            except OSError as exc:
                screen.print(["", f"(no timeline chart: cannot write {settings.plot}: {exc})"])
            else:
                screen.print(["", f"timeline chart written to {settings.plot}"])
        checkout = None
        if not interrupted.is_set():
            try:
                checkout = Checkout(settings, demo.registry)
            except (OSError, BackendError) as exc:  # no writable temporary directory
                screen.print(["", f"(no payment saga: cannot create its run log: {exc})"])
        try:
            if checkout is not None:
                await _play_saga(checkout, view, screen, interrupted)
                # health() reads a cached look at the run log (it never queries it
                # itself); refresh it now, as a recovery worker does on each pass.
                await checkout.saga.refresh_health_async()
            screen.print(["", *view.json_block("registry.health()", demo.registry.health())])
            screen.print(["", *view.json_block("registry.state()", demo.registry.state())])
            if checkout is not None:
                command = f"python -m buttress runs --db {shell_quote(checkout.path)} list"
                screen.print(["", f"the saga's run log is kept: {view.paint(command, BOLD)}"])
        finally:
            if checkout is not None:
                checkout.close()
            if handles_sigint:  # kept until now: Ctrl-C in the saga ends it between runs
                loop.remove_signal_handler(signal.SIGINT)
    return 130 if interrupted.is_set() else 0


async def _play_saga(
    checkout: Checkout, view: View, screen: Screen, interrupted: asyncio.Event
) -> None:
    """The saga section: three runs, each drawn live (terminal) or printed when done."""
    screen.print(["", *view.saga_intro(checkout)])
    first = checkout.runs[0]
    for index, run in enumerate(checkout.runs):
        if interrupted.is_set():
            break
        screen.print([""])
        if not view.colour:
            await checkout.play(run)
            screen.print(text for _, text in view.saga_run(run, first))
            continue
        if index:
            with contextlib.suppress(asyncio.TimeoutError):  # a pause to follow along
                await asyncio.wait_for(interrupted.wait(), timeout=SAGA_PAUSE)
        screen.detach()
        checkout.watch.reset()  # before the first frame, which comes before the run starts
        task = asyncio.create_task(checkout.play(run))
        spin = 0
        while not task.done():
            screen.draw(view.saga_live(run, checkout.watch, spin))
            spin += 1
            await asyncio.wait({task}, timeout=0.06)
        await task
        screen.draw(view.saga_run(run, first), clip=False)
        screen.detach()
    screen.print(["", *view.saga_outro(checkout)])


def colour_wanted(stream: TextIO, no_color: bool) -> bool:
    """Colours and a live view only on a terminal, and never when asked not to."""
    if no_color or os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    if sys.platform == "win32" and not (os.environ.get("WT_SESSION") or os.environ.get("TERM")):
        return False  # the classic console prints escape codes as text
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run(settings: Settings, stream: TextIO | None = None) -> int:
    """Run the demo to ``stream`` (default stdout); returns the exit status."""
    out = sys.stdout if stream is None else stream
    # Backoff jitter draws from the module-level random generator.
    random.seed(settings.seed)
    try:
        return asyncio.run(_main(settings, out))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, without a traceback on exit.
        if stream is None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
