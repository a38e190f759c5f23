"""The API reference (docs/reference/) covers every public name, and every public name,
method and property has a docstring for it to render.

A method that implements one of buttress's documented protocols (a store, a binding, a
clock) may rely on the protocol's docstring: that is the contract it keeps, and the
reference shows it on the protocol.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import buttress
from buttress import backends, clock

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"


def _discover() -> tuple[str, ...]:
    """Every public module of the package: no part of its dotted name starts with ``_``
    (the demo, an application rather than an API, is left out)."""
    found = ["buttress"]
    for info in pkgutil.walk_packages(buttress.__path__, "buttress."):
        parts = info.name.split(".")
        if any(part.startswith("_") for part in parts) or parts[1] == "demo":
            continue
        found.append(info.name)
    return tuple(sorted(found))


PUBLIC_MODULES = _discover()

PROTOCOLS = (
    clock.Clock,
    backends.SagaStore,
    backends.AsyncSagaStore,
    backends.IdempotencyStore,
    backends.AsyncIdempotencyStore,
    backends.BreakerStore,
    backends.BulkheadStore,
    backends.LimiterStore,
    backends.BreakerBinding,
    backends.BulkheadBinding,
    backends.LimiterBinding,
)


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # an extra that is not installed
        pytest.skip(f"{name} needs an extra: {exc}")


def _public(name: str) -> list[tuple[str, object]]:
    module = _module(name)
    assert hasattr(module, "__all__"), f"the public module {name} declares no __all__"
    return [(item, getattr(module, item)) for item in module.__all__]


def _documented(obj: object) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def _contract(method: str) -> bool:
    return any(_documented(getattr(p, method, None)) for p in PROTOCOLS if hasattr(p, method))


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_method_and_property_has_a_docstring(module_name: str) -> None:
    """A public class or function without a docstring renders as an empty entry."""
    undocumented: list[str] = []
    for name, obj in _public(module_name):
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj)):
            continue  # constants and type aliases are described by their module
        if not _documented(obj):
            undocumented.append(name)
        if not inspect.isclass(obj) or not obj.__module__.startswith("buttress"):
            continue
        for member in dir(obj):
            if member.startswith("_"):
                continue
            static = inspect.getattr_static(obj, member, None)
            function = static.fget if isinstance(static, property) else static
            if isinstance(function, (staticmethod, classmethod)):
                function = function.__func__
            if not inspect.isfunction(function):
                continue
            owner = next(c for c in obj.__mro__ if member in vars(c))
            if not owner.__module__.startswith("buttress"):
                continue
            if not _documented(getattr(obj, member)) and not _contract(member):
                undocumented.append(f"{name}.{member}")
    assert undocumented == [], f"{module_name}: no docstring for {sorted(set(undocumented))}"


def _rendered() -> tuple[set[str], set[int]]:
    """The modules the reference renders whole, and the ids of every object it renders."""
    modules: set[str] = set()
    objects: set[int] = set()
    for page in REFERENCE.glob("*.md"):
        for path in re.findall(r"^::: (\S+)\s*$", page.read_text(), re.MULTILINE):
            try:
                target: object = importlib.import_module(path)
            except ImportError:
                parent, _, attr = path.rpartition(".")
                target = getattr(importlib.import_module(parent), attr)
            objects.add(id(target))
            if inspect.ismodule(target):
                modules.add(path)
                objects.update(id(getattr(target, n)) for n in getattr(target, "__all__", ()))
    return modules, objects


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_the_reference_renders_every_public_name(module_name: str) -> None:
    """Each public name is in the reference: its module is rendered whole, or the name
    (or the object it names) is."""
    modules, objects = _rendered()
    if module_name in modules:
        return
    missing = [
        name
        for name, obj in _public(module_name)
        if id(obj) not in objects and not isinstance(obj, (str, int, float, tuple, frozenset))
    ]
    assert missing == [], f"{module_name}: not in docs/reference/: {missing}"


def test_every_guide_links_to_its_reference_page() -> None:
    """The prose guides send readers to the reference, and the reference back to them."""
    for page in sorted(REFERENCE.glob("*.md")):
        if page.name == "index.md":
            continue
        guide = re.search(r"\]\(\.\./([\w-]+\.md)\)", page.read_text())
        assert guide is not None, f"{page.name} names no guide"
        text = (ROOT / "docs" / guide[1]).read_text()
        assert f"reference/{page.name}" in text, f"{guide[1]} does not link to {page.name}"


def test_the_top_level_names_are_all_public_modules_or_their_names() -> None:
    """buttress.__all__ lists only names the reference can find."""
    assert sorted(buttress.__all__) == list(buttress.__all__)
