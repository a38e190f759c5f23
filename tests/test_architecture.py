"""Layering: integrations, stores, telemetry and the saga runner use only public API.

A module in one of these packages may import from another buttress module only names
that are public (no leading underscore), and only from public modules, with one
exception: the public names of the shared helper modules directly under the package
(``buttress._validate``, ``buttress._deadline``, ``buttress._policy``,
``buttress._drivers``). It may not touch a ``_``-prefixed attribute that its own
package does not define (``breaker._acquire()``, ``policy._wrap_sync(fn)``): those are
another module's internals.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "buttress"
LAYERED = ("integrations", "saga", "backends", "telemetry")
SHARED_HELPERS = {
    "buttress._validate",
    "buttress._deadline",
    "buttress._policy",
    "buttress._drivers",
}


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).glob("*.py"))


def _absolute(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    parts = ["buttress", package][: 3 - level] if level <= 2 else ["buttress"]
    base = ".".join(parts)
    return f"{base}.{module}" if module else base


def _own_private_names(package: str) -> set[str]:
    """``_``-prefixed attributes, methods and functions defined by the package itself."""
    names: set[str] = set()
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries
    return {name for name in names if name.startswith("_")}


def _names_defined_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
    } | {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def violations(package: str) -> list[str]:
    """Every use of another module's private name in ``package``, as ``file:line: what``."""
    own = _own_private_names(package)
    # A subclass of the Policy base may use what the base gives it, on itself.
    inherited = _names_defined_in(SRC / "_policy.py") if (SRC / "_policy.py").exists() else set()
    found = []
    for path in _modules(package):
        where = f"{package}/{path.name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(node.module, node.level, package)
                if not source.startswith("buttress"):
                    continue
                inside = source == f"buttress.{package}" or source.startswith(
                    f"buttress.{package}."
                )
                if inside:
                    continue
                private_module = any(part.startswith("_") for part in source.split(".")[1:])
                if private_module and source not in SHARED_HELPERS:
                    found.append(f"{where}:{node.lineno}: imports from {source}")
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"{where}:{node.lineno}: imports {source}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    private = parts[0] == "buttress" and any(p.startswith("_") for p in parts[1:])
                    if private and alias.name not in SHARED_HELPERS:
                        found.append(f"{where}:{node.lineno}: imports {alias.name}")
            elif isinstance(node, ast.Attribute):
                attr = node.attr
                dunder = attr.startswith("__") and attr.endswith("__")
                on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if on_self and attr in inherited:
                    continue
                if attr.startswith("_") and not dunder and attr not in own:
                    found.append(f"{where}:{node.lineno}: touches .{attr}")
    return found


@pytest.mark.parametrize("package", LAYERED)
def test_layered_packages_use_only_public_api(package: str) -> None:
    """No integration, store, exporter or saga module reaches into another's internals."""
    assert violations(package) == []


def test_the_check_catches_what_it_is_meant_to(tmp_path: Path, monkeypatch) -> None:
    """A module calling a primitive's private method or importing a private name is caught."""
    package = tmp_path / "buttress" / "fake"
    package.mkdir(parents=True)
    (package / "bad.py").write_text(
        "from buttress.retry import _RetryState\n"
        "from buttress._waiters import Waiter\n"
        "from buttress._validate import check_int\n"
        "from ._own import _fine\n"
        "def go(breaker, policy, fn):\n"
        "    breaker._acquire()\n"
        "    return policy._wrap_sync(fn)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "buttress")
    found = violations("fake")
    assert found == [
        "fake/bad.py:1: imports buttress.retry._RetryState",
        "fake/bad.py:2: imports from buttress._waiters",
        "fake/bad.py:6: touches ._acquire",
        "fake/bad.py:7: touches ._wrap_sync",
    ]
