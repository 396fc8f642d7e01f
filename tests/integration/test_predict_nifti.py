"""tlunet.predict on NIfTI cases and on kaggle_3m folders (of patient folders).

Every input problem is reported before the checkpoint is read: the fast tests give a
checkpoint path that does not exist, so reaching it would fail with another message.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import tlunet.predict as predict_module
from tests.conftest import CONF_DIR, run_cli
from tests.nifti_phantoms import dice, oblique_affine, write_phantom_case, write_volume
from tlunet.data.synthetic import make_phantom_volume
from tlunet.errors import ConfigError, DataError

NO_CKPT = "/nonexistent/best.ckpt"


def _cfg(source: Path, out: Path, *overrides: str, ckpt: str | Path = NO_CKPT) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="predict",
            overrides=[f"ckpt_path={ckpt}", f"input={source}", f"output={out}", *overrides],
        )


def _phantom_levels(seed: int = 0, n_slices: int = 12, size: int = 64) -> str:
    """``nifti.levels`` that give the phantom its own grey levels back (the synthetic phantoms
    are brighter than kaggle_3m): the models of these tests were trained on them."""
    images = make_phantom_volume(np.random.default_rng(seed), n_slices, size, True).images
    flair = images[..., 1].astype(float)
    lo, hi = np.percentile(flair[flair > flair.min()], [0.5, 99.5])
    return f"nifti.levels=[{lo:.3f},{hi:.3f}]"


def flair_threshold(images):
    """A stand-in for a trained network (no torch): probability 1 where FLAIR outshines the
    pre-contrast channel, as the phantom's lesion does (tlunet.data.synthetic), at each
    image's own size (so resizing back changes nothing)."""
    probs = [(im[..., 1].astype(int) - im[..., 0] > 45).astype(np.float32)[None] for im in images]
    return np.stack(probs), None


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, np.ndarray]:
    return tmp_path / "case", write_phantom_case(tmp_path / "case")


def test_nifti_mask_lands_on_the_input_grid(case, tmp_path: Path, monkeypatch) -> None:
    """The mask goes back through the oblique, permuted, anisotropic grid onto the lesion."""
    folder, truth = case
    monkeypatch.setattr(
        predict_module, "checkpoint_loader", lambda cfg: (flair_threshold, 0.5, False)
    )
    out = predict_module.predict(_cfg(folder, tmp_path / "out", _phantom_levels()))
    mask = nib.load(out / "mask.nii.gz")
    flair = nib.load(folder / "FLAIR.nii.gz")
    assert mask.shape == flair.shape == truth.shape
    assert np.allclose(mask.affine, flair.affine) and not np.allclose(mask.affine, np.eye(4))
    data = np.asarray(mask.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data).tolist()) <= {0, 1}
    # The stand-in's Dice on this phantom is 0.96; the same mask flipped along either in-plane
    # axis scores about 0.5: a wrong flip or transpose on the way there or back fails.
    assert dice(data, truth) > 0.8
    summary = json.loads((out / "tumour_volume.json").read_text())
    assert summary["tumour_voxels"] == int(data.sum())
    assert summary["tumour_volume_ml"] == pytest.approx(data.sum() * 3.0 * 0.9 * 0.9 / 1000, 1e-5)
    assert summary["shape"] == list(truth.shape) and summary["slices"] == truth.shape[0]
    assert summary["slices_with_tumour"] == int((data.sum(axis=(1, 2)) > 0).sum())


def _mismatch_shape(folder: Path) -> str:
    post = folder / "t1_post_gd.nii.gz"
    image = nib.load(post)
    write_volume(post, np.asarray(image.dataobj)[:, :-2], image.affine)
    return f"NIfTI volumes differ: '{post}' has shape (12, 62, 64)"


def _mismatch_affine(folder: Path) -> str:
    pre = folder / "t1_pre.nii.gz"
    image = nib.load(pre)
    write_volume(pre, np.asarray(image.dataobj), oblique_affine(degrees=14.0))
    return f"NIfTI volumes differ: the affine of '{pre}' differs"


def _flat(folder: Path) -> str:
    (folder / "FLAIR.nii.gz").unlink()
    write_volume(folder / "flair2d.nii.gz", np.ones((64, 64), np.int16), oblique_affine())
    return f"NIfTI file '{folder / 'flair2d.nii.gz'}' is 2-D"


def _series(folder: Path) -> str:
    write_volume(folder / "FLAIR.nii.gz", np.ones((12, 64, 64, 2), np.int16), oblique_affine())
    return f"NIfTI file '{folder / 'FLAIR.nii.gz'}' holds 2 volumes"


def _corrupt(folder: Path) -> str:
    path = folder / "t1_post_gd.nii.gz"
    path.write_bytes(path.read_bytes()[:-100])
    return f"Cannot read NIfTI file '{path}'"


def _nan_affine(folder: Path) -> str:
    # issue 21, item 13: every volume of the case with a NaN in its affine (so they agree)
    for path in sorted(folder.glob("*.nii.gz")):
        image = nib.load(path)
        affine = image.affine.copy()
        affine[1, 3] = np.nan
        write_volume(path, np.asarray(image.dataobj), affine)
    return f"NIfTI file '{folder / 't1_pre.nii.gz'}' has an affine with non-finite values"


def _two_flairs(folder: Path) -> str:
    shutil.copy(folder / "FLAIR.nii.gz", folder / "flair_old.nii.gz")
    return f"NIfTI folder '{folder}': 2 files match nifti.flair='*flair*.nii*'"


def _no_post(folder: Path) -> str:
    (folder / "t1_post_gd.nii.gz").unlink()
    return f"NIfTI folder '{folder}': 0 files match nifti.post='*post*.nii*'"


def _mixed(folder: Path) -> str:
    tifffile.imwrite(folder / "x_1.tif", np.zeros((8, 8, 3), np.uint8))
    return f"input folder '{folder}' holds both NIfTI volumes and .tif/.png slices"


@pytest.mark.parametrize(
    "spoil",
    [
        _mismatch_shape,
        _mismatch_affine,
        _flat,
        _series,
        _corrupt,
        _nan_affine,
        _two_flairs,
        _no_post,
        _mixed,
    ],
)
def test_nifti_input_problems_are_one_line_naming_the_file(case, tmp_path: Path, spoil) -> None:
    folder, _ = case
    expected = spoil(folder)
    with pytest.raises(DataError) as info:
        predict_module.predict(_cfg(folder, tmp_path / "out"))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_nifti_config_problems_come_before_the_checkpoint(
    case, synthetic_root: Path, tmp_path: Path
) -> None:
    folder, _ = case
    with pytest.raises(ConfigError, match="is the input's folder"):
        predict_module.predict(_cfg(folder, folder))
    with pytest.raises(DataError, match="is one NIfTI file"):
        predict_module.predict(_cfg(folder / "FLAIR.nii.gz", tmp_path / "out"))
    with pytest.raises(ConfigError, match="nifti.channels=flair_only applies to NIfTI input only"):
        predict_module.predict(_cfg(synthetic_root, tmp_path / "out", "nifti.channels=flair_only"))
    with pytest.raises(ConfigError, match="nifti.channels='t1' is not one of all, flair_only"):
        predict_module.predict(_cfg(folder, tmp_path / "out", "nifti.channels=t1"))
    with pytest.raises(ConfigError, match="nifti.channels='t1' is not one of all, flair_only"):
        predict_module.predict(_cfg(folder / "FLAIR.nii.gz", tmp_path / "out", "nifti.channels=t1"))
    with pytest.raises(ConfigError, match="is the input's folder"):  # a kaggle_3m folder too
        predict_module.predict(_cfg(synthetic_root, synthetic_root))


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint that finds the phantoms' lesions: trained for longer than ``tiny_run``."""
    from tests.conftest import train_tiny
    from tlunet.data.synthetic import write_synthetic_dataset

    work = tmp_path_factory.mktemp("phantom_model")
    root = write_synthetic_dataset(
        work / "kaggle_3m", num_patients=8, slices_per_patient=(10, 14), image_size=64, seed=5
    )
    run = train_tiny(
        root,
        work,
        "data.batch_size=8",
        "trainer.max_epochs=6",
        "trainer.limit_train_batches=1.0",
        "trainer.limit_val_batches=1.0",
        "optimizer.lr=0.003",
    )
    return run / "checkpoints" / "best.ckpt"


@pytest.mark.slow
def test_predict_nifti_end_to_end(phantom_model: Path, case, tmp_path: Path) -> None:
    folder, truth = case
    args = ["tlunet.predict", f"ckpt_path={phantom_model}", f"input={folder}", _phantom_levels()]
    result = run_cli([*args, f"output={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    mask = nib.load(tmp_path / "out" / "mask.nii.gz")
    assert mask.shape == truth.shape
    assert np.allclose(mask.affine, nib.load(folder / "FLAIR.nii.gz").affine)
    data = np.asarray(mask.dataobj)
    assert dice(data, truth) > 0.5, dice(data, truth)
    summary = json.loads((tmp_path / "out" / "tumour_volume.json").read_text())
    assert summary["tumour_voxels"] == int(data.sum()) > 0
    # FLAIR alone: a warning, and still a mask on the input's grid.
    result = run_cli(
        [*args, "nifti.channels=flair_only", f"output={tmp_path / 'flair'}"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "outside its training distribution" in result.stdout + result.stderr
    assert nib.load(tmp_path / "flair" / "mask.nii.gz").shape == truth.shape
    # A broken case: one line naming the file, exit status 1, no traceback.
    _corrupt(folder)
    result = run_cli([*args, f"output={tmp_path / 'bad'}"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Cannot read NIfTI file '{folder / 't1_post_gd.nii.gz'}'" in result.stderr


@pytest.mark.slow
def test_predict_kaggle_root(tiny_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    result = run_cli(
        [
            "tlunet.predict",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            f"input={synthetic_root}",
            f"output={out}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    patients = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    rows = list(csv.DictReader(open(out / "tumour_volume.csv")))
    assert [r["patient"] for r in rows] == patients
    for row in rows:
        slices = [
            p
            for p in (synthetic_root / row["patient"]).glob("*.tif")
            if not p.stem.endswith("_mask")
        ]
        areas = list(csv.DictReader(open(out / row["patient"] / "tumour_area.csv")))
        assert sorted(a["file"] for a in areas) == sorted(p.name for p in slices)
        assert (
            int(row["slices"])
            == len(slices)
            == len(list((out / row["patient"] / "masks").iterdir()))
        )
        pixels = [int(a["tumour_pixels"]) for a in areas]
        assert int(row["tumour_pixels"]) == sum(pixels)
        assert int(row["slices_with_tumour"]) == sum(p > 0 for p in pixels)
        assert len(list((out / row["patient"] / "overlays").glob("*.png"))) == len(slices)
