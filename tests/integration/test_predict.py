"""tlunet.predict on new slices: names, shapes, overlays, areas; never beside the inputs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from tests.conftest import real_data_root, run_cli


def _predict(ckpt: Path, source: Path, out: Path, cwd: Path):
    return run_cli(
        ["tlunet.predict", f"ckpt_path={ckpt}", f"input={source}", f"output={out}"], cwd=cwd
    )


def _check_outputs(source_files: list[Path], out: Path) -> None:
    rows = {r["file"]: r for r in csv.DictReader(open(out / "tumour_area.csv"))}
    assert sorted(rows) == sorted(f.name for f in source_files)
    for f in source_files:
        image = tifffile.imread(f) if f.suffix == ".tif" else cv2.imread(str(f))
        mask = tifffile.imread(out / "masks" / f"{f.stem}.tif")
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert int(rows[f.name]["tumour_pixels"]) == int((mask > 0).sum())
        assert cv2.imread(str(out / "overlays" / f"{f.stem}.png")).shape == (*image.shape[:2], 3)
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(f.stem for f in source_files)


@pytest.mark.slow
def test_predict_patient_folder_file_and_png(
    tiny_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    before = sorted(p.name for p in patient.iterdir())
    out = tmp_path / "pred"
    result = _predict(ckpt, patient, out, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    slices = [p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")]
    _check_outputs(slices, out)
    assert sorted(p.name for p in patient.iterdir()) == before  # inputs untouched
    # One .png slice of another size.
    png = tmp_path / "slice_7.png"
    image = tifffile.imread(slices[0])
    cv2.imwrite(str(png), cv2.cvtColor(cv2.resize(image, (96, 80)), cv2.COLOR_RGB2BGR))
    result = _predict(ckpt, png, tmp_path / "pred_png", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    _check_outputs([png], tmp_path / "pred_png")


@pytest.mark.slow
def test_predict_refuses_to_write_beside_inputs(
    tiny_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    patient = tmp_path / "patient"
    shutil.copytree(sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0], patient)
    before = {p.name: p.read_bytes() for p in patient.iterdir()}
    result = _predict(tiny_run / "checkpoints" / "best.ckpt", patient, patient, tmp_path)
    assert result.returncode == 1 and "is the input's folder" in result.stderr
    assert {p.name: p.read_bytes() for p in patient.iterdir()} == before


@pytest.mark.slow
def test_predict_on_a_real_patient_folder(tiny_run: Path, tmp_path: Path) -> None:
    root = real_data_root()
    patient = root / "TCGA_CS_4943_20000902"
    out = tmp_path / "real"
    result = _predict(tiny_run / "checkpoints" / "best.ckpt", patient, out, tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    slices = [p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")]
    assert len(slices) == 20
    _check_outputs(slices, out)
