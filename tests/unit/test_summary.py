"""The ending of a training run (tlunet.summary) and the quiet command output (tlunet.cli)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from tlunet.cli import quiet_third_party
from tlunet.summary import HEADLINE_METRICS, print_run_summary

METRICS = {
    "test/dice_per_patient": 0.91234,
    "test/dice_per_patient_median": 0.95,
    "test/dice": 0.93,
    "test/detect_sensitivity": 1.0,
    "test/detect_specificity": 0.875,
    "test/dice_per_image": 0.9,
    "test/iou": 0.87,
    "test/dice_mean_paper": 0.998,
    "test/num_patients": 6.0,
    "test/num_slices": 86.0,
}


def _printed(result: dict) -> str:
    console = Console(record=True, width=200, force_terminal=False)
    print_run_summary(result, console)
    return console.export_text()


def test_one_table_of_the_telling_metrics_then_files_and_next_steps(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    for name in ("metrics.json", "predictions.png", "checkpoints/best.ckpt"):
        (tmp_path / name).write_text("x")
    text = _printed({"metrics": METRICS, "run_dir": str(tmp_path), "synthetic": True})
    assert "Test stage: 86 slices of 6 patients" in text
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in rows]
    assert names[: len(HEADLINE_METRICS)] == [name for name, _ in HEADLINE_METRICS]
    assert "iou" not in names and "dice_mean_paper" not in names  # in metrics.json only
    assert any("0.912" in row and "volume, mean" in row for row in rows)
    assert "All 10 test metrics" in text
    assert f"Run directory: {tmp_path}" in text
    assert f"python -m tlunet.evaluate ckpt_path={tmp_path / 'checkpoints' / 'best.ckpt'}" in text
    assert str(tmp_path / "predictions.png") in text
    assert "data.root=/path/to/kaggle_3m" in text  # a synthetic run points at the real data


def test_real_data_run_is_not_sent_to_the_real_data(tmp_path: Path) -> None:
    text = _printed({"metrics": {}, "run_dir": str(tmp_path), "synthetic": False})
    assert "Test stage" not in text and "kaggle_3m" not in text
    assert f"Run directory: {tmp_path}" in text


def test_not_applicable_metric(tmp_path: Path) -> None:
    metrics = {"test/dice": 0.5, "test/dice_per_patient": None}
    text = _printed({"metrics": metrics, "run_dir": str(tmp_path)})
    assert "not applicable" in text


def test_lightning_tips_and_known_deprecations_are_silenced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="pytorch_lightning.utilities.rank_zero"):
        lightning.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        lightning.info("`Trainer(limit_val_batches=1.0)` was configured so 100% ...")
        lightning.info("GPU available: False, used: False")
        lightning.info("`Trainer(limit_train_batches=1)` was configured so 1 batch per epoch ...")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: False, used: False",
        "`Trainer(limit_train_batches=1)` was configured so 1 batch per epoch ...",  # the user's
    ]


def test_title_says_what_was_tested(tmp_path: Path) -> None:
    result = {"metrics": METRICS, "run_dir": str(tmp_path), "tested": "last weights"}
    assert "Test stage: 86 slices of 6 patients (last weights" in _printed(result)
