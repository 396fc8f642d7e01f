"""Figures: prediction panels like the paper's Fig. 5 (slice, true mask, predicted mask)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tlunet.volume_metrics import dice_iou  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, 3, H, W) normalised float -> (N, H, W, 3) uint8 for display."""
    mean_a = np.asarray(mean, np.float32)[None, :, None, None]
    std_a = np.asarray(std, np.float32)[None, :, None, None]
    out = (images * std_a + mean_a) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


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
        dice = dice_iou(preds[i] > 0, truths[i] > 0)[0]
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
    return save_figure(fig, path)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning's CSVLogger file as ``{column: [(epoch, value), ...]}`` (empty cells skipped)."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # Rows logged by step only (LearningRateMonitor) take the epoch of the next row that has one.
    stepped = sorted(
        (float(r["step"]), float(r["epoch"])) for r in rows if r.get("epoch") and r.get("step")
    )
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if not epoch and row.get("step"):
            later = [e for s, e in stepped if s >= float(row["step"])]
            epoch = str(later[0]) if later else None
        if not epoch:
            continue
        for key, value in row.items():
            if key in ("epoch", "step") or value in (None, ""):
                continue
            series.setdefault(key, []).append((float(epoch), float(value)))
    return series


def plot_training_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Loss, validation Dice and learning rate per epoch from a run's ``csv/metrics.csv``.

    Returns the written path, or None when the log holds no epoch-level values yet.
    """
    series = read_metrics_csv(metrics_csv)
    panels = [
        ("loss", ["train/loss", "val/loss"]),
        ("validation", ["val/dice", "val/dice_per_patient", "val/dice_mean_paper"]),
        ("learning rate", [k for k in series if k.startswith("lr-")]),
    ]
    panels = [(t, [k for k in keys if k in series]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, marker="o", markersize=2, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        if title == "learning rate":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dataset_overview(
    images: np.ndarray, masks: np.ndarray, titles: Sequence[str], path: str | Path
) -> Path:
    """Per-channel view of slices: pre-contrast, FLAIR, post-contrast, RGB, FLAIR + mask contour.

    ``images``: (N, H, W, 3) uint8; ``masks``: (N, H, W) in {0, 1}.
    """
    names = ["pre-contrast", "FLAIR", "post-contrast", "RGB", "FLAIR + mask"]
    n = len(images)
    fig, axes = plt.subplots(n, 5, figsize=(11, 2.3 * n), squeeze=False)
    for i in range(n):
        for c in range(3):
            axes[i][c].imshow(images[i][..., c], cmap="gray", vmin=0, vmax=255)
        axes[i][3].imshow(images[i])
        axes[i][4].imshow(images[i][..., 1], cmap="gray", vmin=0, vmax=255)
        if masks[i].any():
            axes[i][4].contour(masks[i], levels=[0.5], colors="r", linewidths=0.8)
        for j, ax in enumerate(axes[i]):
            ax.set_title(f"{titles[i]}\n{names[j]}" if j == 0 else names[j], fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
