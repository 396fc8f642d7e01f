"""Post-processing of predicted volumes and threshold selection.

Masks are a patient's slices stacked into (S, H, W); connected components are 3D with face
connectivity (``scipy.ndimage.label``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from tlunet.errors import ConfigError
from tlunet.overlap import dice_from_counts
from tlunet.utils import progress


def parse_postprocess(spec: str | None) -> tuple[str, int] | None:
    """``largest_component`` -> ("largest", 0); ``min_size:N`` (or ``min_size=N``, which the
    command line needs quoted) -> ("min_size", N); None -> None."""
    if spec in (None, "", "none", "null"):
        return None
    spec = str(spec)
    if spec == "largest_component":
        return ("largest", 0)
    if spec.startswith(("min_size:", "min_size=")):
        try:
            size = int(spec[len("min_size:") :])
        except ValueError:
            size = -1
        if size > 0:
            return ("min_size", size)
    raise ConfigError(
        f"eval.postprocess='{spec}' is unknown; use largest_component or min_size:N (N > 0 voxels)."
    )


def postprocess_volume(mask: np.ndarray, spec: tuple[str, int] | None) -> np.ndarray:
    """Apply a parsed post-processing to a binary (S, H, W) volume; returns a bool array."""
    mask = mask.astype(bool)
    if spec is None or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    kind, size = spec
    if kind == "largest":
        keep = np.zeros(count + 1, bool)
        keep[1 + int(np.argmax(sizes))] = True
    else:
        keep = np.concatenate([[False], sizes >= size])
    return keep[labels]


def threshold_curve(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    postprocess: tuple[str, int] | None = None,
    grid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The global Dice of ``(probs, truth)`` volumes (each (S, H, W)) thresholded at
    ``probs >= t`` and then post-processed with ``postprocess`` (a parsed spec, per volume), for
    every threshold ``t`` of ``grid`` (default 0.05..0.95 by 0.05): (grid, Dice) float64."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else np.asarray(grid)
    truths = [np.asarray(t).astype(bool) for _, t in volumes]
    dices = np.empty(len(grid), dtype=np.float64)
    for k, threshold in enumerate(progress(grid, "Tuning the threshold")):
        tp = fp = fn = 0
        for (probs, _), truth in zip(volumes, truths, strict=True):
            pred = postprocess_volume(np.asarray(probs) >= threshold, postprocess)
            tp += int(np.count_nonzero(pred & truth))
            fp += int(np.count_nonzero(pred & ~truth))
            fn += int(np.count_nonzero(~pred & truth))
        dices[k] = dice_from_counts(tp, fp, fn)
    return grid, dices


def best_threshold(
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    postprocess: tuple[str, int] | None = None,
    grid: np.ndarray | None = None,
) -> tuple[float, float]:
    """The threshold of :func:`threshold_curve` with the highest global Dice: (threshold,
    Dice). Ties go to the lowest threshold."""
    return pick_threshold(*threshold_curve(volumes, postprocess, grid))


def pick_threshold(grid: np.ndarray, dices: np.ndarray) -> tuple[float, float]:
    """The (threshold, Dice) of a :func:`threshold_curve` with the highest Dice, the lowest
    threshold among equals."""
    best = int(np.argmax(dices))  # the first maximum: grids ascend
    return float(grid[best]), float(dices[best])
