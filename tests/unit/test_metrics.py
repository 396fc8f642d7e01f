"""Tests for tlunet.metrics against values computed by hand on tiny 2x2 slices.

Reference batch (4 slices of 2x2 pixels, 16 pixels in all; threshold 0.5, ">=" is positive):

  A (patient 0)  truth [[1,1],[1,0]]  probs [[.9,.6],[.2,.7]] -> pred [[1,1],[0,1]]
                 TP=2 (0,0),(0,1)  FN=1 (1,0)  FP=1 (1,1)  TN=0        slice Dice 2*2/(2*2+1+1)=2/3
  B (patient 0)  truth all 0       probs all .1               -> pred all 0
                 TP=0 FP=0 FN=0 TN=4                                  empty/empty -> Dice 1
  C (patient 1)  truth all 0       probs [[.8,.1],[.1,.1]]    -> pred [[1,0],[0,0]]
                 TP=0 FP=1 FN=0 TN=3                                  empty truth, pred -> Dice 0
  D (patient 1)  truth [[1,1],[0,0]]  probs [[.95,.3],[.1,.5]] -> pred [[1,0],[0,1]] (.5 counts)
                 TP=1 (0,0)  FN=1 (0,1)  FP=1 (1,1)  TN=1 (1,0)       slice Dice 2/(2+1+1)=1/2

Totals: TP=2+0+0+1=3, FP=1+0+1+1=3, FN=1+0+0+1=2, TN=0+4+3+1=8, total=16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from tlunet.metrics import METRIC_KEYS, SegmentationMetrics, prefixed

TRUTH = torch.tensor(
    [
        [[1, 1], [1, 0]],  # A
        [[0, 0], [0, 0]],  # B
        [[0, 0], [0, 0]],  # C
        [[1, 1], [0, 0]],  # D
    ],
    dtype=torch.float32,
)
PROBS = torch.tensor(
    [
        [[0.9, 0.6], [0.2, 0.7]],  # A
        [[0.1, 0.1], [0.1, 0.1]],  # B
        [[0.8, 0.1], [0.1, 0.1]],  # C
        [[0.95, 0.3], [0.1, 0.5]],  # D
    ],
    dtype=torch.float32,
)
PATIENT = torch.tensor([0, 0, 1, 1], dtype=torch.int64)


def _computed(probs=PROBS, truth=TRUTH, patient=PATIENT, detect_prob=None, **kw):
    m = SegmentationMetrics(**kw)
    m.update(probs, truth, patient, detect_prob)
    return m.compute()


def test_keys_and_types():
    res = _computed()
    assert tuple(res) == METRIC_KEYS
    assert all(isinstance(v, float) for v in res.values())


def test_global_pixel_metrics():
    res = _computed()
    # Tumour: Dice = 2*3/(2*3+3+2) = 6/11; IoU = 3/(3+3+2) = 3/8
    assert res["dice"] == pytest.approx(6 / 11)
    assert res["iou"] == pytest.approx(3 / 8)
    # Background: Dice = 2*8/(2*8+3+2) = 16/21; IoU = 8/(8+3+2) = 8/13
    assert res["dice_bg"] == pytest.approx(16 / 21)
    assert res["iou_bg"] == pytest.approx(8 / 13)
    # Weights: w_tumour = (TP+FN)/16 = 5/16, w_bg = (TN+FP)/16 = 11/16
    assert res["dice_mean_paper"] == pytest.approx(11 / 16 * 16 / 21 + 5 / 16 * 6 / 11)
    assert res["iou_mean_paper"] == pytest.approx(11 / 16 * 8 / 13 + 5 / 16 * 3 / 8)
    # Macro: plain average of the two classes
    assert res["dice_mean_macro"] == pytest.approx((16 / 21 + 6 / 11) / 2)
    assert res["iou_mean_macro"] == pytest.approx((8 / 13 + 3 / 8) / 2)
    # Pixel accuracy = (TP+TN)/16 = 11/16
    assert res["pixel_accuracy"] == pytest.approx(11 / 16)
    assert res["num_slices"] == 4.0
    assert res["num_patients"] == 2.0


def test_dice_per_image():
    # Slice Dice: A 2/3, B 1 (empty/empty), C 0 (empty truth, 1 FP), D 1/2
    # mean = (2/3 + 1 + 0 + 1/2) / 4 = (13/6) / 4 = 13/24
    assert _computed()["dice_per_image"] == pytest.approx(13 / 24)


def test_single_slice_empty_rules():
    # Only slice B: empty truth + empty pred -> every Dice/IoU is 1
    res = _computed(PROBS[1:2], TRUTH[1:2], PATIENT[1:2])
    assert res["dice"] == 1.0
    assert res["iou"] == 1.0
    assert res["dice_per_image"] == 1.0
    assert res["dice_per_patient"] == 1.0
    # Only slice C: empty truth, one FP -> 2*0/(0+1+0) = 0
    res = _computed(PROBS[2:3], TRUTH[2:3], PATIENT[2:3])
    assert res["dice"] == 0.0
    assert res["dice_per_image"] == 0.0
    assert res["dice_per_patient"] == 0.0
    # background: TN=3, FP=1 -> 2*3/(2*3+1+0) = 6/7
    assert res["dice_bg"] == pytest.approx(6 / 7)


def test_dice_per_patient():
    res = _computed()
    # Patient 0 = A+B: TP=2, FP=1, FN=1 -> Dice 4/(4+1+1) = 2/3, IoU 2/(2+1+1) = 1/2
    # Patient 1 = C+D: TP=1, FP=2, FN=1 -> Dice 2/(2+2+1) = 2/5, IoU 1/(1+2+1) = 1/4
    assert res["dice_per_patient"] == pytest.approx((2 / 3 + 2 / 5) / 2)  # 8/15
    # even count -> median is the mean of the two middle values (also 8/15, not 2/5)
    assert res["dice_per_patient_median"] == pytest.approx(8 / 15)
    assert res["iou_per_patient"] == pytest.approx((1 / 2 + 1 / 4) / 2)  # 3/8


def test_dice_per_patient_median_odd_count():
    # Slices A, C, D as three patients (ids 3, 1, 2): Dice 2/3, 0, 1/2
    # median of {0, 1/2, 2/3} = 1/2; mean = (2/3 + 0 + 1/2)/3 = 7/18
    idx = torch.tensor([0, 2, 3])
    res = _computed(PROBS[idx], TRUTH[idx], torch.tensor([3, 1, 2]))
    assert res["num_patients"] == 3.0
    assert res["dice_per_patient_median"] == pytest.approx(1 / 2)
    assert res["dice_per_patient"] == pytest.approx(7 / 18)


def test_non_contiguous_patient_ids():
    # Same slices with ids 42/7 interleaved: patient 42 = A+C, patient 7 = B+D
    # 42: TP=2, FP=1+1=2, FN=1 -> Dice 4/(4+2+1) = 4/7, IoU 2/(2+2+1) = 2/5
    #  7: TP=1, FP=1, FN=1     -> Dice 2/(2+1+1) = 1/2, IoU 1/(1+1+1) = 1/3
    res = _computed(patient=torch.tensor([42, 7, 42, 7]))
    assert res["num_patients"] == 2.0
    assert res["dice_per_patient"] == pytest.approx((4 / 7 + 1 / 2) / 2)  # 15/28
    assert res["dice_per_patient_median"] == pytest.approx(15 / 28)
    assert res["iou_per_patient"] == pytest.approx((2 / 5 + 1 / 3) / 2)  # 11/30
    # Global metrics do not depend on patient ids
    assert res["dice"] == pytest.approx(6 / 11)


def test_detection_from_masks():
    # detected = predicted mask non-empty: A yes, B no, C yes, D yes
    # truth_any:                           A yes, B no, C no,  D yes
    # TP slices = A, D (2); TN = B (1); FP = C (1); FN = none (0)
    res = _computed()
    assert res["detect_accuracy"] == pytest.approx(3 / 4)
    assert res["detect_sensitivity"] == pytest.approx(2 / 2)
    assert res["detect_specificity"] == pytest.approx(1 / 2)


def test_detection_from_detect_prob():
    # detect_prob [.2, .1, .4, .5] >= .5 -> detected: D only (0.5 counts)
    # TP = D (1); FN = A (1); TN = B, C (2); FP = 0
    res = _computed(detect_prob=torch.tensor([0.2, 0.1, 0.4, 0.5]))
    assert res["detect_accuracy"] == pytest.approx(3 / 4)
    assert res["detect_sensitivity"] == pytest.approx(1 / 2)
    assert res["detect_specificity"] == pytest.approx(2 / 2)
    # Segmentation metrics are unaffected by detect_prob
    assert res["dice"] == pytest.approx(6 / 11)


def test_undefined_sensitivity_and_specificity_are_nan():
    # Slices B, C only: no tumour slice -> sensitivity undefined.
    # C is detected (FP), B not (TN) -> specificity 1/2, accuracy 1/2
    res = _computed(PROBS[1:3], TRUTH[1:3], PATIENT[1:3])
    assert math.isnan(res["detect_sensitivity"])
    assert res["detect_specificity"] == pytest.approx(1 / 2)
    assert res["detect_accuracy"] == pytest.approx(1 / 2)
    # Slices A, D only: no tumour-free slice -> specificity undefined; both detected
    idx = torch.tensor([0, 3])
    res = _computed(PROBS[idx], TRUTH[idx], PATIENT[idx])
    assert math.isnan(res["detect_specificity"])
    assert res["detect_sensitivity"] == pytest.approx(1.0)


def test_threshold_handling():
    # one slice, truth [[1,1],[0,0]], probs [[0.5, 0.4999],[0.5, 0.7]]
    truth = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    probs = torch.tensor([[[0.5, 0.4999], [0.5, 0.7]]])
    pid = torch.tensor([0])
    # threshold 0.5: pred [[1,0],[1,1]] -> TP=1, FN=1, FP=2, TN=0 -> Dice 2/(2+2+1) = 2/5
    res = _computed(probs, truth, pid)
    assert res["dice"] == pytest.approx(2 / 5)
    assert res["pixel_accuracy"] == pytest.approx(1 / 4)
    # threshold 0.7: pred [[0,0],[0,1]] -> TP=0, FN=2, FP=1, TN=1 -> Dice 0, acc 1/4
    res = _computed(probs, truth, pid, threshold=0.7)
    assert res["dice"] == 0.0
    assert res["dice_bg"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))
    # threshold 0.8: nothing predicted -> not detected; TN=2, FN=2 -> accuracy 2/4
    res = _computed(probs, truth, pid, threshold=0.8)
    assert res["pixel_accuracy"] == pytest.approx(2 / 4)
    assert res["detect_sensitivity"] == 0.0


def test_channel_dim_layout_is_equivalent():
    a = _computed()
    b = _computed(PROBS.unsqueeze(1), TRUTH.unsqueeze(1))
    assert a == b


def test_accumulation_matches_single_update():
    det = torch.tensor([0.2, 0.1, 0.4, 0.5])
    m = SegmentationMetrics()
    m.update(PROBS[:1], TRUTH[:1], PATIENT[:1], det[:1])
    m.update(PROBS[1:], TRUTH[1:], PATIENT[1:], det[1:])
    split = m.compute()
    full = _computed(detect_prob=det)
    assert split == pytest.approx(full)
    # patient 0 spans both updates; its volume must still be A+B -> per-patient mean 8/15
    assert split["dice_per_patient"] == pytest.approx(8 / 15)


def test_forward_returns_batch_values():
    m = SegmentationMetrics()
    batch = m(PROBS[2:3], TRUTH[2:3], PATIENT[2:3])  # slice C only: Dice 0
    assert batch["dice"] == 0.0
    m(PROBS[3:], TRUTH[3:], PATIENT[3:])
    # accumulated C+D: TP=1, FP=2, FN=1 -> 2/(2+2+1) = 2/5
    assert m.compute()["dice"] == pytest.approx(2 / 5)


def test_reset_clears_state():
    m = SegmentationMetrics()
    m.update(PROBS, TRUTH, PATIENT)
    m.reset()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(PROBS[1:2], TRUTH[1:2], PATIENT[1:2])
    res = m.compute()
    assert res["num_slices"] == 1.0
    assert res["dice"] == 1.0


def test_compute_without_update_raises():
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="before any update"):
        SegmentationMetrics().compute()


def test_invalid_inputs():
    m = SegmentationMetrics()
    with pytest.raises(ValueError):
        m.update(PROBS, TRUTH[:3], PATIENT)
    with pytest.raises(ValueError):
        m.update(PROBS, TRUTH, PATIENT[:3])
    with pytest.raises(ValueError):
        m.update(PROBS, TRUTH, PATIENT, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError):
        SegmentationMetrics(threshold=1.5)


def test_prefixed():
    assert prefixed({"dice": 0.5, "iou": 0.25}, "val") == {"val/dice": 0.5, "val/iou": 0.25}


def test_duplicated_rows_are_counted_once():
    """DDP's DistributedSampler repeats slices to pad the last batch: with ``rows`` given, the
    repeats change no value at all."""
    det = torch.tensor([0.7, 0.1, 0.4, 0.5])
    rows = torch.tensor([10, 11, 12, 13])
    for detect_prob in (None, det):
        reference = _computed(detect_prob=detect_prob)
        m = SegmentationMetrics()
        m.update(PROBS[:3], TRUTH[:3], PATIENT[:3], _part(detect_prob, slice(0, 3)), rows=rows[:3])
        # a second "process": slice D, then slices A, C and A again as padding
        again = torch.tensor([3, 0, 2, 0])
        m.update(PROBS[again], TRUTH[again], PATIENT[again], _part(detect_prob, again), rows[again])
        result = m.compute()
        assert result == reference  # every key, exactly
        assert result["num_slices"] == 4.0 and result["num_patients"] == 2.0


def _part(x, index):
    return None if x is None else x[index]


def test_duplicates_count_twice_without_rows():
    m = SegmentationMetrics()
    m.update(PROBS, TRUTH, PATIENT)
    m.update(PROBS[:1], TRUTH[:1], PATIENT[:1])
    assert m.compute()["num_slices"] == 5.0


def test_rows_must_be_given_to_every_update_or_none():
    m = SegmentationMetrics()
    m.update(PROBS[:2], TRUTH[:2], PATIENT[:2], rows=torch.tensor([0, 1]))
    m.update(PROBS[2:], TRUTH[2:], PATIENT[2:])
    with pytest.raises(ValueError, match="rows"):
        m.compute()
    with pytest.raises(ValueError, match="rows"):
        m.update(PROBS, TRUTH, PATIENT, rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        m.update(PROBS, TRUTH, PATIENT, rows=torch.tensor([0.0, 1.0, 2.0, 3.0]))


def _seven_slices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 random 8x8 slices of 3 patients: an odd count, so 2 processes need padding."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(7, 8, 8, generator=g)
    truth = (torch.rand(7, 8, 8, generator=g) > 0.6).float()
    truth[1] = 0  # a tumour-free slice
    return probs, truth, torch.tensor([0, 0, 1, 1, 1, 2, 2])


def _gathered_metrics_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP process: its DistributedSampler share (padded), batches of 2, then compute()."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probs, truth, patient = _seven_slices()
        share = list(DistributedSampler(range(len(probs)), world, rank, shuffle=False))
        results = {}
        for with_rows in (True, False):
            m = SegmentationMetrics(keras_batch=2)  # several Keras batches across processes
            for start in range(0, len(share), 2):
                i = torch.tensor(share[start : start + 2])
                m.update(probs[i], truth[i], patient[i], rows=i if with_rows else None)
            results[str(with_rows)] = m.compute()  # gathers every process's slices
        Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path: Path):
    """Metrics gathered from 2 gloo processes, patients spread over both, equal one process's."""
    mp.spawn(
        _gathered_metrics_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    probs, truth, patient = _seven_slices()
    reference = _computed(probs, truth, patient, keras_batch=2)
    assert reference["dice_keras_batch"] != _computed(probs, truth, patient)["dice_keras_batch"]
    for rank in (0, 1):
        results = json.loads((tmp_path / f"{rank}.json").read_text())
        assert results["True"] == pytest.approx(reference, abs=1e-12, nan_ok=True), rank
        assert results["True"]["num_slices"] == 7.0
        # without ids the padding slice (slice 0, on process 1) counts twice
        assert results["False"]["num_slices"] == 8.0


def test_iou_per_image():
    # Slice IoU: A 2/(2+1+1), B 1 (empty/empty), C 0, D 1/(1+1+1)
    assert _computed()["iou_per_image"] == pytest.approx((1 / 2 + 1 + 0 + 1 / 3) / 4)


def test_keras_batch_metrics_by_hand():
    """Soft sums per slice: A inter .9+.6+.2=1.7, sum(p) 2.4, sum(t) 3; B 0, .4, 0;
    C 0, 1.1, 0; D .95+.3=1.25, 1.85, 2."""
    # One batch of all four slices (order cannot matter), smoothing 1.
    res = _computed(keras_batch=4, keras_smooth=1.0)
    assert res["dice_keras_batch"] == pytest.approx((2 * 2.95 + 1) / (5.75 + 5 + 1))
    assert res["iou_keras_batch"] == pytest.approx((2.95 + 1) / (5.75 + 5 - 2.95 + 1))
    # Batches of one slice: the mean of smoothed per-slice scores.
    res = _computed(keras_batch=1, keras_smooth=1.0)
    dice = [(3.4 + 1) / (2.4 + 3 + 1), 1 / 1.4, 1 / 2.1, (2.5 + 1) / (1.85 + 2 + 1)]
    iou = [(1.7 + 1) / (2.4 + 3 - 1.7 + 1), 1 / 1.4, 1 / 2.1, (1.25 + 1) / (1.85 + 2 - 1.25 + 1)]
    assert res["dice_keras_batch"] == pytest.approx(sum(dice) / 4)
    assert res["iou_keras_batch"] == pytest.approx(sum(iou) / 4)
    # The default smoothing of 100 lifts a batch without tumour to almost 1.
    res = _computed(PROBS[1:3], TRUTH[1:3], PATIENT[1:3])
    assert res["dice_keras_batch"] == pytest.approx(100 / (1.5 + 100))


def test_keras_batches_follow_the_slice_ids_not_the_update_order():
    """Batches of 2 are drawn from a seeded shuffle of the slices ordered by id: the same
    whatever order (or process) the slices arrived in."""
    rows = torch.tensor([10, 11, 12, 13])
    m1 = SegmentationMetrics(keras_batch=2, keras_smooth=1.0)
    m1.update(PROBS, TRUTH, PATIENT, rows=rows)
    order = torch.tensor([3, 1, 0, 2])
    m2 = SegmentationMetrics(keras_batch=2, keras_smooth=1.0)
    m2.update(PROBS[order[:2]], TRUTH[order[:2]], PATIENT[order[:2]], rows=rows[order[:2]])
    m2.update(PROBS[order[2:]], TRUTH[order[2:]], PATIENT[order[2:]], rows=rows[order[2:]])
    a, b = m1.compute(), m2.compute()
    assert a["dice_keras_batch"] == b["dice_keras_batch"]
    inter = [1.7, 0.0, 0.0, 1.25]
    pred = [2.4, 0.4, 1.1, 1.85]
    truth = [3, 0, 0, 2]
    shuffle = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    batches = [shuffle[:2], shuffle[2:]]
    expected = [
        (2 * sum(inter[i] for i in b) + 1) / (sum(pred[i] + truth[i] for i in b) + 1)
        for b in batches
    ]
    assert a["dice_keras_batch"] == pytest.approx(sum(expected) / 2)


def test_per_patient_keys_not_applicable():
    from tlunet.metrics import PER_PATIENT_KEYS

    res = _computed(per_patient=False)
    assert all(res[k] is None for k in PER_PATIENT_KEYS)
    assert res["dice"] == pytest.approx(6 / 11)


def test_pred_overrides_the_threshold_but_not_the_soft_metrics():
    pred = torch.zeros_like(PROBS, dtype=torch.bool)
    m = SegmentationMetrics(keras_batch=4, keras_smooth=1.0)
    m.update(PROBS, TRUTH, PATIENT, pred=pred)
    res = m.compute()
    assert res["dice"] == 0.0 and res["detect_accuracy"] == 0.5  # nothing predicted
    assert res["dice_keras_batch"] == pytest.approx((2 * 2.95 + 1) / (5.75 + 5 + 1))
