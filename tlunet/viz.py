"""Figures: prediction panels like the paper's Fig. 5, training curves, the dataset overview
and the evaluation's pictures (per-patient Dice, worst patients, Dice against threshold).

Predictions are drawn one way everywhere (:func:`overlay_errors`): the FLAIR channel in grey
with true positives, false positives and false negatives in three colours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tlunet.utils import atomic_path  # noqa: E402
from tlunet.volume_metrics import dice_iou  # noqa: E402

#: RGB colours of :func:`overlay_errors`: tumour found, predicted where there is none, missed.
OVERLAY_COLOURS = {
    "true positive": (0, 200, 0),  # green
    "false positive": (255, 0, 255),  # magenta
    "false negative": (0, 170, 255),  # cyan-blue
}
#: Opacity of the overlay colours over the grey image.
OVERLAY_ALPHA = 0.6
#: The FLAIR channel of a kaggle_3m slice (pre-contrast, FLAIR, post-contrast).
FLAIR = 1


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` atomically (creating its folder; the format from the file's
    suffix, PNG without one) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def overlay_errors(
    gray: np.ndarray, truth: np.ndarray, pred: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """A grey slice with the prediction's errors coloured: (H, W, 3) uint8 RGB.

    ``gray``: (H, W) uint8 (the FLAIR channel); ``truth``, ``pred``: (H, W), nonzero = tumour,
    the masks as scored (same size as ``gray``). True positives, false positives and false
    negatives are blended with :data:`OVERLAY_COLOURS` at opacity ``alpha``; true negatives
    keep their grey value (R = G = B = ``gray``).
    """
    gray = np.asarray(gray)
    truth, pred = np.asarray(truth) > 0, np.asarray(pred) > 0
    if gray.ndim != 2 or truth.shape != gray.shape or pred.shape != gray.shape:
        raise ValueError(
            f"overlay_errors needs (H, W) arrays of one size, got image {gray.shape}, "
            f"truth {truth.shape}, prediction {pred.shape}"
        )
    out = np.repeat(gray.astype(np.float32)[..., None], 3, axis=2)
    regions = (pred & truth, pred & ~truth, ~pred & truth)
    for region, colour in zip(regions, OVERLAY_COLOURS.values(), strict=True):
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(colour, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_legend(fig: plt.Figure) -> None:
    """The legend of :func:`overlay_errors`' colours, one row below the panels of ``fig`` (a
    figure with ``layout="constrained"``)."""
    handles = [
        Patch(color=np.asarray(c) / 255.0, label=name) for name, c in OVERLAY_COLOURS.items()
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=7, frameon=False)


def error_counts(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) pixel counts of binary masks (nonzero = tumour)."""
    truth, pred = np.asarray(truth) > 0, np.asarray(pred) > 0
    return (
        int(np.count_nonzero(pred & truth)),
        int(np.count_nonzero(pred & ~truth)),
        int(np.count_nonzero(~pred & truth)),
    )


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
    """Write a panel: one row per slice with the MRI slice and its FLAIR channel with the
    prediction's true positives, false positives and false negatives (:func:`overlay_errors`).

    ``images``: (N, H, W, 3) uint8 (channels pre-contrast, FLAIR, post-contrast shown as RGB);
    ``truths``/``preds``: (N, H, W) in {0, 1}, the same size; ``titles``: one label per row.
    """
    n = len(images)
    fig, axes = plt.subplots(
        n, 2, figsize=(5.4, 2.7 * n + 0.4), squeeze=False, layout="constrained"
    )
    for i in range(n):
        dice = dice_iou(preds[i] > 0, truths[i] > 0)[0]
        axes[i][0].imshow(images[i])
        axes[i][0].set_title(titles[i], fontsize=8)
        axes[i][1].imshow(overlay_errors(images[i][..., FLAIR], truths[i], preds[i]))
        axes[i][1].set_title(f"FLAIR, prediction (Dice {dice:.2f})", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    overlay_legend(fig)
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


def plot_per_patient(
    names: Sequence[str],
    dices: Sequence[float],
    tumour_free: Sequence[bool],
    summary: dict[str, float],
    title: str,
    path: str | Path,
) -> Path:
    """Sorted dot plot of per-patient Dice: one point per patient (worst at the bottom; an open
    circle where the patient's truth has no tumour), with ``summary``'s ``mean``, ``median``
    and bootstrap 95 % interval of the mean (``ci_low``, ``ci_high``) marked and labelled.
    The summary numbers are drawn as given, not recomputed."""
    order = np.argsort(np.asarray(dices, dtype=np.float64), kind="stable")
    n = len(order)
    ys = np.arange(n)
    x = np.asarray(dices, dtype=np.float64)[order]
    free = np.asarray(tumour_free, dtype=bool)[order]
    height = float(np.clip(1.6 + 0.22 * n, 3.2, 16.0))
    fig, ax = plt.subplots(figsize=(8.4, height), layout="constrained")
    low, high = summary.get("ci_low"), summary.get("ci_high")
    if _finite(low) and _finite(high):
        ax.axvspan(
            low,
            high,
            color="tab:blue",
            alpha=0.15,
            lw=0,
            label=f"95 % CI of the mean [{low:.3f}, {high:.3f}]",
        )
    else:  # said, not silently left out
        ax.plot([], [], " ", label="95 % CI of the mean: not defined (fewer than 2 patients)")
    if _finite(summary.get("mean")):
        ax.axvline(summary["mean"], color="tab:blue", lw=1.5, label=f"mean {summary['mean']:.3f}")
    if _finite(summary.get("median")):
        ax.axvline(
            summary["median"],
            color="tab:orange",
            lw=1.5,
            ls="--",
            label=f"median {summary['median']:.3f}",
        )
    ax.scatter(x[~free], ys[~free], s=22, color="black", zorder=3, label="patient")
    if free.any():
        ax.scatter(
            x[free],
            ys[free],
            s=22,
            facecolors="none",
            edgecolors="black",
            zorder=3,
            label="patient without tumour",
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.7, n - 0.3)
    if n <= 60:
        ax.set_yticks(ys, [names[i] for i in order], fontsize=max(5, min(8, int(400 / max(n, 1)))))
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{n} patients, sorted by Dice")
    ax.set_xlabel("Dice of the patient's volume")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.legend(fontsize=7, loc="outside right upper", frameon=False)
    return save_figure(fig, path)


def _finite(value: float | None) -> bool:
    return value is not None and bool(np.isfinite(value))


def plot_error_slices(
    grays: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
) -> Path:
    """One panel per slice, side by side: :func:`overlay_errors` of each ``grays[i]`` (H, W)
    uint8 with ``truths[i]``, ``preds[i]`` (H, W) binary, titled ``titles[i]``; the colours'
    legend below."""
    n = len(grays)
    if n == 0:
        raise ValueError("plot_error_slices needs at least one slice")
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 4.0), squeeze=False, layout="constrained")
    for ax, gray, truth, pred, title in zip(axes[0], grays, truths, preds, titles, strict=True):
        ax.imshow(overlay_errors(gray, truth, pred))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    overlay_legend(fig)
    return save_figure(fig, path)


def plot_threshold_curves(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray, float, float]],
    reference: float | None,
    title: str,
    path: str | Path,
) -> Path:
    """Dice against threshold: one line per ``(label, thresholds, dices, chosen threshold,
    its Dice)``, the chosen threshold marked; ``reference`` (e.g. the checkpoint's threshold)
    as a thin grey line."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    if reference is not None:
        ax.axvline(
            reference, color="grey", lw=0.8, ls=":", label=f"checkpoint's threshold {reference:g}"
        )
    for (label, grid, dices, chosen, best), colour in zip(
        curves, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False
    ):
        ax.plot(grid, dices, marker="o", markersize=3, color=colour, label=label)
        ax.axvline(chosen, color=colour, lw=1, ls="--")
        ax.plot(
            [chosen],
            [best],
            marker="*",
            markersize=12,
            color=colour,
            zorder=3,
            label=f"chosen {chosen:g} (Dice {best:.3f})",
        )
    ax.set_xlabel("threshold (probability at or above: tumour)")
    ax.set_ylabel("Dice")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
