"""Tests for the synthetic kaggle_3m phantom generator (tlunet.data.synthetic)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import REPO
from tlunet.data.synthetic import (
    MARKER_NAME,
    PATIENT_NAME_RE,
    make_phantom_volume,
    write_synthetic_dataset,
)

SMALL = {"num_patients": 5, "slices_per_patient": (6, 10), "image_size": 64, "seed": 3}
IMAGE_RE = re.compile(r"^(?P<patient>SYN_P\d{3}_20000101)_(?P<n>[1-9]\d*)\.tif$")
MASK_RE = re.compile(r"^(?P<patient>SYN_P\d{3}_20000101)_(?P<n>[1-9]\d*)_mask\.tif$")


def _data_files(root: Path) -> list[Path]:
    """The generator's TIFF files (inside SYN_* patient folders only)."""
    return sorted(p for p in root.glob("SYN_P*/*.tif") if p.is_file())


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in _data_files(root)}


def _mtimes(root: Path) -> dict[str, int]:
    paths = [*_data_files(root), root / MARKER_NAME, root / "README.md"]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths}


def _load_patient(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    name = folder.name
    n = len(list(folder.glob(f"{name}_*_mask.tif")))
    images = np.stack([tifffile.imread(folder / f"{name}_{i}.tif") for i in range(1, n + 1)])
    masks = np.stack([tifffile.imread(folder / f"{name}_{i}_mask.tif") for i in range(1, n + 1)])
    return images, masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "kaggle_3m"
    out = write_synthetic_dataset(root, **SMALL)
    assert out == root
    return root


def test_layout_dtypes_and_values(dataset: Path) -> None:
    patients = sorted(p for p in dataset.iterdir() if p.is_dir())
    assert [p.name for p in patients] == [f"SYN_P{i:03d}_20000101" for i in range(1, 6)]
    assert (dataset / "README.md").read_text().lower().count("synthetic") >= 1
    marker = json.loads((dataset / MARKER_NAME).read_text())
    assert marker["params"]["seed"] == SMALL["seed"]
    assert "format_version" in marker

    for folder in patients:
        assert PATIENT_NAME_RE.match(folder.name)
        names = sorted(p.name for p in folder.iterdir())
        images = [m for m in map(IMAGE_RE.match, names) if m]
        masks = [m for m in map(MASK_RE.match, names) if m]
        assert len(images) + len(masks) == len(names), names  # nothing else in the folder
        assert all(m["patient"] == folder.name for m in images + masks)
        numbers = sorted(int(m["n"]) for m in images)
        assert numbers == list(range(1, len(numbers) + 1))  # 1..n, contiguous
        assert sorted(int(m["n"]) for m in masks) == numbers
        assert 6 <= len(numbers) <= 10
        assert f"{folder.name}_1.tif" in names and f"{folder.name}_01.tif" not in names
        for n in numbers:
            img = tifffile.imread(folder / f"{folder.name}_{n}.tif")
            mask = tifffile.imread(folder / f"{folder.name}_{n}_mask.tif")
            assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
            assert mask.dtype == np.uint8 and mask.shape == (64, 64)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert img.max() > 50  # every slice shows some head
            corners = img[:4, :4].astype(int)
            assert corners.max() <= 5  # background ~0


def test_tumour_free_and_mixed_patients(dataset: Path) -> None:
    marker = json.loads((dataset / MARKER_NAME).read_text())
    free, mixed = [], []
    for folder in sorted(p for p in dataset.iterdir() if p.is_dir()):
        _, masks = _load_patient(folder)
        has = masks.reshape(len(masks), -1).max(axis=1) > 0
        if not has.any():
            free.append(folder.name)
            assert marker["lesion_slices"][folder.name] is None
            continue
        assert not has.all()
        mixed.append(folder.name)
        idx = np.flatnonzero(has)
        assert idx.max() - idx.min() + 1 == len(idx)  # contiguous run
        assert not has[0] and not has[-1]  # middle part of the volume
        assert marker["lesion_slices"][folder.name] == [idx.min() + 1, idx.max() + 1]
        area = (masks[has] > 0).reshape(len(idx), -1).mean(axis=1)
        assert area.min() >= 0.005
    assert free and mixed


def test_lesion_is_bright_in_flair(dataset: Path) -> None:
    checked = 0
    for folder in sorted(p for p in dataset.iterdir() if p.is_dir()):
        images, masks = _load_patient(folder)
        if not masks.any():
            continue
        flair = images[..., 1].astype(float)
        lesion = masks == 255
        brain = (flair > 20) & ~lesion
        assert flair[lesion].mean() > flair[brain].mean() + 40
        # the lesion changes the other channels only mildly
        for c in (0, 2):
            diff = abs(images[..., c][lesion].mean() - images[..., c][brain].mean())
            assert diff < 40
        checked += 1
    assert checked


def test_brain_grows_then_shrinks() -> None:
    vol = make_phantom_volume(np.random.default_rng(0), 15, 64, has_lesion=True)
    area = (vol.images[..., 1] > 20).reshape(15, -1).mean(axis=1)
    mid = area[5:10].mean()
    assert area[0] < mid and area[-1] < mid
    # FLAIR has the brightest tissue
    head = vol.images[..., 1] > 20
    means = [vol.images[..., c][head].mean() for c in range(3)]
    assert means[1] == max(means)


def test_determinism(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", **SMALL)
    b = write_synthetic_dataset(tmp_path / "b", **SMALL)
    c = write_synthetic_dataset(tmp_path / "c", **{**SMALL, "seed": SMALL["seed"] + 1})
    snap_a = _snapshot(a)
    assert snap_a and snap_a == _snapshot(b)
    snap_c = _snapshot(c)
    common = set(snap_a) & set(snap_c)
    assert any(snap_a[k] != snap_c[k] for k in common) or set(snap_a) != set(snap_c)


def test_idempotent_and_rewrites_on_change(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "foreign.txt").write_text("keep me")
    (root / "other_dir").mkdir()
    (root / "other_dir" / "x.tif").write_bytes(b"not ours")
    (root / "TCGA_CS_4943_20000902").mkdir()  # a real-looking patient folder is not ours

    write_synthetic_dataset(root, **SMALL)
    before = _mtimes(root)
    time.sleep(0.02)
    write_synthetic_dataset(root, **SMALL)
    assert _mtimes(root) == before

    # different parameters: rewritten cleanly, stale SYN patients removed
    write_synthetic_dataset(root, **{**SMALL, "num_patients": 3, "image_size": 48})
    syn = sorted(p.name for p in root.iterdir() if PATIENT_NAME_RE.match(p.name))
    assert syn == [f"SYN_P{i:03d}_20000101" for i in (1, 2, 3)]
    img = tifffile.imread(root / syn[0] / f"{syn[0]}_1.tif")
    assert img.shape == (48, 48, 3)
    assert json.loads((root / MARKER_NAME).read_text())["params"]["num_patients"] == 3

    # overwrite=True rewrites even when up to date
    before = _mtimes(root)
    time.sleep(0.02)
    write_synthetic_dataset(root, **{**SMALL, "num_patients": 3, "image_size": 48}, overwrite=True)
    after = _mtimes(root)
    assert all(after[k] != before[k] for k in before if k.endswith(".tif"))

    assert (root / "foreign.txt").read_text() == "keep me"
    assert (root / "other_dir" / "x.tif").read_bytes() == b"not ours"
    assert (root / "TCGA_CS_4943_20000902").is_dir()


def test_interrupted_run_is_rewritten(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "data", **SMALL)
    reference = _snapshot(root)
    # simulate an interrupted run: marker missing, one patient half written, a stale patient
    (root / MARKER_NAME).unlink()
    victim = root / "SYN_P002_20000101"
    for p in sorted(victim.glob("*_mask.tif"))[:3]:
        p.unlink()
    stale = root / "SYN_P009_20000101"
    stale.mkdir()
    (stale / "SYN_P009_20000101_1.tif").write_bytes(b"junk")

    write_synthetic_dataset(root, **SMALL)
    assert (root / MARKER_NAME).is_file()
    assert not stale.exists()
    assert _snapshot(root) == reference


def test_foreign_readme_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "README.md").write_text("my notes\n")
    write_synthetic_dataset(root, **SMALL)
    assert (root / "README.md").read_text() == "my notes\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_patients": 0},
        {"slices_per_patient": (2, 5)},
        {"slices_per_patient": (8, 6)},
        {"image_size": 8},
        {"tumour_free_patients": 1.5},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "bad", **kwargs)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tlunet.data.synthetic", str(out)]
    cmd += ["--patients", "3", "--size", "48", "--seed", "1", "--min-slices", "5"]
    cmd += ["--max-slices", "6"]
    env_root = REPO
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=env_root, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / MARKER_NAME).read_text())["params"]["num_patients"] == 3
