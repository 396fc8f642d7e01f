"""The kaggle_3m reader: layout, numeric slice order, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tlunet.data.index import index_kaggle3m, scan_kaggle3m
from tlunet.errors import DataError


def _write_patient(
    root: Path, name: str, numbers: list[int], mask_missing: int | None = None
) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for n in numbers:
        tifffile.imwrite(folder / f"{name}_{n}.tif", np.full((8, 8, 3), n, np.uint8))
        if n != mask_missing:
            tifffile.imwrite(folder / f"{name}_{n}_mask.tif", np.zeros((8, 8), np.uint8))


def test_index_sorts_slices_numerically_and_ignores_extra_files(tmp_path: Path) -> None:
    _write_patient(tmp_path, "TCGA_B_2", [10, 2, 1, 11])
    _write_patient(tmp_path, "TCGA_A_1", [3, 1, 2])
    (tmp_path / "data.csv").write_text("x")
    (tmp_path / "README.md").write_text("x")
    records = index_kaggle3m(tmp_path)
    assert [(r.patient, r.slice) for r in records] == [
        ("TCGA_A_1", 1),
        ("TCGA_A_1", 2),
        ("TCGA_A_1", 3),
        ("TCGA_B_2", 1),
        ("TCGA_B_2", 2),
        ("TCGA_B_2", 10),
        ("TCGA_B_2", 11),
    ]
    r = records[-1]
    assert r.image_path.name == "TCGA_B_2_11.tif"
    assert r.mask_path.name == "TCGA_B_2_11_mask.tif"


def test_index_of_synthetic_set(synthetic_root: Path) -> None:
    records = index_kaggle3m(synthetic_root)
    patients = sorted({r.patient for r in records})
    assert len(patients) == 6
    for p in patients:
        numbers = [r.slice for r in records if r.patient == p]
        assert numbers == list(range(1, len(numbers) + 1))


def test_missing_mask_names_the_image(tmp_path: Path) -> None:
    _write_patient(tmp_path, "P1", [1, 2, 3], mask_missing=2)
    with pytest.raises(DataError, match=r"Missing mask for image '.*P1_2\.tif'"):
        index_kaggle3m(tmp_path)


def test_mask_without_image(tmp_path: Path) -> None:
    _write_patient(tmp_path, "P1", [1, 2])
    (tmp_path / "P1" / "P1_2.tif").unlink()
    with pytest.raises(DataError, match=r"P1_2_mask\.tif' has no matching image"):
        index_kaggle3m(tmp_path)


def test_non_numeric_slice_number(tmp_path: Path) -> None:
    _write_patient(tmp_path, "P1", [1])
    tifffile.imwrite(tmp_path / "P1" / "P1_x.tif", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"Cannot read a slice number from '.*P1_x\.tif'"):
        index_kaggle3m(tmp_path)


def test_duplicate_slice_number(tmp_path: Path) -> None:
    _write_patient(tmp_path, "P1", [1])
    shutil.copy(tmp_path / "P1" / "P1_1.tif", tmp_path / "P1" / "P1_01.tif")
    with pytest.raises(DataError, match="Slice 1 appears twice"):
        index_kaggle3m(tmp_path)


@pytest.mark.parametrize("root", [None, ""])
def test_unset_root(root: str | None) -> None:
    with pytest.raises(DataError, match="data.root is not set"):
        index_kaggle3m(root)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"data.root '{tmp_path / 'nope'}' does not exist"):
        index_kaggle3m(tmp_path / "nope")


def test_root_without_patients_suggests_kaggle3m_subfolder(tmp_path: Path) -> None:
    _write_patient(tmp_path / "kaggle_3m", "P1", [1])
    with pytest.raises(DataError, match=r"Did you mean data.root=.*kaggle_3m"):
        index_kaggle3m(tmp_path)


def test_scan_without_strict_lists_every_problem_and_keeps_the_rest(tmp_path: Path) -> None:
    _write_patient(tmp_path, "P1", [1, 2, 3, 4], mask_missing=2)
    _write_patient(tmp_path, "P2", [1, 2])
    (tmp_path / "P2" / "P2_2.tif").unlink()
    tifffile.imwrite(tmp_path / "P2" / "P2_x.tif", np.zeros((8, 8, 3), np.uint8))
    shutil.copy(tmp_path / "P1" / "P1_3.tif", tmp_path / "P1" / "P1_03.tif")
    records, problems = scan_kaggle3m(tmp_path, strict=False)
    # Slice 3 of P1 is given twice: neither copy (nor its mask) can be trusted.
    assert [(r.patient, r.slice) for r in records] == [("P1", 1), ("P1", 4), ("P2", 1)]
    by_path = {Path(p["path"]).name: p["reason"] for p in problems}
    assert set(by_path) == {"P1_2.tif", "P1_3.tif", "P2_2_mask.tif", "P2_x.tif"}
    assert by_path["P1_2.tif"].startswith("Missing mask for image")
    assert by_path["P1_3.tif"].startswith("Slice 3 appears twice")
    assert "has no matching image" in by_path["P2_2_mask.tif"]
    assert by_path["P2_x.tif"].startswith("Cannot read a slice number")
    # strict (index_kaggle3m) stops at the first of them.
    with pytest.raises(DataError, match="Slice 3 appears twice"):
        scan_kaggle3m(tmp_path, strict=True)


def test_scan_without_strict_still_raises_for_the_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_kaggle3m(tmp_path / "nope", strict=False)
    with pytest.raises(DataError, match="No patient folders"):
        scan_kaggle3m(tmp_path, strict=False)
