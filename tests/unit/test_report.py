"""tlunet.report: rows per run, seeds aggregated, the paper's columns, clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tlunet.report import find_runs, main, write_report


def _fake_run(
    root: Path,
    name: str,
    model: str,
    encoder: str,
    seed: int,
    dice: float,
    aux_head: bool = True,
    config_hash: str | None = None,
    native: bool = True,
) -> None:
    d = root / name
    d.mkdir(parents=True)
    info = {
        "model": model,
        "encoder": encoder,
        "encoder_weights": None,
        "split": "patient",
        "image_size": 64,
        "seed": seed,
        "epochs": 3,
        "monitor": "val/dice_per_patient",
        "best_score": dice - 0.01,
        "train_time_s": 12.5,
        "parameters": 1000,
        "aux_head": aux_head,
        "config_hash": config_hash or f"{model}-{encoder}",
    }
    if native:  # tlunet >= 0.2.0 records the resolution its scores were computed at
        info["scoring"] = {"resolution": [256, 256], "network_input": [64, 64]}
    (d / "run.json").write_text(json.dumps(info))
    metrics = {f"test/{k}": dice for k in ("dice", "iou", "dice_per_patient", "dice_per_image")}
    metrics |= {"test/dice_mean_paper": 0.99, "test/detect_accuracy": 0.9, "test/loss": 0.3}
    metrics |= {"test/dice_keras_batch": dice + 0.05, "test/iou_keras_batch": dice - 0.1}
    metrics["test/detect_sensitivity"] = None  # undefined on this split
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_report_rows_groups_and_paper_columns(tmp_path: Path) -> None:
    _fake_run(tmp_path, "0_unet_densenet121", "unet", "densenet121", 1, 0.70)
    _fake_run(tmp_path, "1_unet_densenet121", "unet", "densenet121", 2, 0.80)
    _fake_run(tmp_path, "2_resunet_none", "resunet", "none", 1, 0.60)
    _fake_run(tmp_path, "3_unet_resnet18", "unet", "resnet18", 1, 0.50)
    # Same model and encoder, other hyper-parameters and no aux head: a configuration of its own.
    _fake_run(tmp_path, "5_unet_densenet121", "unet", "densenet121", 1, 0.4, False, "other")
    (tmp_path / "4_broken").mkdir()
    (tmp_path / "4_broken" / "run.json").write_text(json.dumps({"model": "unet", "seed": 3}))
    files = write_report(tmp_path)
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == 6
    dense = [r for r in rows if r["encoder"] == "densenet121"]
    assert dense[0]["paper_mean_dice"] == str(94.26 / 100)
    assert dense[0]["paper_accuracy"] == str(94.22 / 100)
    assert dense[-1]["paper_accuracy"] == ""  # no aux head: the paper's Accuracy is not comparable
    assert [r for r in rows if r["model"] == "resunet"][0]["paper_model"] == "ResU-Net (scratch)"
    assert [r for r in rows if r["encoder"] == "resnet18"][0]["paper_mean_dice"] == ""
    md = files["md"].read_text()
    # Two seeds of densenet121: mean 75.00, sample std of (70, 80) = 7.07.
    # The paper's Mean Dice/IoU beside dice_keras_batch/iou_keras_batch (80.00 = 75 + 5),
    # the written-definition dice_mean_paper in a column of its own.
    assert (
        "| unet | densenet121 | patient | 2 | 80.00 ± 7.07 | 94.26 | 65.00 ± 7.07 | 91.14 |" in md
    )
    assert "| 90.00 ± 0.00 | 94.22 | 99.00 ± 0.00 | 75.00 ± 7.07 | 75.00 ± 7.07 |" in md
    assert "| resunet | none | patient | 1 |" in md and "| 81.33 |" in md
    assert "4_broken (incomplete)" in md
    assert (
        "| unet | densenet121 | patient | 1 | 45.00 | 94.26 | 30.00 | 91.14 | 90.00 | — | 99.00 |"
        in md
    )
    assert "Mean Dice (ours: dice_keras_batch)" in md
    assert files["png"].stat().st_size > 1000


def test_find_runs_skips_hidden_folders(tmp_path: Path) -> None:
    _fake_run(tmp_path, "a", "unet", "vgg16", 1, 0.5)
    _fake_run(tmp_path, ".hydra/x", "unet", "vgg16", 1, 0.5)
    assert [p.name for p in find_runs(tmp_path)] == ["a"]


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1
    assert "No runs under" in capsys.readouterr().err


def test_runs_scored_before_native_resolution_are_never_averaged_with_new_ones(
    tmp_path: Path,
) -> None:
    _fake_run(tmp_path, "new", "unet", "vgg16", 1, 0.60)
    _fake_run(tmp_path, "old", "unet", "vgg16", 2, 0.90, native=False)
    files = write_report(tmp_path)
    rows = {r["run"]: r for r in csv.DictReader(open(files["csv"]))}
    assert rows["new"]["scoring"] == "native"
    assert rows["old"]["scoring"].startswith("network resolution")
    md = files["md"].read_text()
    assert "| unet | vgg16 | patient | 1 | 65.00 |" in md  # the new run alone, not (60+90)/2
    assert "old (scored at network resolution (before tlunet 0.2.0))" in md


def test_sweep_job_folders_without_a_run_of_their_own(tmp_path: Path) -> None:
    """A failed or killed job is a run (listed as such); a completed job folder without a run
    (a resume through a sweep writes into the run's own folder) is not one."""
    for name, status in (("0_failed", "failed"), ("1_killed", "running"), ("2_done", "completed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job_status.json").write_text(json.dumps({"job": 0, "status": status}))
    assert [p.name for p in find_runs(tmp_path)] == ["0_failed", "1_killed"]
