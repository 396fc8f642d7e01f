"""Segmentation and detection metrics for binary (tumour vs background) brain-MRI slices.

:class:`SegmentationMetrics` is a :class:`torchmetrics.Metric` that stores small per-slice
statistics (pixel TP/FP/FN/TN counts, patient id, slice-level detection flags) and derives the
whole metric vocabulary of the project from them in :meth:`SegmentationMetrics.compute`.
Predictions are ``probs >= threshold`` (a probability of exactly ``threshold`` is positive).
Tumour is the positive class; TP/FP/FN/TN are pixel counts summed over the whole evaluated set
unless stated otherwise. Wherever a Dice/IoU denominator is zero (no tumour in the truth and
none predicted) the score is defined as 1.0.

Keys returned by ``compute()``:

* ``dice`` = 2TP / (2TP + FP + FN) and ``iou`` = TP / (TP + FP + FN): tumour-class scores over
  all pixels of the set ("global" or micro Dice/IoU).
* ``dice_bg`` = 2TN / (2TN + FP + FN) and ``iou_bg`` = TN / (TN + FP + FN): the same with
  background as the positive class.
* ``dice_mean_paper`` / ``iou_mean_paper``: class-frequency weighted mean over {background,
  tumour}, weights ``w_tumour = (TP + FN) / total`` and ``w_bg = (TN + FP) / total``. This is the
  "Mean Dice" / "Mean IoU" reported in the TL-U-Net paper; it is dominated by the background.
* ``dice_mean_macro`` / ``iou_mean_macro``: unweighted mean of background and tumour scores.
* ``pixel_accuracy`` = (TP + TN) / total.
* ``dice_per_image`` / ``iou_per_image``: Dice (IoU) of every slice, averaged over slices (an
  empty-truth slice scores 1 if nothing is predicted and 0 otherwise).
* ``dice_keras_batch`` / ``iou_keras_batch``: the metric of the Keras notebooks widely copied for
  this dataset, computed on *soft* predictions (the probabilities, not the thresholded masks):
  per batch of ``keras_batch`` slices, Dice = (2 sum(p t) + s) / (sum(p) + sum(t) + s) and
  IoU = (sum(p t) + s) / (sum(p) + sum(t) - sum(p t) + s) with smoothing s = ``keras_smooth``
  (100), then the plain mean over batches (as Keras' ``evaluate`` averages a batch-level metric).
  Batches are consecutive slices of a fixed shuffle (``torch.randperm`` seeded with 0) of the
  slices ordered by their ``rows`` id (or in accumulation order without ids), like the shuffled
  test set of those notebooks. A batch without tumour that predicts little scores near 1.
* ``dice_per_patient`` / ``iou_per_patient``: counts summed over each patient's slices (the
  patient volume), one score per patient, mean over patients. ``dice_per_patient_median`` is the
  median over patients (mean of the two middle values for an even count, as ``numpy.median``).
  ``None`` (not applicable) with ``per_patient=False``: a slice-level split (``split=paper``)
  scatters a patient's slices over the stages, so a "patient volume" is a few stray slices.
* ``detect_accuracy``, ``detect_sensitivity``, ``detect_specificity``: slice-level tumour
  detection ("does this slice contain tumour?") against the truth. A slice counts as detected
  when ``detect_prob >= detect_threshold`` (0.5: the two-class head's argmax) if an image-level
  probability is given to ``update``, otherwise when its predicted mask is non-empty. A run
  uses one of the two throughout (``tlunet.module``). Sensitivity is NaN when the set has no
  tumour slices, specificity is NaN when it has no tumour-free slices.
* ``num_slices`` and ``num_patients``: sizes of the evaluated set (as floats).

Resolution: the caller passes probabilities and truth at the resolution it scores at; tlunet
scores validation and test at the native resolution of the masks on disk (``tlunet.scoring``).

Duplicated slices: when ``update`` is given ``rows`` (a unique id per slice, e.g. its row in the
decoded arrays), ``compute`` keeps only the first occurrence of every id and drops the others
before computing anything. Under DDP, Lightning's ``DistributedSampler`` pads the validation and
test sets with repeated slices so that every process gets the same number; without ``rows``
those repeats would be counted twice and a multi-process run would not match a one-process run.
Either every ``update`` of an accumulation gets ``rows`` or none does.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from tlunet.overlap import dice_from_counts, iou_from_counts

__all__ = ["METRIC_KEYS", "PER_PATIENT_KEYS", "SegmentationMetrics", "prefixed"]

METRIC_KEYS: tuple[str, ...] = (
    "dice",
    "iou",
    "dice_bg",
    "iou_bg",
    "dice_mean_paper",
    "iou_mean_paper",
    "dice_mean_macro",
    "iou_mean_macro",
    "pixel_accuracy",
    "dice_per_image",
    "iou_per_image",
    "dice_keras_batch",
    "iou_keras_batch",
    "dice_per_patient",
    "dice_per_patient_median",
    "iou_per_patient",
    "detect_accuracy",
    "detect_sensitivity",
    "detect_specificity",
    "num_slices",
    "num_patients",
)
"""The keys of the dictionary returned by :meth:`SegmentationMetrics.compute`, in order."""

#: Keys that need whole patient volumes: ``None`` with ``per_patient=False`` (``split=paper``).
PER_PATIENT_KEYS: tuple[str, ...] = (
    "dice_per_patient",
    "dice_per_patient_median",
    "iou_per_patient",
)

_STATE_NAMES: tuple[str, ...] = (
    "patient",
    "tp",
    "fp",
    "fn",
    "tn",
    "detect",
    "truth_any",
    "soft_inter",
    "soft_pred",
)
#: The optional per-slice id state used to drop duplicated slices (see the module docstring).
_ROWS_STATE = "rows"


def _ratio_or_nan(num: Tensor, den: Tensor) -> float:
    """``num / den`` as a python float, NaN if ``den`` is zero."""
    d = int(den.item())
    return float(num.item()) / d if d > 0 else float("nan")


def _flatten_masks(x: Tensor, name: str) -> Tensor:
    """(N,1,H,W) or (N,H,W) -> (N, H*W)."""
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must have a single channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N,1,H,W) or (N,H,W), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


class SegmentationMetrics(torchmetrics.Metric):
    """Accumulates per-slice statistics and computes the project's metric vocabulary.

    See the module docstring for the definition of every returned key.

    Args:
        threshold: probabilities ``>= threshold`` are tumour pixels.
        per_patient: compute the per-patient keys (``False``: ``None``, for slice-level splits).
        detect_threshold: ``detect_prob >= detect_threshold`` marks a slice as detected.
        keras_smooth, keras_batch: smoothing and batch size of ``dice_keras_batch``.
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    patient: list[Tensor]
    tp: list[Tensor]
    fp: list[Tensor]
    fn: list[Tensor]
    tn: list[Tensor]
    detect: list[Tensor]
    truth_any: list[Tensor]
    soft_inter: list[Tensor]
    soft_pred: list[Tensor]
    rows: list[Tensor]

    def __init__(
        self,
        threshold: float = 0.5,
        per_patient: bool = True,
        detect_threshold: float = 0.5,
        keras_smooth: float = 100.0,
        keras_batch: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.per_patient = bool(per_patient)
        self.detect_threshold = float(detect_threshold)
        self.keras_smooth = float(keras_smooth)
        self.keras_batch = int(keras_batch)
        for name in (*_STATE_NAMES, _ROWS_STATE):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        probs: Tensor,
        target: Tensor,
        patient: Tensor,
        detect_prob: Tensor | None = None,
        rows: Tensor | None = None,
        pred: Tensor | None = None,
    ) -> None:
        """Add a batch of slices.

        Args:
            probs: (N,1,H,W) or (N,H,W) tumour probabilities in [0, 1].
            target: ground-truth masks in {0, 1}, same shape as ``probs`` (either layout).
            patient: (N,) integer patient ids (arbitrary, not necessarily contiguous).
            detect_prob: optional (N,) probability that each slice contains tumour. When None a
                slice is detected iff its predicted mask is non-empty.
            rows: optional (N,) integer id unique to each slice of the evaluated set. Slices
                seen again with an id already seen (DDP padding) are ignored by ``compute``.
            pred: optional binary masks (same shape) to score instead of ``probs >= threshold``
                (e.g. post-processed ones); ``probs`` still feed the soft (Keras) metrics.
        """
        p = _flatten_masks(probs, "probs")
        t = _flatten_masks(target, "target")
        if p.shape != t.shape:
            raise ValueError(
                f"probs and target shapes differ: {tuple(probs.shape)} vs {tuple(target.shape)}"
            )
        if pred is not None:
            pred = _flatten_masks(pred, "pred")
            if pred.shape != p.shape:
                raise ValueError(
                    f"pred and probs shapes differ: {tuple(pred.shape)} vs {tuple(probs.shape)}"
                )
        n = p.shape[0]
        patient = patient.reshape(-1)
        if patient.numel() != n:
            raise ValueError(f"patient must have {n} entries, got shape {tuple(patient.shape)}")
        if patient.is_floating_point():
            raise ValueError("patient ids must be integers")

        pred = p.float() >= self.threshold if pred is None else pred.bool()
        truth = t.float() >= 0.5
        tp = (pred & truth).sum(dim=1, dtype=torch.int64)
        fp = (pred & ~truth).sum(dim=1, dtype=torch.int64)
        fn = (~pred & truth).sum(dim=1, dtype=torch.int64)
        tn = (~pred & ~truth).sum(dim=1, dtype=torch.int64)

        if detect_prob is None:
            detect = pred.any(dim=1)
        else:
            detect_prob = detect_prob.reshape(-1)
            if detect_prob.numel() != n:
                raise ValueError(
                    f"detect_prob must have {n} entries, got shape {tuple(detect_prob.shape)}"
                )
            detect = detect_prob.float() >= self.detect_threshold
        if rows is not None:
            rows = rows.reshape(-1)
            if rows.numel() != n:
                raise ValueError(f"rows must have {n} entries, got shape {tuple(rows.shape)}")
            if rows.is_floating_point():
                raise ValueError("rows (slice ids) must be integers")

        self.patient.append(patient.to(device=tp.device, dtype=torch.int64))
        self.tp.append(tp)
        self.fp.append(fp)
        self.fn.append(fn)
        self.tn.append(tn)
        # Stored as int64 rather than bool so every backend can all-gather them under DDP.
        self.detect.append(detect.to(device=tp.device, dtype=torch.int64))
        self.truth_any.append(truth.any(dim=1).to(torch.int64))
        soft = p.double()
        self.soft_inter.append((soft * truth).sum(dim=1))
        self.soft_pred.append(soft.sum(dim=1))
        if rows is not None:
            self.rows.append(rows.to(device=tp.device, dtype=torch.int64))

    def compute(self) -> dict[str, float | None]:
        """The metric dictionary (keys in :data:`METRIC_KEYS`): python floats, ``None`` where
        not applicable (per-patient keys with ``per_patient=False``)."""
        if isinstance(self.tp, list) and len(self.tp) == 0:
            raise ValueError(
                "SegmentationMetrics.compute() called before any update(): no slices to evaluate"
            )
        patient = dim_zero_cat(self.patient)
        tp, fp = dim_zero_cat(self.tp), dim_zero_cat(self.fp)
        fn, tn = dim_zero_cat(self.fn), dim_zero_cat(self.tn)
        detect = dim_zero_cat(self.detect).bool()
        truth_any = dim_zero_cat(self.truth_any).bool()
        soft_inter, soft_pred = dim_zero_cat(self.soft_inter), dim_zero_cat(self.soft_pred)
        keep, order = self._first_occurrences(tp.numel())
        if keep is not None:
            patient, tp, fp, fn, tn = (x[keep] for x in (patient, tp, fp, fn, tn))
            detect, truth_any = detect[keep], truth_any[keep]
            soft_inter, soft_pred = soft_inter[keep], soft_pred[keep]
        n_slices = tp.numel()
        if n_slices == 0:
            raise ValueError("SegmentationMetrics.compute(): the accumulated set has no slices")

        # Pixel-level scores over the whole set.
        TP, FP, FN, TN = tp.sum(), fp.sum(), fn.sum(), tn.sum()
        total = (TP + FP + FN + TN).double()
        dice, iou = dice_from_counts(TP, FP, FN), iou_from_counts(TP, FP, FN)
        dice_bg, iou_bg = dice_from_counts(TN, FP, FN), iou_from_counts(TN, FP, FN)
        w_tumour = (TP + FN).double() / total
        w_bg = (TN + FP).double() / total

        # Per-patient volumes: sum the slice counts of each patient.
        ids, inverse = torch.unique(patient, return_inverse=True)
        n_patients = ids.numel()

        def per_patient(x: Tensor) -> Tensor:
            return torch.zeros(n_patients, dtype=x.dtype, device=x.device).scatter_add_(
                0, inverse, x
            )

        p_tp, p_fp, p_fn = per_patient(tp), per_patient(fp), per_patient(fn)
        dice_patient = dice_from_counts(p_tp, p_fp, p_fn)
        iou_patient = iou_from_counts(p_tp, p_fp, p_fn)
        keras_dice, keras_iou = self._keras_batch(soft_inter, soft_pred, (tp + fn).double(), order)

        # Slice-level detection.
        d_tp = (detect & truth_any).sum()
        d_tn = (~detect & ~truth_any).sum()
        d_fp = (detect & ~truth_any).sum()
        d_fn = (~detect & truth_any).sum()

        out = {
            "dice": dice,
            "iou": iou,
            "dice_bg": dice_bg,
            "iou_bg": iou_bg,
            "dice_mean_paper": w_bg * dice_bg + w_tumour * dice,
            "iou_mean_paper": w_bg * iou_bg + w_tumour * iou,
            "dice_mean_macro": (dice_bg + dice) / 2,
            "iou_mean_macro": (iou_bg + iou) / 2,
            "pixel_accuracy": (TP + TN).double() / total,
            "dice_per_image": dice_from_counts(tp, fp, fn).mean(),
            "iou_per_image": iou_from_counts(tp, fp, fn).mean(),
            "dice_keras_batch": keras_dice,
            "iou_keras_batch": keras_iou,
            "dice_per_patient": dice_patient.mean(),
            # quantile interpolates linearly -> mean of the two middle values (numpy median).
            "dice_per_patient_median": torch.quantile(dice_patient, 0.5),
            "iou_per_patient": iou_patient.mean(),
        }
        result: dict[str, float | None] = {k: float(v.item()) for k, v in out.items()}
        if not self.per_patient:
            result |= dict.fromkeys(PER_PATIENT_KEYS)
        result["detect_accuracy"] = float((d_tp + d_tn).item()) / n_slices
        result["detect_sensitivity"] = _ratio_or_nan(d_tp, d_tp + d_fn)
        result["detect_specificity"] = _ratio_or_nan(d_tn, d_tn + d_fp)
        result["num_slices"] = float(n_slices)
        result["num_patients"] = float(n_patients)
        return {k: result[k] for k in METRIC_KEYS}

    def _keras_batch(
        self, inter: Tensor, pred: Tensor, truth: Tensor, order: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``dice_keras_batch`` and ``iou_keras_batch`` from per-slice soft sums (float64)."""
        n = inter.numel()
        if order is None:
            order = torch.arange(n, device=inter.device)
        shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        order = order[shuffle.to(order.device)]
        batch = torch.arange(n, device=inter.device) // self.keras_batch
        n_batches = int(batch[-1].item()) + 1

        def per_batch(x: Tensor) -> Tensor:
            return torch.zeros(n_batches, dtype=x.dtype, device=x.device).scatter_add_(
                0, batch, x[order]
            )

        i, p, t = per_batch(inter), per_batch(pred), per_batch(truth)
        s = self.keras_smooth
        dice = (2 * i + s) / (p + t + s)
        iou = (i + s) / (p + t - i + s)
        return dice.mean(), iou.mean()

    def _first_occurrences(self, n_slices: int) -> tuple[Tensor | None, Tensor | None]:
        """Indices (in accumulation order) of the first slice of every ``rows`` id, and the
        order of those kept slices by id; ``(None, None)`` when no ids were given. After a DDP
        gather the accumulation order is rank 0's slices, then rank 1's..."""
        rows = self.rows
        if isinstance(rows, list):
            if len(rows) == 0:
                return None, None
            rows = dim_zero_cat(rows)
        if rows.numel() == 0:  # every process updated without ids (gathered as empty tensors)
            return None, None
        if rows.numel() != n_slices:
            raise ValueError(
                f"SegmentationMetrics: {rows.numel()} slice ids (rows) for {n_slices} slices; "
                "give rows to every update() or to none"
            )
        rows = rows.long()
        order = torch.argsort(rows, stable=True)
        sorted_rows = rows[order]
        first = torch.ones_like(sorted_rows, dtype=torch.bool)
        first[1:] = sorted_rows[1:] != sorted_rows[:-1]
        keep = order[first].sort().values
        return keep, torch.argsort(rows[keep], stable=True)


def prefixed(metrics: dict[str, float | None], stage: str) -> dict[str, float | None]:
    """Prefix every key with ``"{stage}/"`` (e.g. ``"val/dice"``) for logging."""
    return {f"{stage}/{k}": v for k, v in metrics.items()}
