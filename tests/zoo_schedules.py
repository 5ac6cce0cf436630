"""A schedule class shaped like rl-zoo3's ``SimpleLinearSchedule``, for allow-list tests."""

from __future__ import annotations


class SimpleLinearSchedule:
    """Linear interpolation from ``initial`` (progress 1) to ``final`` (progress 0)."""

    def __init__(self, initial: float, final: float = 0.0) -> None:
        self.initial = initial
        self.final = final

    def __call__(self, progress_remaining: float) -> float:
        return self.final + progress_remaining * (self.initial - self.final)
