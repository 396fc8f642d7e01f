"""Dice and IoU from pixel counts: the one definition every tlunet score uses (the metric
class, the per-patient tables of ``evaluate``, threshold tuning, pooled study results).

Both are 1 where the prediction and the truth are both empty (all counts 0). Counts may be
python numbers, numpy arrays or torch tensors (elementwise; tensors give float64 tensors,
arrays float64 arrays, numbers floats)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _ratio_empty_is_one(num: Any, den: Any) -> Any:
    if hasattr(den, "clamp_min"):  # a torch tensor: stays on its device, float64
        num, den = num.double(), den.double()
        return (num / den.clamp_min(1)).where(den > 0, den.new_ones(()))
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.ones_like(den), where=den > 0)
    return float(out) if out.ndim == 0 else out


def dice_from_counts(tp: Any, fp: Any, fn: Any) -> Any:
    """Dice = 2TP / (2TP + FP + FN); 1 when TP = FP = FN = 0."""
    return _ratio_empty_is_one(2 * tp, 2 * tp + fp + fn)


def iou_from_counts(tp: Any, fp: Any, fn: Any) -> Any:
    """IoU (Jaccard) = TP / (TP + FP + FN); 1 when TP = FP = FN = 0."""
    return _ratio_empty_is_one(tp, tp + fp + fn)
