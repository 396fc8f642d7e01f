"""Uncertainty of per-patient results: bootstrap intervals over patients, paired tests.

With 6-30 test patients a mean Dice moves by several points between seeds or splits; these
intervals say how much a reported number could move if other patients had been drawn.
Resampling is over patients (the unit a study samples), seeded, with scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from tlunet.overlap import dice_from_counts

#: Resamples of every bootstrap interval (percentile method, seed 0).
N_RESAMPLES = 10_000


def bootstrap_ci(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., float],
    confidence: float = 0.95,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*samples)``, resampling the patients (the
    rows shared by ``samples``, paired). ``(nan, nan)`` with fewer than two patients; ``(v, v)``
    when every patient has the same value ``v`` (no spread)."""
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if len(arrays[0]) < 2:
        return float("nan"), float("nan")
    result = stats.bootstrap(
        arrays,
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return float("nan"), float("nan")
    return low, high


def mean_ci(values: Sequence[float], **kwargs) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-patient ``values``."""
    return bootstrap_ci([np.asarray(values)], lambda v: float(np.mean(v)), **kwargs)


def global_dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    """Dice 2TP/(2TP+FP+FN) of summed counts (1 when all are zero)."""
    return dice_from_counts(float(np.sum(tp)), float(np.sum(fp)), float(np.sum(fn)))


def global_dice_ci(
    tp: Sequence[float], fp: Sequence[float], fn: Sequence[float], **kwargs
) -> tuple[float, float]:
    """Bootstrap interval of the global Dice, resampling patients with their pixel counts."""
    return bootstrap_ci([np.asarray(tp), np.asarray(fp), np.asarray(fn)], global_dice, **kwargs)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (1.0 when all are zero,
    NaN with fewer than two pairs)."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2:
        return float("nan")
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
