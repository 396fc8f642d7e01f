"""tlunet.evaluate reproduces a run's test metrics; volume metrics against hand values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from tlunet.volume_metrics import dice_iou, hd95, volume_similarity

from .conftest import run_cli


def test_hd95_known_answers() -> None:
    a = np.zeros((3, 9, 9), bool)
    b = np.zeros((3, 9, 9), bool)
    a[1, 2, 2] = True
    b[1, 2, 6] = True  # single voxels 4 pixels apart: every surface distance is 4
    assert hd95(a, b) == pytest.approx(4.0)
    b[1, 2, 6] = False
    b[0, 2, 2] = True  # one slice apart, with slices 3 pixels apart
    assert hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0
    empty = np.zeros_like(a)
    assert hd95(empty, empty) == 0.0
    assert math.isinf(hd95(a, empty))


def test_volume_similarity_and_dice_by_hand() -> None:
    p = np.zeros((2, 4, 4), bool)
    t = np.zeros((2, 4, 4), bool)
    p[0, :2, :2] = True  # 4 voxels
    t[0, :2, :3] = True  # 6 voxels, 4 shared
    assert volume_similarity(p, t) == pytest.approx(1 - 2 / 10)
    assert dice_iou(p, t) == pytest.approx((8 / 10, 4 / 6))
    assert volume_similarity(p & False, t & False) == 1.0
    assert dice_iou(p & False, t & False) == (1.0, 1.0)


def test_evaluate_reproduces_the_run(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tiny_run
    eval_dir = tmp_path / "eval"
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    original = json.loads((run_dir / "metrics.json").read_text())
    again = json.loads((eval_dir / "metrics.json").read_text())
    for name, value in original.items():
        if value is None:
            assert again[name] is None, name
        else:
            assert again[name] == pytest.approx(value, abs=1e-6), name
    patients = list(csv.DictReader(open(eval_dir / "per_patient.csv")))
    info = json.loads((run_dir / "run.json").read_text())
    assert sorted(p["patient"] for p in patients) == info["patients"]["test"]
    slices = list(csv.DictReader(open(eval_dir / "per_slice.csv")))
    assert len(slices) == sum(int(p["slices"]) for p in patients) == original["test/num_slices"]
    assert "test/hd95_per_patient" in again and "test/volume_similarity_per_patient" in again


def test_evaluate_options_reported_separately(tiny_run: Path, tmp_path: Path) -> None:
    eval_dir = tmp_path / "eval"
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            "eval.tta=flip",
            "eval.postprocess=largest_component",
            "eval.threshold=auto",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = list(csv.DictReader(open(eval_dir / "options.csv")))
    names = [r["option"] for r in rows]
    assert names[0] == "baseline" and names[1] == "tta=flip"
    assert names[2] == "postprocess=largest_component" and names[-1] == "all selected"
    original = json.loads((tiny_run / "metrics.json").read_text())
    # The baseline row is the run's own result.
    assert float(rows[0]["dice"]) == pytest.approx(original["test/dice"], abs=1e-6)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["test/dice"] == pytest.approx(float(rows[-1]["dice"]), abs=1e-9)


def test_evaluate_user_errors(tmp_path: Path) -> None:
    out = run_cli(["tlunet.evaluate", f"ckpt_path={tmp_path / 'nope.ckpt'}"], cwd=tmp_path)
    assert (
        out.returncode == 1 and f"ckpt_path '{tmp_path / 'nope.ckpt'}' does not exist" in out.stderr
    )
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    out = run_cli(["tlunet.evaluate", f"ckpt_path={bad}"], cwd=tmp_path)
    assert out.returncode == 1 and "Cannot load checkpoint" in out.stderr
    assert "Traceback" not in out.stderr
