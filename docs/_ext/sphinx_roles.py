"""A Griffe extension: the Sphinx markup in buttress's docstrings, as Markdown.

The docstrings cross-reference with Sphinx roles (``:class:`~buttress.Policy```),
which the API reference (mkdocstrings, Markdown) would otherwise print as they are.
Each role becomes an *optional* cross-reference: a link when the target is rendered
somewhere in the reference, plain code when it is not (a private or stdlib name),
never a broken link. ``.. versionadded::`` / ``.. versionchanged::`` lines become a
sentence. Loaded by mkdocs.yml (``extensions:`` of the python handler); the
docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :class:`~pkg.mod.Name`, :meth:`Name.method`, :func:`title <pkg.func>` (also :py:class:)
_ROLE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|attr|exc|mod|data|obj):`(?P<tilde>~?)(?P<body>[^`]+)`"
)
_VERSION = re.compile(
    r"^(?P<indent>[ \t]*)\.\. version(?P<kind>added|changed)::"
    r"[ \t]*(?P<version>\S+)[ \t]*(?P<text>.*)$",
    re.MULTILINE,
)
_CALLABLE_ROLES = {"func", "meth"}


def _role(match: re.Match[str]) -> str:
    body = match["body"].strip()
    explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        title, target = explicit["title"], explicit["target"].lstrip("~")
    else:
        target = body
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        if match["role"] in _CALLABLE_ROLES and not title.endswith(")"):
            title += "()"
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def _version(match: re.Match[str]) -> str:
    what = "Added" if match["kind"] == "added" else "Changed"
    text = match["text"].strip()
    sentence = f"*{what} in version {match['version']}*"
    return f"{match['indent']}{sentence}: {text}" if text else f"{match['indent']}{sentence}."


def markdown(text: str) -> str:
    """``text`` with its Sphinx roles and version directives rewritten as Markdown."""
    return _VERSION.sub(_version, _ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of a loaded package once it is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = markdown(obj.docstring.value)
            stack.extend(
                member for member in obj.members.values() if not isinstance(member, griffe.Alias)
            )
