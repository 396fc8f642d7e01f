"""Scores at the native resolution of the masks, on exactly the masks tlunet.predict writes;
evaluate uses the checkpoint's preprocessing and refuses patients the model has seen."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.conftest import copy_patient_renamed, real_data_root, run_cli, train_tiny
from tlunet.scoring import native_mask_tensor, to_native


def test_to_native_resizes_each_slice_alone() -> None:
    probs = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert to_native(probs, (16, 16)) is not None
    assert torch.equal(to_native(probs, (16, 16)), probs)  # same size: untouched
    big = to_native(probs, (32, 48))
    assert big.shape == (5, 1, 32, 48) and big.dtype == torch.float32
    # A slice resized alone equals the same slice resized in a batch, bit for bit.
    for i in range(5):
        assert torch.equal(to_native(probs[i : i + 1], (32, 48)), big[i : i + 1])
    # Half-pixel centres: a constant stays constant, and 2x upsampling of a step is symmetric.
    assert torch.allclose(to_native(torch.full((1, 1, 4, 4), 0.3), (8, 8)), torch.tensor(0.3))
    masks = native_mask_tensor(probs, (32, 48), 0.5)
    assert masks.dtype == torch.bool and torch.equal(masks, big >= 0.5)
    with pytest.raises(ValueError, match=r"\(N, 1, h, w\)"):
        to_native(probs[:, 0], (32, 32))


def _evaluate(ckpt: Path, out: Path, cwd: Path, *overrides: str):
    return run_cli(
        ["tlunet.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *overrides], cwd=cwd
    )


def _read_mask(path: Path) -> np.ndarray:
    return tifffile.imread(path) > 0


def check_native_scoring(run_dir: Path, root: Path, tmp_path: Path, *eval_overrides: str) -> dict:
    """Evaluate ``run_dir``'s best checkpoint on ``root``; check per_patient.csv against the
    mask files on disk (true pixels) and tlunet.predict's masks (predicted pixels and Dice),
    for every evaluated patient. Returns the evaluation's metrics.json."""
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    eval_dir = tmp_path / "eval"
    out = _evaluate(ckpt, eval_dir, tmp_path, f"data.root={root}", *eval_overrides)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = list(csv.DictReader(open(eval_dir / "per_patient.csv")))
    assert rows
    # One predict over every evaluated slice (file names are unique across patients).
    slices = tmp_path / "slices"
    slices.mkdir()
    for row in rows:
        for image in (root / row["patient"]).glob("*.tif"):
            if not image.stem.endswith("_mask"):
                shutil.copy(image, slices / image.name)
    pred_dir = tmp_path / "pred"
    result = run_cli(
        ["tlunet.predict", f"ckpt_path={ckpt}", f"input={slices}", f"output={pred_dir}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert any(int(r["tumour_pixels_true"]) > 0 for r in rows)  # not a vacuous 0 == 0
    for row in rows:
        patient = root / row["patient"]
        truth = [_read_mask(p) for p in sorted(patient.glob("*_mask.tif"))]
        assert int(row["tumour_pixels_true"]) == int(sum(t.sum() for t in truth)), row
        tp = fp = fn = pred_pixels = 0
        for mask_file in sorted(patient.glob("*_mask.tif")):
            t = _read_mask(mask_file)
            p = _read_mask(pred_dir / "masks" / mask_file.name.replace("_mask.tif", ".tif"))
            assert p.shape == t.shape  # native size
            pred_pixels += int(p.sum())
            tp += int((p & t).sum())
            fp += int((p & ~t).sum())
            fn += int((~p & t).sum())
        dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert int(row["tumour_pixels_pred"]) == pred_pixels, row
        assert float(row["dice"]) == dice, row  # exactly: the same masks
        assert [int(row[k]) for k in ("tp_pixels", "fp_pixels", "fn_pixels")] == [tp, fp, fn]
    info = json.loads((eval_dir / "evaluation.json").read_text())
    size = list(tifffile.imread(next(root.glob("*/*_mask.tif"))).shape)
    assert info["scoring"]["resolution"] == size
    return json.loads((eval_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_native_scoring_matches_predict_on_phantoms(
    tiny_run: Path, synthetic_root_128: Path, tmp_path: Path
) -> None:
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["scoring"]["resolution"] == [128, 128]
    assert info["scoring"]["network_input"] == [64, 64]
    metrics = check_native_scoring(tiny_run, synthetic_root_128, tmp_path)
    run_metrics = json.loads((tiny_run / "metrics.json").read_text())
    # The run's own test metrics are at native resolution too: evaluate reproduces them, on a
    # test patient with tumour and a prediction that is neither empty nor everything.
    assert 0 < run_metrics["test/dice"] < 1
    for key in ("test/dice", "test/dice_per_patient", "test/num_slices", "test/dice_keras_batch"):
        assert metrics[key] == pytest.approx(run_metrics[key], abs=1e-6), key


@pytest.mark.slow
def test_native_scoring_matches_predict_in_bf16(
    tiny_bf16_run: Path, synthetic_root_128: Path, tmp_path: Path
) -> None:
    """A run tested in bf16 autocast (trainer=cpu on a CPU with bf16 instructions): evaluate
    and predict run its checkpoint in bf16 too, so predict writes exactly the masks evaluate
    scores, and evaluate reproduces the run's test."""
    metrics = check_native_scoring(tiny_bf16_run, synthetic_root_128, tmp_path)
    run_metrics = json.loads((tiny_bf16_run / "metrics.json").read_text())
    for key in ("test/dice", "test/dice_per_patient", "test/loss", "test/dice_keras_batch"):
        assert metrics[key] == pytest.approx(run_metrics[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.realdata
def test_native_scoring_matches_predict_on_the_real_sample(tmp_path: Path) -> None:
    root = real_data_root()
    run_dir = train_tiny(
        root, tmp_path, "data.image_size=64", "data.split_fractions=[0.9,0.05,0.05]"
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["scoring"]["resolution"] == [256, 256]
    check_native_scoring(run_dir, root, tmp_path)


@pytest.mark.slow
def test_evaluate_uses_the_checkpoints_preprocessing(
    synthetic_root_128: Path, tmp_path: Path
) -> None:
    """normalization=dataset: evaluating on another root must keep the training mean and std
    (not recompute them there) and score exactly what predict, which reads them from the
    checkpoint, writes."""
    run_dir = train_tiny(synthetic_root_128, tmp_path / "train", "data.normalization=dataset")
    stored = json.loads((run_dir / "run.json").read_text())["preprocessing"]
    assert stored["normalization"] == "dataset"
    # Another site: the same phantoms at half the intensity (other dataset statistics).
    other = tmp_path / "other_site"
    shutil.copytree(synthetic_root_128, other)
    for image in other.glob("*/*.tif"):
        if not image.stem.endswith("_mask"):
            tifffile.imwrite(image, tifffile.imread(image) // 2, photometric="rgb")
    # Same patient names: the model saw some of them (as darker copies), so allow them.
    work = tmp_path / "eval_other"
    work.mkdir()
    check_native_scoring(run_dir, other, work, "stage=all", "eval.allow_seen_patients=true")
    info = json.loads((work / "eval" / "evaluation.json").read_text())
    assert info["preprocessing"]["mean"] == stored["mean"]
    assert info["preprocessing"]["std"] == stored["std"]
    assert info["preprocessing"]["image_size"] == 64


@pytest.mark.slow
def test_evaluate_refuses_patients_the_model_has_seen(tiny_run: Path, tmp_path: Path) -> None:
    info = json.loads((tiny_run / "run.json").read_text())
    n_train = len(info["patients"]["train"])
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = _evaluate(ckpt, tmp_path / "train", tmp_path, "stage=train")
    assert out.returncode == 1
    assert f"{n_train} of the {n_train} patients of stage=train were used" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "train" / "metrics.json").exists()
    out = _evaluate(ckpt, tmp_path / "all", tmp_path, "stage=all")
    assert out.returncode == 1 and "eval.allow_seen_patients=true" in out.stderr
    out = _evaluate(ckpt, tmp_path / "all", tmp_path, "stage=all", "eval.allow_seen_patients=true")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    seen = n_train + len(info["patients"]["val"])
    assert metrics["seen_patients"] == seen
    out = _evaluate(ckpt, tmp_path / "test", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "test" / "metrics.json").read_text())["seen_patients"] == 0


@pytest.mark.slow
def test_evaluate_finds_training_patients_under_other_names(
    tiny_run: Path, synthetic_root_128: Path, tmp_path: Path
) -> None:
    """The training patients copied under new names (folders and files renamed) are still
    seen: the checkpoint records a fingerprint of each patient's images."""
    train = json.loads((tiny_run / "run.json").read_text())["patients"]["train"]
    root = tmp_path / "renamed"
    names = {f"COPY{k}_20240101": patient for k, patient in enumerate(train)}
    for name, patient in names.items():
        copy_patient_renamed(synthetic_root_128, patient, root, name)
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    n = len(names)
    out = _evaluate(ckpt, tmp_path / "refused", tmp_path, f"data.root={root}", "stage=all")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tlunet error")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert errors[0].startswith(
        f"tlunet error: {n} of the {n} patients of stage=all were used to train ({n}) or "
        f"validate (0) this model ({n} of them under another name"
    )
    assert not (tmp_path / "refused" / "metrics.json").exists()
    allowed = tmp_path / "allowed"
    out = _evaluate(
        ckpt, allowed, tmp_path, f"data.root={root}", "stage=all", "eval.allow_seen_patients=true"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((allowed / "metrics.json").read_text())["seen_patients"] == n
    seen = json.loads((allowed / "evaluation.json").read_text())["seen_patients"]
    assert seen["compared"] == "names and content" and seen["count"] == n
    assert seen["patients"] == [
        {"patient": name, "recorded_as": patient, "stage": "train", "matched_by": "content"}
        for name, patient in sorted(names.items())
    ]
    # A checkpoint without fingerprints (an older tlunet's): names only, and the log says so.
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["tlunet"]["patient_fingerprints"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    out = _evaluate(old, tmp_path / "old", tmp_path, f"data.root={root}", "stage=all")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compared with its training and validation patients by folder name only" in (
        out.stdout + out.stderr
    )
    seen = json.loads((tmp_path / "old" / "evaluation.json").read_text())["seen_patients"]
    assert seen["compared"] == "names only" and seen["count"] == 0
