"""tlunet.compare: paired per-patient differences, bootstrap interval, Wilcoxon p, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tlunet.compare import compare, main
from tlunet.utils import csv_text

HEADER = [
    "patient",
    "slices",
    "tumour_pixels_true",
    "tumour_pixels_pred",
    "dice",
    "iou",
    "hd95_px",
    "volume_similarity",
    "detected",
]


def _evaluation(path: Path, dice: list[float], truth: list[int] | None = None, names=None) -> Path:
    path.mkdir(parents=True)
    names = names or [f"P{i:02d}" for i in range(len(dice))]
    truth = truth or [100 + i for i in range(len(dice))]
    rows = [
        [n, 10, t, t, d, d / (2 - d), float("inf") if d == 0 else 5 * (1 - d), 0.9, d > 0]
        for n, d, t in zip(names, dice, truth, strict=True)
    ]
    (path / "per_patient.csv").write_text(csv_text(HEADER, rows))
    return path


A = [0.70, 0.80, 0.65, 0.90, 0.00, 0.75, 0.60, 0.85]
B = [0.75, 0.82, 0.70, 0.91, 0.10, 0.74, 0.68, 0.90]


def test_paired_statistics(tmp_path: Path) -> None:
    a = _evaluation(tmp_path / "a", A)
    b = _evaluation(tmp_path / "b", B)
    result = compare(a, b, tmp_path / "out")
    d = np.array(B) - np.array(A)
    dice = result["scores"]["dice"]
    assert result["patients"] == 8 and dice["patients"] == 8
    assert dice["mean_a"] == pytest.approx(np.mean(A)) and dice["mean_b"] == pytest.approx(
        np.mean(B)
    )
    assert dice["mean_difference"] == pytest.approx(d.mean())
    assert dice["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert (dice["b_better"], dice["b_worse"], dice["ties"]) == (7, 1, 0)
    assert dice["ci95_low"] < d.mean() < dice["ci95_high"]
    assert dice["ci95_low"] > 0  # B is better on 7 of 8 patients
    assert "B is better than A" in result["verdict"]
    # HD95: lower is better; the patient A missed (inf) is out of the means but counts as a
    # win of B (finite beats infinite), and A's infinite HD95 is reported.
    hd = result["scores"]["hd95_px"]
    assert hd["patients"] == 7 and hd["excluded_not_finite"] == 1
    assert hd["infinite_a"] == 1 and hd["infinite_b"] == 0
    assert hd["higher_is_better"] is False and hd["b_better"] == 7 and hd["b_worse"] == 1
    stored = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert stored["scores"]["dice"]["mean_difference"] == pytest.approx(d.mean())
    assert "| dice | 8 |" in (tmp_path / "out" / "compare.md").read_text()
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000


def test_no_difference_shown(tmp_path: Path) -> None:
    a = _evaluation(tmp_path / "a", A)
    b = _evaluation(tmp_path / "b", A)
    result = compare(a, b, tmp_path / "out")
    assert result["scores"]["dice"]["wilcoxon_p"] == 1.0
    assert "no difference shown" in result["verdict"]


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _evaluation(tmp_path / "a", A)
    other = _evaluation(tmp_path / "other", B, names=[f"Q{i:02d}" for i in range(len(B))])
    assert main([str(a), str(other), "--output", str(tmp_path / "x")]) == 1
    assert "different patients" in capsys.readouterr().err
    masks = _evaluation(tmp_path / "masks", B, truth=[50 + i for i in range(len(B))])
    assert main([str(a), str(masks), "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "true tumour pixels" in err and "different masks" in err
    assert main([str(a), str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(a), str(tmp_path / "empty")]) == 1
    assert "per_patient.csv" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
