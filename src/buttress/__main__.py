"""The ``python -m buttress`` command line.

Subcommands:
    demo: a flaky payment gateway behind a full pipeline, watched live for a few seconds.
    runs: list, show and recover the saga runs in a SQLite run log.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]


def _version() -> str:
    import buttress

    return buttress.__version__


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.5 <= value <= 3600:  # NaN fails this test too
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 3600 seconds, got {text}")
    return value


def _callers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 10000, got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import (
        MATPLOTLIB_MISSING,
        Settings,
        colour_wanted,
        matplotlib_available,
        plot_path_problem,
        run,
    )

    if args.plot is not None:  # checked before the run, not after it
        problem = MATPLOTLIB_MISSING if not matplotlib_available() else plot_path_problem(args.plot)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 100_000)
    settings = Settings(
        seconds=args.seconds,
        callers=args.callers,
        seed=seed,
        colour=colour_wanted(sys.stdout, args.no_color),
        plot=args.plot,
    )
    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``python -m buttress``: one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m buttress",
        description="buttress: resilience primitives for Python services.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"buttress {_version()}",
        help="print buttress's version and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="watch a pipeline protect a flaky payment API (a few seconds, no setup)",
        description=(
            "Run concurrent callers against a fake payment gateway that degrades, goes "
            "down and recovers, behind fallback, timeout, retry, circuit breaker, bulkhead "
            "and rate limiter, and show live what each primitive does; then run a payment "
            "saga three times (completed, declined and compensated, replayed by its "
            "idempotency key) on a SQLite run log you can inspect afterwards. Ends with the "
            "registry's health() and state() as JSON. On a terminal the view redraws in "
            "place; otherwise (or with --no-color or NO_COLOR set) it prints a plain line "
            "per second."
        ),
    )
    demo.add_argument(
        "--seconds",
        type=_seconds,
        default=8.0,
        metavar="N",
        help="how long the callers run, in seconds (default: 8)",
    )
    demo.add_argument(
        "--callers",
        type=_callers,
        default=50,
        metavar="N",
        help="concurrent callers (default: 50)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="random seed, to replay a run (default: a fresh one, shown in the output)",
    )
    demo.add_argument(
        "--no-color",
        "--no-colour",
        action="store_true",
        help="no colours and no live redraw: a plain line per second (as does NO_COLOR=1)",
    )
    demo.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help=(
            "also draw the run as a timeline chart (breaker state, throughput, retries, "
            "rejections, latency) into this PNG file; needs matplotlib"
        ),
    )
    demo.set_defaults(handler=_run_demo)

    from .saga._cli import add_runs_parser

    add_runs_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
