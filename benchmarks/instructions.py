"""Instructions per call under callgrind: figures that a busy machine does not blur.

``python -m benchmarks.instructions rejection_breaker rejection_retry`` runs every
candidate of the named overhead groups (see :mod:`benchmarks.overhead`) under
``valgrind --tool=callgrind`` twice, with two call counts, and prints the difference
divided by the difference of the counts: start-up, imports and warm-up cancel out. The
hash seed is fixed (``PYTHONHASHSEED=0``) so that both runs execute the same code.

Wall-clock timing stays the benchmark proper (what the quick guard checks); this tool
is for development, when other processes share the machine. It needs valgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from itertools import repeat
from typing import Any

from . import overhead
from ._harness import BARE, Candidate, Group

COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def groups() -> dict[str, Group]:
    return {g.key: g for g in overhead.sync_groups() + overhead.async_groups()}


def _candidate(key: str, label: str) -> tuple[Group, Candidate]:
    group = groups()[key]
    for cand in group.candidates:
        if cand.label == label:
            return group, cand
    raise SystemExit(f"no candidate {label!r} in group {key!r}")


def _run_child(key: str, label: str, calls: int) -> None:
    group, cand = _candidate(key, label)
    if group.is_async:

        async def main() -> None:
            fn = cand.factory()
            for _ in repeat(None, 10):
                await fn(1)
            for _ in repeat(None, calls):
                await fn(1)

        asyncio.run(main())
        return
    fn: Callable[[int], Any] = cand.factory()
    for _ in repeat(None, 10):  # warm-up: first-call caches, lazy imports
        fn(1)
    for _ in repeat(None, calls):
        fn(1)


def _instructions(key: str, label: str, calls: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--child",
        key,
        label,
        str(calls),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{label}: callgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_call(key: str, label: str, low: int, high: int) -> float:
    """Instructions per call of one candidate: the difference of two call counts."""
    return (_instructions(key, label, high) - _instructions(key, label, low)) / (high - low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__)
    parser.add_argument("groups", nargs="*", help="overhead group keys (default: rejection_*)")
    parser.add_argument("--calls", type=int, nargs=2, default=(500, 2500), metavar=("LOW", "HIGH"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        key, label, calls = args.child
        _run_child(key, label, int(calls))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    known = groups()
    keys = args.groups or [k for k in known if k.startswith("rejection_")]
    low, high = args.calls
    for key in keys:
        group = known[key]
        print(f"\n{group.title}")
        figures: dict[str, float] = {}
        for cand in group.candidates:
            try:
                figures[cand.label] = per_call(key, cand.label, low, high)
            except RuntimeError as exc:
                print(f"  {cand.label}: skipped ({str(exc).splitlines()[0]})")
        bare = next((figures.get(c.label) for c in group.candidates if c.role == BARE), None)
        for cand in group.candidates:
            if cand.label not in figures:
                continue
            value = figures[cand.label]
            extra = "" if bare is None or cand.role == BARE else f"  overhead {value - bare:,.0f}"
            print(f"  {cand.label:<34} {cand.role:<12} {value:>10,.0f}{extra}")
        target = group.target
        if target is not None and bare is not None and target.reference in figures:
            mine = [c.label for c in group.candidates if c.role == "buttress"]
            if mine and mine[0] in figures:
                ours = figures[mine[0]] - bare
                ref = figures[target.reference] - bare
                if target.kind == "delta":
                    print(f"  -> +{ours - ref:,.0f} instructions over {target.reference}")
                else:
                    print(f"  -> {ours / ref:.2f}x {target.reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
