"""Figures: prediction panels like the paper's Fig. 5 (slice, true mask, predicted mask)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalised float -> (N, H, W, 3) uint8 for display."""
    mean_a = np.asarray(mean, np.float32)[None, :, None, None]
    std_a = np.asarray(std, np.float32)[None, :, None, None]
    out = (images * std_a + mean_a) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def slice_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of one binary slice (1.0 when both are empty)."""
    inter = float(np.logical_and(truth, pred).sum())
    denom = float(truth.sum() + pred.sum())
    return 1.0 if denom == 0 else 2.0 * inter / denom


def plot_predictions(
    images: np.ndarray,
    truths: np.ndarray,
    preds: np.ndarray,
    titles: Sequence[str],
    path: str | Path,
) -> Path:
    """Write a panel: one row per slice with the MRI slice, the true mask and the predicted mask.

    ``images``: (N, H, W, 3) uint8 (channels pre-contrast, FLAIR, post-contrast shown as RGB);
    ``truths``/``preds``: (N, H, W) in {0, 1}; ``titles``: one label per row.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        dice = slice_dice(truths[i] > 0, preds[i] > 0)
        panels = [
            (images[i], f"{titles[i]}", None),
            (truths[i], "true mask", "gray"),
            (preds[i], f"predicted (Dice {dice:.2f})", "gray"),
        ]
        for ax, (img, title, cmap) in zip(axes[i], panels, strict=True):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1 if cmap else None)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
