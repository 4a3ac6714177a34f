"""Percentile bootstrap intervals for a mean, a ratio of sums, and a paired difference.

``interval(values)``: resample the n per-example values with replacement ``resamples`` times (seeded),
take each resample's mean, and report the (alpha/2, 1-alpha/2) percentiles around the observed mean.
``ratio_interval(num, den)``: the same for sum(num)/sum(den) (token-weighted loss: per-example loss
sums over per-example token counts). ``paired_interval(a, b)``: resampling *examples* (the same indices
for both), the interval of mean(a - b): the paired bootstrap for "tuned minus baseline on the same
prompts", with ``p_not_better``, the share of resamples where the difference is <= 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 1000


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high


@dataclass(frozen=True)
class PairedInterval(Interval):
    p_not_better: float = 1.0   # share of resamples where mean(a - b) <= 0


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def interval(values: Sequence[float], resamples: int = RESAMPLES, confidence: float = 0.95, seed: int = 0
             ) -> Interval:
    """Mean of ``values`` with its percentile-bootstrap interval (nan for no values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    means = x[_indices(x.size, resamples, seed)].mean(axis=1)
    return Interval(float(x.mean()), *_percentiles(means, confidence), int(x.size))


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], resamples: int = RESAMPLES,
                   confidence: float = 0.95, seed: int = 0) -> Interval:
    """sum(num) / sum(den) with a bootstrap over examples (each example keeps its num and den together)."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if num.size == 0 or den.sum() == 0:
        return Interval(float("nan"), float("nan"), float("nan"), int(num.size))
    idx = _indices(num.size, resamples, seed)
    ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1e-12)
    return Interval(float(num.sum() / den.sum()), *_percentiles(ratios, confidence), int(num.size))


def paired_interval(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, confidence: float = 0.95,
                    seed: int = 0) -> PairedInterval:
    """mean(a - b) over the same examples, with a paired bootstrap interval and ``p_not_better``."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired bootstrap needs the same examples: {x.size} vs {y.size} values")
    if x.size == 0:
        return PairedInterval(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    diff = x - y
    means = diff[_indices(diff.size, resamples, seed)].mean(axis=1)
    low, high = _percentiles(means, confidence)
    return PairedInterval(float(diff.mean()), low, high, int(diff.size), float((means <= 0).mean()))
