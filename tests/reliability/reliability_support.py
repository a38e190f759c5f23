"""Shared by the reliability tests: the mode (bounded or long) and scaled figures."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

MODE = os.environ.get("BUTTRESS_RELIABILITY", "bounded").strip().lower() or "bounded"
if MODE not in ("bounded", "long"):
    raise ValueError(f"BUTTRESS_RELIABILITY must be 'bounded' or 'long', got {MODE!r}")
LONG = MODE == "long"


def scaled(bounded: int, long: int) -> int:
    """The bounded or the long figure, by mode."""
    return long if LONG else bounded


def examples(bounded: int, long: int, **options: object) -> settings:
    """Hypothesis settings with a mode-dependent example count and no deadline."""
    return settings(
        max_examples=scaled(bounded, long),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
        **options,  # type: ignore[arg-type]
    )
