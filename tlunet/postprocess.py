"""Post-processing of predicted volumes and threshold selection.

Masks are a patient's slices stacked into (S, H, W); connected components are 3D with face
connectivity (``scipy.ndimage.label``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tlunet.errors import ConfigError


def parse_postprocess(spec: str | None) -> tuple[str, int] | None:
    """``largest_component`` -> ("largest", 0); ``min_size=N`` -> ("min_size", N); None -> None."""
    if spec in (None, "", "none", "null"):
        return None
    spec = str(spec)
    if spec == "largest_component":
        return ("largest", 0)
    if spec.startswith("min_size="):
        try:
            size = int(spec.split("=", 1)[1])
        except ValueError:
            size = -1
        if size > 0:
            return ("min_size", size)
    raise ConfigError(
        f"eval.postprocess='{spec}' is unknown; use largest_component or min_size=N (N > 0 voxels)."
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


def best_threshold(
    probs: np.ndarray, truths: np.ndarray, grid: np.ndarray | None = None
) -> tuple[float, float]:
    """The threshold of ``grid`` (default 0.05..0.95 by 0.05) maximising the global Dice of
    ``probs >= t`` against ``truths``; returns (threshold, Dice). Ties go to the lowest one."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else np.asarray(grid)
    p = probs.ravel()
    t = truths.ravel().astype(bool)
    positives = float(t.sum())
    best = (float(grid[0]), -1.0)
    for threshold in grid:
        pred = p >= threshold
        tp = float(np.count_nonzero(pred & t))
        denom = float(np.count_nonzero(pred)) + positives
        dice = 1.0 if denom == 0 else 2 * tp / denom
        if dice > best[1]:
            best = (float(threshold), dice)
    return best
