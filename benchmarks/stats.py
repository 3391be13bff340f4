"""Medians and spread of repeated measurements."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and range of repeated measurements of one quantity."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    count: int

    def spread(self, digits: int = 2) -> str:
        """Return the range as ``min-max`` with ``digits`` decimals."""
        return f"{self.minimum:.{digits}f}-{self.maximum:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Summarize repeated measurements.

    :raises ValueError: when ``values`` is empty
    """
    if not values:
        raise ValueError("summarize() needs at least one value, got none")
    if len(values) == 1:
        only = values[0]
        return Summary(only, only, only, only, only, 1)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(
        median=statistics.median(values),
        q1=q1,
        q3=q3,
        minimum=min(values),
        maximum=max(values),
        count=len(values),
    )
