"""Training curves, the dataset overview, the prediction overlay and the evaluation figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from tlunet.overview import main as overview_main
from tlunet.viz import (
    OVERLAY_ALPHA,
    OVERLAY_COLOURS,
    overlay_errors,
    plot_error_slices,
    plot_per_patient,
    plot_threshold_curves,
    plot_training_curves,
    read_metrics_csv,
)


def test_training_curves_from_a_lightning_csv(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,step,train/loss,val/loss,val/dice,lr-Adam\n"
        ",0,,,,0.001\n"
        "0,9,0.9,,,\n"
        "0,9,,0.8,0.2,\n"
        ",10,,,,0.0005\n"
        "1,19,0.7,,,\n"
        "1,19,,0.6,0.4,\n"
    )
    series = read_metrics_csv(log)
    assert series["val/dice"] == [(0.0, 0.2), (1.0, 0.4)]
    assert series["train/loss"] == [(0.0, 0.9), (1.0, 0.7)]
    # The learning rate is logged by step, at the start of each epoch.
    assert series["lr-Adam"] == [(0.0, 0.001), (1.0, 0.0005)]
    out = plot_training_curves(log, tmp_path / "curves.png")
    assert out is not None and out.stat().st_size > 1000


def test_curves_need_epoch_values(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,other\n")
    assert plot_training_curves(log, tmp_path / "curves.png") is None


def test_dataset_overview(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "overview.png"
    assert overview_main([str(synthetic_root), "--output", str(out), "--per-class", "2"]) == 0
    text = capsys.readouterr().out
    assert "6 patients" in text and "with tumour" in text
    assert out.stat().st_size > 5000
    assert overview_main([str(tmp_path / "nope")]) == 1


def test_overlay_colours_land_on_tp_fp_fn_pixels_exactly() -> None:
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    truth = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    truth[0, :2] = pred[0, :2] = 1  # TP at (0, 0), (0, 1)
    pred[1, 3] = 1  # FP at (1, 3)
    truth[3, 0] = truth[3, 1] = 1  # FN at (3, 0), (3, 1)
    colours = list(OVERLAY_COLOURS.values())
    solid = overlay_errors(gray, truth, pred, alpha=1.0)
    assert solid.shape == (4, 4, 3) and solid.dtype == np.uint8
    expected = np.repeat(gray[..., None], 3, axis=2)  # true negatives: grey, R = G = B
    expected[0, :2] = colours[0]
    expected[1, 3] = colours[1]
    expected[3, :2] = colours[2]
    np.testing.assert_array_equal(solid, expected)
    # Blended (the figures' default): the same pixels change, towards their colour.
    blended = overlay_errors(gray, truth > 0, pred > 0)
    changed = np.any(blended != np.repeat(gray[..., None], 3, axis=2), axis=2)
    np.testing.assert_array_equal(changed, (truth > 0) | (pred > 0))
    a = OVERLAY_ALPHA
    for (y, x), colour in [((0, 1), colours[0]), ((1, 3), colours[1]), ((3, 0), colours[2])]:
        want = np.rint((1 - a) * float(gray[y, x]) + a * np.asarray(colour, np.float64))
        np.testing.assert_array_equal(blended[y, x], want.astype(np.uint8))
    with pytest.raises(ValueError, match="one size"):
        overlay_errors(gray, truth[:3], pred)


def _drawn_figure(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Capture the figure a viz function would save (instead of writing it)."""
    drawn: dict = {}

    def keep(fig, path, dpi=100):
        drawn["fig"] = fig
        return Path(path)

    monkeypatch.setattr("tlunet.viz.save_figure", keep)
    return drawn


def test_per_patient_figure_marks_the_given_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _drawn_figure(monkeypatch)
    summary = {"mean": 0.5, "median": 0.625, "ci_low": 0.25, "ci_high": 0.75}
    plot_per_patient(["b", "a", "c"], [0.9, 0.1, 0.5], [False, False, True], summary, "t", "x.png")
    ax = drawn["fig"].axes[0]
    labels = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert "mean 0.500" in labels and "median 0.625" in labels
    assert "95 % CI of the mean [0.250, 0.750]" in labels
    assert "patient without tumour" in labels
    # Sorted, worst at the bottom: one point per patient.
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "c", "b"]
    points = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert sorted(points[:, 0].tolist()) == [0.1, 0.5, 0.9]
    plt.close(drawn["fig"])
    plot_per_patient(["a"], [0.3], [False], {**summary, "ci_low": None, "ci_high": None}, "", "y")
    labels = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert "95 % CI of the mean: not defined (fewer than 2 patients)" in labels
    plt.close(drawn["fig"])


def test_evaluation_figures_are_png_files(tmp_path: Path) -> None:
    """The per-patient plot without an interval (one patient), the error slices, the curve."""
    out = plot_per_patient(
        ["p"],
        [0.4],
        [False],
        {"mean": 0.4, "median": 0.4, "ci_low": None, "ci_high": None},
        "one patient",
        tmp_path / "per_patient.png",
    )
    gray = np.full((32, 32), 90, np.uint8)
    truth = np.zeros((32, 32), np.uint8)
    truth[8:16, 8:16] = 1
    slices = plot_error_slices(
        [gray, gray],
        [truth, truth],
        [np.roll(truth, 3, 1), truth],
        ["a", "b"],
        tmp_path / "worst.png",
    )
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    curve = plot_threshold_curves(
        [("plain", grid, 1 - np.abs(grid - 0.4), 0.4, 1.0)], 0.5, "t", tmp_path / "thr.png"
    )
    for path in (out, slices, curve):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_patient.png", "thr.png", "worst.png"]
