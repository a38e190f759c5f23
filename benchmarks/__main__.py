"""``python -m benchmarks``: run the whole suite in one process and print the tables.

Options:

- ``--quick``: fewer and shorter repeats, shorter accuracy, fairness and memory
  runs (well under a minute). Exits with status 1 if any buttress primitive's
  overhead is more than twice its target (a group above that is re-measured once
  first, so one noisy repeat cannot fail the build).
- ``--write-docs``: after the run, rewrite ``docs/benchmarks.md`` from its figures.
- ``--only overhead,accuracy,fairness,memory,sagas``: run a subset (for development).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import warnings
from pathlib import Path

from . import accuracy, fairness, memory, overhead, report, sagas
from ._harness import Group, Settings, measure_async, measure_sync, verdict

FULL = Settings(repeats=7, seconds_per_repeat=0.05)
QUICK = Settings(repeats=5, seconds_per_repeat=0.01)
CONFIRM = Settings(repeats=7, seconds_per_repeat=0.02)

QUICK_FACTOR = 2.0  # --quick fails only above twice the target
SECTIONS = ("overhead", "accuracy", "fairness", "memory", "sagas")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def _measure(group: Group, settings: Settings) -> Group:
    if group.is_async:
        return asyncio.run(measure_async(group, settings))
    return measure_sync(group, settings)


def run_overhead(settings: Settings, quick: bool) -> tuple[list[Group], list[str]]:
    groups = overhead.sync_groups() + overhead.async_groups()
    confirmed = []
    for group in groups:
        _measure(group, settings)
        if quick:
            v = verdict(group)
            if v is not None and not v.within(QUICK_FACTOR):
                print(
                    f"\n[{group.title}: {v.detail} is above {QUICK_FACTOR:g}x the target; "
                    "measuring once more to confirm]"
                )
                _measure(group, CONFIRM)
                confirmed.append(group.title)
        report.print_group(group)
    return groups, confirmed


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short run; CI regression guard")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"rewrite {DOCS.relative_to(DOCS.parent.parent)} from this run",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated subset of: " + ", ".join(SECTIONS),
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Peers may warn (deprecations and the like); a benchmark run is not the place to fail.
    warnings.simplefilter("ignore")
    settings = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    started = time.monotonic()
    print(f"buttress benchmarks ({mode} run)")
    for key, value in report.machine():
        print(f"  {key}: {value}")
    print("  " + ", ".join(f"{name} {version}" for name, version in report.versions()))

    groups: list[Group] = []
    confirmed: list[str] = []
    if "overhead" in args.sections:
        groups, confirmed = run_overhead(settings, args.quick)
    acc = []
    if "accuracy" in args.sections:
        acc = accuracy.run_all(0.6 if args.quick else 2.0)
        report.print_accuracy(acc)
    fair = []
    if "fairness" in args.sections:
        fair = fairness.run_all(0.6 if args.quick else 2.0)
        report.print_fairness(fair)
    mem = None
    if "memory" in args.sections:
        mem = memory.measure(20_000 if args.quick else 100_000)
        report.print_memory(mem)

    saga_report = None
    if "sagas" in args.sections:
        saga_report = sagas.measure(args.quick)
        print("\nSaga runner (3 no-op steps per run)")
        print(report._plain_table(sagas.HEAD, sagas.rows(saga_report)))

    data = report.RunData(mode, settings, groups, acc, fair, mem, confirmed=confirmed)
    data.sagas = saga_report
    data.seconds = time.monotonic() - started
    report.print_summary(data)
    print(f"\nfinished in {data.seconds:.1f} s")

    if args.write_docs:
        DOCS.parent.mkdir(parents=True, exist_ok=True)
        DOCS.write_text(report.markdown(data), encoding="utf-8")
        print(f"wrote {DOCS}")

    status = 0
    over_bound = [r for r in acc if r.is_buttress and r.within() is False]
    for run in over_bound:
        print(f"NOTE: buttress admitted more than its GCRA bound ({run.driver})")
    if args.quick:
        failing = []
        for group in groups:
            if group.target is None:
                continue
            v = verdict(group)
            if v is None:
                failing.append(f"{group.title}: could not be measured (see the table above)")
            elif not v.within(QUICK_FACTOR):
                failing.append(f"{group.title}: {v.detail}, target {group.target.describe()}")
        if saga_report is not None:
            failing += saga_report.failures(QUICK_FACTOR)
        if failing:
            print(f"\nREGRESSION: above {QUICK_FACTOR:g}x the target:")
            for line in failing:
                print(f"  {line}")
            status = 1
        else:
            print(
                f"\nquick check passed: every buttress figure is within {QUICK_FACTOR:g}x "
                "its target"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
