"""Per-patient volume metrics the clinicians read: HD95, volume similarity, detection.

Volumes are (S, H, W) binary arrays, a patient's slices stacked in slice order. Distances are
in pixels, with the slice step counted as one pixel unless ``spacing`` says otherwise (the
kaggle_3m TIFFs carry no voxel spacing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from tlunet.overlap import dice_from_counts, iou_from_counts


def _crop_to_both(*masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """``masks`` cut to the bounding box of their union. Outside it every mask is empty, as the
    border outside the array counts in :func:`_surface`, so the surfaces and the distances
    between them are exactly those of the whole arrays, for the cost of the box (a tumour is a
    few percent of a volume; figures in BENCHMARKS.md)."""
    union = np.logical_or.reduce(masks)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(union))
    return tuple(m[box] for m in masks)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face-neighbour outside it."""
    return mask & ~ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0
    )


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance between the surfaces of two binary masks, as MONAI's
    ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th
    percentiles (prediction surface to truth surface, and back).

    Surfaces are the voxels with a face-neighbour outside the mask (the array's border counts
    as outside); distances are Euclidean (``scipy.ndimage.distance_transform_edt``), in units of
    ``spacing`` (default one per voxel). ``nan`` when both masks are empty (no surface: nothing
    to measure); ``inf`` when exactly one is empty (a tumour missed entirely, or one predicted
    where there is none).

    Not medpy's ``hd95``, which takes the 95th percentile of both directions pooled: a perfect
    prediction plus a small far blob scores 0 there (the blob's few distances fall above the
    95th percentile of the pooled list) and about 16.7 here (tests/test_evaluate.py).
    """
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return float("nan")
    if not pred.any() or not truth.any():
        return float("inf")
    pred, truth = _crop_to_both(pred, truth)
    sp, st = _surface(pred), _surface(truth)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    return float(max(np.percentile(to_truth[sp], 95), np.percentile(to_pred[st], 95)))


def volume_similarity(pred: np.ndarray, truth: np.ndarray) -> float:
    """1 - |V_pred - V_true| / (V_pred + V_true); 1.0 when both are empty."""
    vp, vt = float(pred.sum()), float(truth.sum())
    return 1.0 if vp + vt == 0 else 1.0 - abs(vp - vt) / (vp + vt)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (1.0 each when both are empty)."""
    tp = float(np.logical_and(pred, truth).sum())
    fp = float(np.logical_and(pred, ~truth.astype(bool)).sum())
    fn = float(np.logical_and(~pred.astype(bool), truth).sum())
    return dice_from_counts(tp, fp, fn), iou_from_counts(tp, fp, fn)
