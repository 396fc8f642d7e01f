"""Per-patient volume metrics the clinicians read: HD95, volume similarity, detection.

Volumes are (S, H, W) binary arrays, a patient's slices stacked in slice order. Distances are
in pixels, with the slice step counted as one pixel unless ``spacing`` says otherwise (the
kaggle_3m TIFFs carry no voxel spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it."""
    return mask & ~ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0
    )


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks.

    0.0 when both are empty; ``inf`` when exactly one is empty (no distance exists).
    Surface distances come from ``scipy.ndimage.distance_transform_edt``.
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    sp, st = _surface(pred), _surface(truth)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    distances = np.concatenate([to_pred[st], to_truth[sp]])
    return float(np.percentile(distances, 95))


def volume_similarity(pred: np.ndarray, truth: np.ndarray) -> float:
    """1 - |V_pred - V_true| / (V_pred + V_true); 1.0 when both are empty."""
    vp, vt = float(pred.sum()), float(truth.sum())
    return 1.0 if vp + vt == 0 else 1.0 - abs(vp - vt) / (vp + vt)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (1.0 each when both are empty)."""
    tp = float(np.logical_and(pred, truth).sum())
    fp = float(np.logical_and(pred, ~truth.astype(bool)).sum())
    fn = float(np.logical_and(~pred.astype(bool), truth).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
