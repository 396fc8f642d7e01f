"""tlunet.evaluate reproduces a run's test metrics; volume metrics against hand values and
MONAI; options (TTA, post-processing, tuned threshold) each reported on what they use."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import run_cli, train_tiny
from tlunet.evaluate import Scored, Volume, draw_figure, flip_tta, patient_tables, worst_slices
from tlunet.module import SegmentationModule
from tlunet.volume_metrics import dice_iou, hd95, volume_similarity


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
    assert math.isnan(hd95(empty, empty))  # no surface on either side: undefined
    assert math.isinf(hd95(a, empty)) and math.isinf(hd95(empty, a))


def _blob_pair() -> tuple[np.ndarray, np.ndarray]:
    """A perfect prediction plus a small far false-positive blob."""
    truth = np.zeros((1, 30, 30), bool)
    truth[0, 5:15, 5:15] = True
    pred = truth.copy()
    pred[0, 25:28, 25:28] = True
    return pred, truth


def test_hd95_on_the_bounding_box_equals_hd95_on_the_whole_volume() -> None:
    """hd95 cuts both masks to their union's bounding box: the values are identical (not
    close) to those computed on the whole arrays, masks touching the array's border included."""
    from scipy import ndimage

    from tlunet.volume_metrics import _surface

    def whole(pred, truth, spacing=None):
        sp, st = _surface(pred), _surface(truth)
        to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
        to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
        return float(max(np.percentile(to_truth[sp], 95), np.percentile(to_pred[st], 95)))

    rng = np.random.default_rng(0)
    for case in range(40):
        shape = (int(rng.integers(3, 12)), 48, 40)
        noise = ndimage.gaussian_filter(rng.random(shape), 2.0)
        truth = noise > np.quantile(noise, 0.9)
        pred = np.roll(truth, int(rng.integers(-3, 4)), axis=2) | (noise > np.quantile(noise, 0.99))
        if case % 4 == 0:  # touching the array's border
            pred[:, 0, :5] = True
            truth[-1, -3:, -1] = True
        for spacing in (None, (2.5, 0.7, 0.7)):
            assert hd95(pred, truth, spacing) == whole(pred, truth, spacing)


def test_hd95_matches_monai() -> None:
    """Ours is MONAI's compute_hausdorff_distance(percentile=95): the larger directed 95th
    percentile. medpy pools both directions, which can hide a far false positive."""
    monai = pytest.importorskip("monai.metrics", reason="monai is in the dev extra")
    from scipy import ndimage

    rng = np.random.default_rng(0)
    compared = 0
    for i in range(20):
        shape = (int(rng.integers(3, 10)), 40, 48)
        a = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=int(rng.integers(1, 4)))
        b = ndimage.binary_dilation(rng.random(shape) > 0.995, iterations=int(rng.integers(1, 4)))
        if i % 3 == 0:
            b = a.copy()
            b[:, :3] = True  # touches the array's border
        if not (a.any() and b.any()):
            continue
        ref = monai.compute_hausdorff_distance(
            torch.from_numpy(a)[None, None],
            torch.from_numpy(b)[None, None],
            include_background=True,
            percentile=95,
        )
        assert hd95(a, b) == pytest.approx(float(ref[0, 0]), rel=1e-5)
        compared += 1
    assert compared >= 15
    pred, truth = _blob_pair()
    ref = monai.compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None],
        torch.from_numpy(truth)[None, None],
        include_background=True,
        percentile=95,
    )
    assert hd95(pred, truth) == pytest.approx(float(ref[0, 0]), rel=1e-5)
    assert hd95(pred, truth) == pytest.approx(16.69, abs=0.01)  # README's example


def test_hd95_summary_counts_missed_patients() -> None:
    """A patient whose tumour is missed entirely has HD95 inf: counted, never dropped silently;
    a tumour-free patient predicted empty has none (nan) and is in neither count."""

    def scored(pred: np.ndarray, truth: np.ndarray) -> Scored:
        n = len(truth)
        volume = Volume(list(range(n)), np.arange(n), pred.astype(np.float32), truth, None)
        return Scored(volume, pred.astype(np.float32), pred.astype(bool))

    hit = np.zeros((2, 8, 8), np.uint8)
    hit[0, 2:5, 2:5] = 1
    shifted = np.roll(hit, 2, axis=2).astype(bool)
    volumes = {
        0: scored(shifted, hit),  # found, 2 px off
        1: scored(np.zeros_like(hit, bool), hit),  # missed: inf
        2: scored(np.zeros_like(hit, bool), np.zeros_like(hit)),  # tumour-free, empty: nan
    }
    patients, _, summary = patient_tables(volumes, ["a", "b", "c"], per_patient=True)
    assert summary["hd95_inf_patients"] == 1.0 and summary["hd95_patients"] == 1.0
    assert summary["hd95_per_patient"] == pytest.approx(hd95(shifted, hit))
    assert math.isinf(patients[1][6]) and math.isnan(patients[2][6])
    low, high = summary["dice_per_patient_ci95_low"], summary["dice_per_patient_ci95_high"]
    mean = np.mean([r[4] for r in patients])
    assert low <= mean <= high and low < high
    _, _, none = patient_tables(volumes, ["a", "b", "c"], per_patient=False)
    assert set(none.values()) == {None}


class _WidthSymmetricNet(nn.Module):
    """A 3x3 convolution whose kernels are mirror-symmetric left-right but not top-bottom:
    equivariant to horizontal flips (width), not to vertical ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w[..., 2] = w[..., 0]  # column 2 mirrors column 0
            w[:, :, 0, :] += 1.0  # rows differ: not symmetric top-bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_flip_tta_undoes_the_flip_on_the_width_axis() -> None:
    """A flip-equivariant network gives the same probabilities with and without flip TTA; the
    flip must be undone on the axis it was applied to (width), not on the height."""
    module = SegmentationModule(_WidthSymmetricNet(), nn.BCEWithLogitsLoss(), torch.optim.Adam)
    module.eval()
    images = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    probs, _ = module.predict_probs(images)
    mean, _ = flip_tta(module, images, probs, None)
    assert torch.allclose(mean, probs, atol=1e-6)
    # The same average undone on the wrong axis would differ (what a wrong axis would give):
    flipped, _ = module.predict_probs(torch.flip(images, dims=[-1]))
    wrong = (probs + torch.flip(flipped, dims=[-2])) / 2
    assert (wrong - probs).abs().max() > 1e-2
    # Flipping the input vertically is not undone by the width flip: the net is not
    # equivariant to it, so the test above is not vacuous.
    up_down, _ = module.predict_probs(torch.flip(images, dims=[-2]))
    assert (torch.flip(up_down, dims=[-2]) - probs).abs().max() > 1e-2


def test_volume_similarity_and_dice_by_hand() -> None:
    p = np.zeros((2, 4, 4), bool)
    t = np.zeros((2, 4, 4), bool)
    p[0, :2, :2] = True  # 4 voxels
    t[0, :2, :3] = True  # 6 voxels, 4 shared
    assert volume_similarity(p, t) == pytest.approx(1 - 2 / 10)
    assert dice_iou(p, t) == pytest.approx((8 / 10, 4 / 6))
    assert volume_similarity(p & False, t & False) == 1.0
    assert dice_iou(p & False, t & False) == (1.0, 1.0)


@pytest.fixture(params=["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def run_and_precision(request: pytest.FixtureRequest) -> tuple[Path, str]:
    """A tiny run tested in fp32 (trainer=default), and one in bf16 (trainer=cpu's ``mixed`` on
    a CPU with bf16 instructions; skipped elsewhere), with the precision it ran in."""
    name = "tiny_run" if request.param == "32-true" else "tiny_bf16_run"
    return request.getfixturevalue(name), request.param


def test_evaluate_reproduces_the_run(run_and_precision: tuple[Path, str], tmp_path: Path) -> None:
    """Every metric of the run's own test, to 1e-6 (docs/evaluation.md), in the precision the
    run was tested in, which evaluate takes from the checkpoint by default."""
    run_dir, precision = run_and_precision
    assert json.loads((run_dir / "run.json").read_text())["precision"] == precision
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
    used = json.loads((eval_dir / "evaluation.json").read_text())["precision"]
    assert used["used"] == used["run"] == precision and "checkpoint" in used["source"]
    # The figures: per-patient Dice and the worst patients' slices; no threshold curve
    # without eval.threshold=auto.
    for name in ("per_patient.png", "worst_patients.png"):
        _assert_png(eval_dir / name)
        assert name in out.stdout  # listed with the files written
    assert not (eval_dir / "threshold.png").exists()
    # The decoded slices are cached in this command's cache, not in the folder the checkpoint
    # names (a file tlunet reads never chooses where it writes).
    assert (tmp_path / ".tlunet-cache" / "slices").is_dir()


def _assert_png(path: Path) -> None:
    """A real PNG of more than a blank canvas."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 5000, path


@pytest.mark.slow
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
    # Each tuned threshold is tuned on the probabilities (and post-processing) of its row.
    tuned = json.loads((eval_dir / "evaluation.json").read_text())["options"]
    tuned = tuned["tuned_on_validation"]
    assert set(tuned) == {"plain", "tta+largest_component"}
    by_name = {r["option"]: float(r["threshold"]) for r in rows}
    assert by_name["threshold=auto"] == tuned["plain"]["threshold"]
    assert by_name["all selected"] == tuned["tta+largest_component"]["threshold"]
    _assert_png(eval_dir / "threshold.png")  # the validation curve of eval.threshold=auto
    _assert_png(eval_dir / "per_patient.png")
    expected = _tune_on_validation(tiny_run / "checkpoints" / "best.ckpt", tta=True)
    assert tuned["tta+largest_component"]["threshold"] == expected[0]
    assert tuned["tta+largest_component"]["validation_dice"] == pytest.approx(expected[1])


def test_worst_slices_are_the_lowest_dice_patients_largest_errors() -> None:
    """worst_patients.png shows the lowest-Dice patients, each at its slice with the most
    false positives + false negatives of the masks as scored."""

    def scored(truth: np.ndarray, pred: np.ndarray) -> Scored:
        n = len(truth)
        volume = Volume(list(range(10, 10 + n)), np.arange(n), pred.astype(np.float32), truth, None)
        return Scored(volume, pred.astype(np.float32), pred.astype(bool))

    truth = np.zeros((3, 6, 6), np.uint8)
    truth[:, 1:4, 1:4] = 1
    good = truth.astype(bool)
    bad = good.copy()
    bad[0, 1, 1] = False  # 1 wrong pixel on slice 0
    bad[2, :, 5] = True  # 6 wrong pixels on slice 2: the worst slice
    worse = np.zeros_like(good)
    worse[1, 0, 0] = True  # slice 1: 9 missed + 1 false = 10; the others 9 missed each
    volumes = {0: scored(truth, good), 1: scored(truth, bad), 2: scored(truth, worse)}
    patients, _, _ = patient_tables(volumes, ["p0", "p1", "p2"], per_patient=True)
    picked = worst_slices(volumes, patients, ["p0", "p1", "p2"], count=2)
    assert [(pid, position) for pid, position, _ in picked] == [(2, 1), (1, 2)]
    assert picked[0][2] == patients[2][4] == 0.0  # the Dice of per_patient.csv
    assert picked[1][2] == pytest.approx(dice_iou(bad, good)[0])
    assert len(worst_slices(volumes, patients, ["p0", "p1", "p2"], count=4)) == 3


def test_a_figure_that_fails_is_a_warning(tmp_path: Path, caplog) -> None:
    def broken(path: Path) -> None:
        raise MemoryError("canvas too large")

    assert not draw_figure(broken, tmp_path / "per_patient.png")
    assert "per_patient.png" in caplog.text and "canvas too large" in caplog.text
    assert draw_figure(lambda path: path.write_bytes(b"x"), tmp_path / "ok.png")


def _tune_on_validation(ckpt: Path, tta: bool) -> tuple[float, float]:
    """The validation threshold recomputed here, slice by slice: the checkpoint's model on its
    validation patients, flip-averaged, resized to native size, largest component kept."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tlunet.evaluate import load_checkpoint, module_from_checkpoint
    from tlunet.postprocess import best_threshold, parse_postprocess
    from tlunet.scoring import to_native

    checkpoint = load_checkpoint(ckpt)
    cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    cfg.data.cache_dir = None
    datamodule = instantiate(cfg.data, preprocessing=checkpoint["tlunet"]["preprocessing"])
    datamodule.setup("test")
    module = module_from_checkpoint(checkpoint)
    dataset = datamodule.datasets["val"]
    by_patient: dict[int, list] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        probs, _ = module.predict_probs(item["image"][None])
        if tta:
            flipped, _ = module.predict_probs(torch.flip(item["image"][None], dims=[-1]))
            probs = (probs + torch.flip(flipped, dims=[-1])) / 2
        native = to_native(probs, item["mask_native"].shape[-2:])[0, 0].numpy()
        by_patient.setdefault(int(item["patient"]), []).append(
            (int(item["slice"]), native, item["mask_native"][0].numpy())
        )
    volumes = []
    for items in by_patient.values():
        items.sort(key=lambda t: t[0])
        volumes.append((np.stack([t[1] for t in items]), np.stack([t[2] for t in items])))
    return best_threshold(volumes, parse_postprocess("largest_component"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["val", "all"])
def test_auto_threshold_is_refused_where_it_would_be_tuned_on_the_scored_slices(
    tiny_run: Path, tmp_path: Path, stage: str
) -> None:
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            f"stage={stage}",
            "eval.threshold=auto",
            "eval.allow_seen_patients=true",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 1 and f"stage={stage} contains" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
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


def test_option_rows_keep_the_aux_heads_detection() -> None:
    """Detection comes from the aux head's probabilities in every option row, never from the
    (post-processed) masks: here the head says "tumour" on every slice while no mask is left."""
    from tlunet.evaluate import score_volumes, volume_metrics

    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:2, 2:5, 2:5] = 1  # 2 slices with tumour, 2 without
    probs = np.full((4, 8, 8), 0.9, np.float32)
    head = np.full(4, 0.8, np.float32)  # the head: tumour on all 4 slices
    volumes = {0: Volume([1, 2, 3, 4], np.arange(4), probs, truth, head)}
    gone = score_volumes(volumes, 0.5, ("min_size", 10_000))  # removes every component
    values, _, _ = volume_metrics(gone, ["p"], per_patient=True)
    assert values["dice"] == 0.0  # no mask left...
    assert values["detect_accuracy"] == 0.5 and values["detect_sensitivity"] == 1.0  # ...head
    without_head = {0: Volume([1, 2, 3, 4], np.arange(4), probs, truth, None)}
    values, _, _ = volume_metrics(
        score_volumes(without_head, 0.5, ("min_size", 10_000)), ["p"], True
    )
    assert values["detect_sensitivity"] == 0.0  # mask-based: nothing detected


@pytest.mark.slow
def test_detect_has_one_definition_per_run(synthetic_root_128: Path, tmp_path: Path) -> None:
    """With an aux head, detect_* come from the head in the run, in evaluate's baseline and in
    every option row (post-processing changes masks, not the head's answer)."""
    run_dir = train_tiny(synthetic_root_128, tmp_path / "train", "model.aux_head=true")
    assert json.loads((run_dir / "run.json").read_text())["scoring"]["detect_source"] == "aux_head"
    eval_dir = tmp_path / "eval"
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            "eval.postprocess=min_size:100000",  # removes every predicted component
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["option"]: r for r in csv.DictReader(open(eval_dir / "options.csv"))}
    original = json.loads((run_dir / "metrics.json").read_text())
    baseline = float(rows["baseline"]["detect_accuracy"])
    assert baseline == pytest.approx(original["test/detect_accuracy"], abs=1e-9)
    assert float(rows["postprocess=min_size:100000"]["detect_accuracy"]) == baseline
    info = json.loads((eval_dir / "evaluation.json").read_text())
    assert info["scoring"]["detect_source"] == "aux_head"


@pytest.mark.slow
def test_paper_split_reports_per_patient_metrics_as_not_applicable(
    synthetic_root_128: Path, tmp_path: Path
) -> None:
    from tests.conftest import compose_config

    assert compose_config(["data.split=paper"]).monitor.metric == "val/dice"
    assert compose_config([]).monitor.metric == "val/dice_per_patient"
    out = run_cli(
        [
            "tlunet.train",
            "data.split=paper",
            "monitor.metric=val/dice_per_patient",
            f"data.root={synthetic_root_128}",
            f"hydra.run.dir={tmp_path / 'refused'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "not computed under data.split=paper" in out.stderr
    run_dir = train_tiny(synthetic_root_128, tmp_path / "train", "data.split=paper")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/dice_per_patient"] is None and metrics["test/iou_per_patient"] is None
    assert isinstance(metrics["test/dice"], float)
    assert isinstance(metrics["test/dice_keras_batch"], float)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["monitor"] == "val/dice" and info["scoring"]["per_patient_metrics"] is False
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    eval_dir = tmp_path / "eval"
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={ckpt}",
            "eval.allow_seen_patients=true",  # a slice-level split shares every patient
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    assert evaluated["test/dice"] == pytest.approx(metrics["test/dice"], abs=1e-6)
    for key in ("test/dice_per_patient", "test/hd95_per_patient", "test/hd95_inf_patients"):
        assert evaluated[key] is None, key
    assert evaluated["seen_patients"] > 0
    assert not (eval_dir / "per_patient.csv").exists()
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={ckpt}",
            "eval.allow_seen_patients=true",
            "eval.postprocess=largest_component",
            f"hydra.run.dir={tmp_path / 'eval_pp'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "data.split=paper" in out.stderr
    out = run_cli(
        ["tlunet.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval_seen'}"],
        cwd=tmp_path,
    )
    assert out.returncode == 1 and "shares patients between all stages" in out.stderr
