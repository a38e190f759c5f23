"""The reliability suite's switches: bounded (CI) or long mode, and the figures report.

``BUTTRESS_RELIABILITY=long`` runs every test of this directory for longer (more
hypothesis examples, a 60 s soak, 500 SIGKILLs per store); the default is the bounded
mode CI runs. ``BUTTRESS_RELIABILITY_REPORT=path.json`` writes the figures the tests
recorded (calls made, faults injected, kills survived, leaks found) to that file.

The mode is an environment variable rather than a command-line option on purpose: a
``pytest_addoption`` hook in this (non-root) conftest is not registered when pytest
is started from the repository root (``python -m pytest``), so ``--reliability=long``
would be refused there as an unknown argument.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
# The tests and the child apps of the crash tests import their siblings and tests/.
for _path in (str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from reliability_support import MODE  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long mode runs many more examples than the 60 s per-test timeout allows."""
    if MODE != "long":
        return
    for item in items:
        if HERE in Path(str(item.path)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(1800))


class Figures:
    """Figures recorded by the tests: ``{test: {figure: value}}``; numbers add up."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def add(self, test: str, **figures: Any) -> None:
        entry = self.data.setdefault(test, {})
        for name, value in figures.items():
            old = entry.get(name)
            if isinstance(value, (int, float)) and isinstance(old, (int, float)):
                entry[name] = old + value
            elif isinstance(value, dict) and isinstance(old, dict):
                for key, item in value.items():
                    old[key] = old.get(key, 0) + item
            else:
                entry[name] = value


_STARTED = time.time()


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    """Where tests record their figures; written as JSON at the end of the session when
    ``BUTTRESS_RELIABILITY_REPORT`` names a file."""
    recorded = Figures()
    yield recorded
    target = os.environ.get("BUTTRESS_RELIABILITY_REPORT")
    if not target:
        return
    report = {
        "mode": MODE,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(_STARTED)),
        "wall_seconds": round(time.time() - _STARTED, 1),
        "tests": recorded.data,
    }
    Path(target).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
