"""Training curves and the dataset overview."""

from __future__ import annotations

from pathlib import Path

from tlunet.overview import main as overview_main
from tlunet.viz import plot_training_curves, read_metrics_csv


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
