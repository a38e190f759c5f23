"""Every ```python block in the documentation runs, as written.

The blocks of one page run in order in one shared namespace (fresh per page),
inside an isolated default registry, so a page reads like one script and the
``assert`` statements in its examples double as tests. A failure names the
page, the block number and the line where the block starts.

A page whose examples talk to a server says so with an HTML comment (invisible
in the built site), e.g. ``<!-- requires: redis -->`` or
``<!-- requires: redis, postgres -->``. Its examples use the loopback servers
the backend tests use; when one cannot be reached the page is skipped, or fails
when ``CI`` is set (see ``tests/services.py``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
import textwrap
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from buttress import events
from buttress._config import config
from buttress.testing import isolated_registry
from services import require_postgres, require_redis

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# An opening fence ```python (or ```py), possibly indented (admonitions, tabs) and
# possibly followed by attributes such as title="..."; it is closed by a line made
# only of at least as many of the same fence characters.
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<rest>.*)$")


def _pages() -> list[Path]:
    pages = sorted(DOCS.glob("*.md")) + sorted(DOCS.glob("recipes/*.md"))
    readme = ROOT / "README.md"
    if readme.exists():
        pages.append(readme)
    return pages


def fenced_blocks(text: str) -> Iterator[tuple[int, str, str, str]]:
    """``(line of the opening fence, language, the rest of the fence line, dedented body)``
    of every fenced block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _OPEN.match(lines[index])
        if match is None:
            index += 1
            continue
        indent, fence, lang = match["indent"], match["fence"], match["lang"].lower()
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines):
            line = lines[index]
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        yield start + 1, lang, match["rest"], textwrap.dedent("\n".join(body)) + "\n"
        index += 1  # past the closing fence


_OUTPUT = re.compile(r'title="Output"')


def examples(text: str) -> Iterator[tuple[int, str, str | None]]:
    """``(line, source, expected output)`` of each python block. A ```text block titled
    "Output" right after a python block is what that block must print."""
    pending: tuple[int, str] | None = None
    for line, lang, rest, body in fenced_blocks(text):
        if lang in ("python", "py"):
            if pending is not None:
                yield pending[0], pending[1], None
            pending = (line, body)
        elif lang == "text" and _OUTPUT.search(rest) and pending is not None:
            yield pending[0], pending[1], body
            pending = None
        elif pending is not None:
            yield pending[0], pending[1], None
            pending = None
    if pending is not None:
        yield pending[0], pending[1], None


def python_blocks(text: str) -> Iterator[tuple[int, str]]:
    """``(line number of the opening fence, dedented source)`` of each python block."""
    for line, source, _ in examples(text):
        yield line, source


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


# <!-- requires: redis --> or <!-- requires: redis, postgres --> anywhere in a page
_REQUIRES = re.compile(r"<!--\s*requires:(?P<services>[^>]*?)-->")
_SERVICES = {"redis": require_redis, "postgres": require_postgres}


def required_services(text: str) -> list[str]:
    """The servers a page's examples need, from its ``<!-- requires: ... -->`` comments."""
    names: list[str] = []
    for match in _REQUIRES.finditer(text):
        for raw in match["services"].split(","):
            name = raw.strip().lower()
            if name and name not in names:
                names.append(name)
    return names


def _label(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


PAGES = _pages()


@pytest.fixture
def _clean_globals() -> Iterator[None]:
    """Examples subscribe listeners and flip test switches; never let that leak."""
    saved_listeners = events.hub.listeners
    saved_config = (config.testing, config.testing_attempts)
    try:
        yield
    finally:
        events.hub.listeners = saved_listeners
        config.testing, config.testing_attempts = saved_config


def test_docs_exist() -> None:
    assert (DOCS / "index.md").exists(), "docs/index.md is missing"
    total = sum(len(list(python_blocks(page.read_text(encoding="utf-8")))) for page in PAGES)
    assert total > 0, "no ```python blocks found in the documentation"


def test_requires_marker_parser() -> None:
    text = "<!-- requires: redis -->\ntext\n<!--requires:Postgres, redis-->\n<!-- note -->\n"
    assert required_services(text) == ["redis", "postgres"]
    assert required_services("# no servers <!-- a comment -->") == []


def test_output_blocks_pair_with_the_python_block_before_them() -> None:
    """A ```text title="Output" block is the expected output of the block just above."""
    text = (
        "```python\nprint(1)\n```\n\n"
        '```text title="Output"\n1\n```\n'
        "```python\nx = 2\n```\n"
        "```bash\nls\n```\n"
        '```text title="Output"\norphan\n```\n'
        "```python\nprint(x)\n```\n"
    )
    assert [(line, out) for line, _, out in examples(text)] == [(1, "1\n"), (8, None), (17, None)]


def test_block_parser() -> None:
    text = (
        "intro\n"
        "```python\nx = 1\n```\n"
        "```bash\necho not python\n```\n"
        '!!! note\n    ```python title="t.py"\n    y = x + 1\n    ```\n'
        "````markdown\n```python\nnot code\n```\n````\n"
    )
    blocks = list(python_blocks(text))
    assert [line for line, _ in blocks] == [2, 9]
    assert [source for _, source in blocks] == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.usefixtures("_clean_globals")
@pytest.mark.parametrize("page", PAGES, ids=_label)
def test_page_examples_run(page: Path) -> None:
    label = _label(page)
    text = page.read_text("utf-8")
    for service in required_services(text):
        if service not in _SERVICES:
            pytest.fail(f"{label}: unknown service {service!r} in a requires comment")
        _SERVICES[service]()  # skips (or fails on CI) when the server is unreachable
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with isolated_registry():
        for number, (line, source, expected) in enumerate(examples(text), 1):
            code = compile(
                source, f"{label} (python block {number}, line {line})", "exec", dont_inherit=True
            )
            failure = None
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, namespace)
            except Exception:
                failure = traceback.format_exc()
            if failure is not None:
                pytest.fail(
                    f"{label}: python block {number} (starting at line {line}) failed:\n{failure}",
                    pytrace=False,
                )
            if expected is not None and _lines(printed.getvalue()) != _lines(expected):
                pytest.fail(
                    f"{label}: python block {number} (line {line}) printed:\n"
                    f"{printed.getvalue()}\nbut its Output block says:\n{expected}",
                    pytrace=False,
                )
    # A client a page forgets to close is reported here, against that page, rather than
    # by whichever later test the garbage collector happens to run in.
    namespace.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if leaks:
        pytest.fail(f"{label}: its examples left resources open: {leaks[:3]}", pytrace=False)
