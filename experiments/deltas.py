"""Differences over seeds, as the evidence reports them: mean and standard error, range, and how many seeds agree.

A Δ is one seed's difference between two settings evaluated on the same run (or the same sample of data), so the
spread over seeds is the spread of a paired difference.
"""

from __future__ import annotations

import math
import statistics


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (stdev / √n); NaN where undefined."""
    if not values:
        return math.nan, math.nan
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.mean(values), error


def delta_cell(deltas: list[float], digits: int = 3) -> str:
    """``mean [min, max] k/n``: a table cell, k the seeds below 0 (better, for a loss)."""
    below = sum(d < 0 for d in deltas)
    return f"{statistics.mean(deltas):+.{digits}f} [{min(deltas):+.{digits}f}, {max(deltas):+.{digits}f}] {below}/{len(deltas)}"


def paired_summary(deltas: list[float], count: str = "below") -> str:
    """``mean ± s.e. (s.e.), [min, max], k/n seeds below`` (or ``above``: k the seeds with Δ > 0), 4 digits."""
    if count not in ("below", "above"):
        raise ValueError(f"count={count!r}; allowed values: below, above")
    mean, error = mean_and_error(deltas)
    agreeing = sum((d < 0) if count == "below" else (d > 0) for d in deltas)
    return (
        f"{mean:+.4f} ± {error:.4f} (s.e.), [{min(deltas):+.4f}, {max(deltas):+.4f}], "
        f"{agreeing}/{len(deltas)} seeds {count}"
    )
