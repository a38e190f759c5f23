"""Process-wide switches (read only on slow paths, never per call)."""

from __future__ import annotations

__all__ = ["config"]


class _Config:
    __slots__ = ("testing", "testing_attempts")

    def __init__(self) -> None:
        self.testing = False
        self.testing_attempts: int | None = None


config = _Config()
