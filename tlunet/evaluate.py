"""Recompute every metric of a checkpoint on a chosen split, without retraining.

    python -m tlunet.evaluate ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt \\
        [data.root=DIR] [data.split=patient|paper] [data.fold=i] [stage=test|val|train|all]

Writes into the evaluation directory: ``metrics.json`` (the run's metric names with the stage
prefix, plus HD95, volume similarity, per-patient detection and bootstrap 95 % intervals of
``dice_per_patient`` and ``dice``), ``evaluation.json`` (what was evaluated and how: checkpoint,
stage, options, preprocessing, scoring resolution, seen patients), ``per_patient.csv``
(patient, slices, tumour pixels true/predicted, Dice, IoU, HD95 in pixels, volume similarity,
detected), ``per_slice.csv`` and ``options.csv``; and figures of the same numbers:
``per_patient.png`` (each patient's Dice with the mean, median and interval),
``worst_patients.png`` (the lowest-Dice patients' worst slices, errors coloured) and, with
``eval.threshold=auto``, ``threshold.png`` (validation Dice against threshold). Loops show
progress bars on a terminal.

Every score is computed at the native resolution of the masks on disk, on the masks
``tlunet.predict`` would write (:mod:`tlunet.scoring`). Model, image size and normalisation
come from the checkpoint; split settings too, unless ``data.*`` values on the command line
replace them; the model runs in the precision its run computed in unless ``precision=`` says
otherwise (:mod:`tlunet.precision`). Patients the model was trained or validated on, found by
folder name or, renamed, by their images (:mod:`tlunet.data.fingerprint`), are refused unless
``eval.allow_seen_patients=true``. A checkpoint trained on phantoms (``data=synthetic``) is
evaluated on its phantoms in this machine's cache; with ``data.root=`` on that folder, read as
real data (a warning says so): nothing is ever written into a data folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar

from tlunet.artifacts import (
    EVALUATION_FILE,
    METRICS_FILE,
    OPTIONS_FILE,
    PER_PATIENT_COLUMNS,
    PER_PATIENT_FILE,
    PER_SLICE_COLUMNS,
    PER_SLICE_FILE,
    checkpoint_section,
)
from tlunet.checkpoint import load_checkpoint, module_from_checkpoint
from tlunet.cli import user_errors_exit
from tlunet.data.synthetic import phantom_folder_name
from tlunet.errors import ConfigError
from tlunet.lightning_compat import extra_callback
from tlunet.metrics import SegmentationMetrics
from tlunet.postprocess import (
    parse_postprocess,
    pick_threshold,
    postprocess_volume,
    threshold_curve,
)
from tlunet.precision import checkpoint_precision
from tlunet.runfolder import holds_evaluation_folder
from tlunet.scoring import scoring_info, threshold_masks, to_native
from tlunet.stats import global_dice_ci, mean_ci
from tlunet.stops import check as check_stop
from tlunet.utils import (
    csv_text,
    environment_info,
    progress,
    show_progress,
    write_json_atomic,
    write_text_atomic,
)
from tlunet.viz import (
    FLAIR,
    error_counts,
    plot_error_slices,
    plot_per_patient,
    plot_threshold_curves,
)
from tlunet.volume_metrics import dice_iou, hd95, volume_similarity

log = logging.getLogger(__name__)
#: What ``stage=`` may name: a stage of the split, or ``all`` (every slice of the data).
EVAL_STAGES = ("test", "val", "train", "all")


@dataclass
class Volume:
    """One patient's evaluated slices in slice order: ``probs`` (S, h, w) float32 at the
    network's resolution, ``truth`` (S, H, W) uint8 at the masks' native resolution, ``rows``
    (S,) slice ids, ``detect`` (S,) the aux head's tumour probability or ``None``."""

    numbers: list[int]
    rows: np.ndarray
    probs: np.ndarray
    truth: np.ndarray
    detect: np.ndarray | None


class PredictionCollector(pl.Callback):
    """Keeps every evaluated slice's probabilities (float32, network resolution), native truth
    (uint8), aux-head probability and identity; with ``tta=True`` also the average of the plain
    and the horizontally flipped prediction (the flip undone on the width axis)."""

    def __init__(self, tta: bool = False) -> None:
        self.tta = tta
        self.rows: list[tuple[Any, ...]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        probs = outputs["probs"].float()
        detect = outputs.get("detect_prob")
        tta_probs = tta_detect = None
        if self.tta:
            # Outside test_step, so in the Trainer's precision only inside its context.
            with trainer.precision_plugin.forward_context():
                tta_probs, tta_detect = flip_tta(pl_module, batch["image"], probs, detect)
            tta_probs = tta_probs[:, 0].cpu().numpy()
            tta_detect = None if tta_detect is None else tta_detect.cpu().numpy()
        probs = probs[:, 0].cpu().numpy()
        detect = None if detect is None else detect.float().cpu().numpy()
        truths = (batch["mask_native"][:, 0] > 0).cpu().numpy().astype(np.uint8)
        for i in range(len(probs)):
            self.rows.append(
                (
                    int(batch["patient"][i]),
                    int(batch["slice"][i]),
                    int(batch["row"][i]),
                    probs[i],
                    truths[i],
                    None if detect is None else float(detect[i]),
                    None if tta_probs is None else tta_probs[i],
                    None if tta_detect is None else float(tta_detect[i]),
                )
            )

    def volumes(self, tta: bool = False) -> dict[int, Volume]:
        """patient id -> :class:`Volume`, plain or (``tta``) flip-averaged probabilities."""
        by_patient: dict[int, list[tuple[Any, ...]]] = {}
        for pid, number, row, probs, truth, det, tta_probs, tta_det in self.rows:
            item = (number, row, tta_probs if tta else probs, truth, tta_det if tta else det)
            by_patient.setdefault(pid, []).append(item)
        out = {}
        for pid, items in by_patient.items():
            items.sort(key=lambda t: t[0])
            detect = [t[4] for t in items]
            out[pid] = Volume(
                numbers=[t[0] for t in items],
                rows=np.array([t[1] for t in items], dtype=np.int64),
                probs=np.stack([t[2] for t in items]),
                truth=np.stack([t[3] for t in items]),
                detect=None if detect[0] is None else np.array(detect, dtype=np.float32),
            )
        return out


def flip_tta(
    module: Any, images: torch.Tensor, probs: torch.Tensor, detect: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip test-time augmentation: the mean of ``probs`` (N, 1, S, S, the plain prediction of
    ``images``) and the prediction of the horizontally flipped images flipped back (width,
    the last axis); the aux head's probabilities (N,) averaged the same way."""
    flipped_probs, flipped_detect = module.predict_probs(torch.flip(images, dims=[-1]))
    mean = (probs.float() + torch.flip(flipped_probs.float(), dims=[-1])) / 2
    if detect is None or flipped_detect is None:
        return mean, None
    return mean, (detect.float() + flipped_detect.float()) / 2


def native_probs(volume: Volume) -> np.ndarray:
    """The volume's probabilities at the masks' native resolution (S, H, W) float32: the
    resizing :func:`tlunet.predict.predict` applies (:func:`tlunet.scoring.to_native`)."""
    probs = torch.from_numpy(volume.probs)[:, None]
    return to_native(probs, volume.truth.shape[-2:])[:, 0].numpy()


@dataclass
class Scored:
    """A volume scored with one option set: native probabilities, binary prediction, truth."""

    volume: Volume
    probs: np.ndarray  # (S, H, W) float32, native resolution
    pred: np.ndarray  # (S, H, W) bool, thresholded (and post-processed)


def score_volumes(
    volumes: dict[int, Volume], threshold: float, postprocess: tuple[str, int] | None
) -> dict[int, Scored]:
    """Resize each patient's probabilities to native resolution, threshold them, and
    post-process the patient's volume."""
    out = {}
    for pid, volume in volumes.items():
        probs = native_probs(volume)
        pred = postprocess_volume(threshold_masks(probs, threshold), postprocess)
        out[pid] = Scored(volume, probs, pred)
    return out


def tune_threshold(
    volumes: dict[int, Volume], postprocess: tuple[str, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tlunet.postprocess.threshold_curve` of ``volumes`` at native resolution, after
    ``postprocess``: (thresholds, global Dice at each); :func:`~tlunet.postprocess.pick_threshold`
    chooses from it."""
    return threshold_curve([(native_probs(v), v.truth) for v in volumes.values()], postprocess)


def patient_tables(
    scored: dict[int, Scored], names: list[str], per_patient: bool
) -> tuple[list[list[Any]], list[list[Any]], dict[str, Any]]:
    """Per-patient rows, per-slice rows and per-patient summaries (with bootstrap intervals)
    of scored volumes. Without ``per_patient`` (``split=paper``) the per-patient rows are empty
    and the summaries ``None``: a patient's few scattered slices are not a volume."""
    patients, slices = [], []
    counts = []
    for pid in sorted(scored, key=lambda p: names[p]):
        item = scored[pid]
        pred, truth = item.pred, item.volume.truth.astype(bool)
        detected = (
            pred.reshape(len(pred), -1).any(axis=1)
            if item.volume.detect is None
            else item.volume.detect >= 0.5
        )
        for k, number in enumerate(item.volume.numbers):
            p, t = pred[k], truth[k]
            slices.append([names[pid], number, int(t.sum()), int(p.sum()), dice_iou(p, t)[0]])
        if not per_patient:
            continue
        dice, iou = dice_iou(pred, truth)
        confusion = (
            int(np.count_nonzero(pred & truth)),
            int(np.count_nonzero(pred & ~truth)),
            int(np.count_nonzero(~pred & truth)),
        )
        patients.append(
            [
                names[pid],
                len(item.volume.numbers),
                int(truth.sum()),
                int(pred.sum()),
                dice,
                iou,
                hd95(pred, truth),
                volume_similarity(pred, truth),
                bool(detected.any()),
                *confusion,
            ]
        )
        counts.append(confusion)
    if not per_patient:
        return [], slices, dict.fromkeys(PATIENT_SUMMARY_KEYS)
    hd = np.array([r[6] for r in patients], dtype=np.float64)
    finite = hd[np.isfinite(hd)]
    truth_any = np.array([r[2] > 0 for r in patients])
    detected = np.array([r[8] for r in patients])
    dice_low, dice_high = mean_ci([r[4] for r in patients])
    tp, fp, fn = (np.array(c, dtype=np.float64) for c in zip(*counts, strict=True))
    global_low, global_high = global_dice_ci(tp, fp, fn)
    summary = {
        "hd95_per_patient": float(np.mean(finite)) if finite.size else float("nan"),
        "hd95_per_patient_median": float(np.median(finite)) if finite.size else float("nan"),
        "hd95_patients": float(finite.size),
        "hd95_inf_patients": float(np.isinf(hd).sum()),
        "volume_similarity_per_patient": float(np.mean([r[7] for r in patients])),
        "detect_patient_sensitivity": float(detected[truth_any].mean())
        if truth_any.any()
        else float("nan"),
        "detect_patient_specificity": float((~detected[~truth_any]).mean())
        if (~truth_any).any()
        else float("nan"),
        "dice_per_patient_ci95_low": dice_low,
        "dice_per_patient_ci95_high": dice_high,
        "dice_ci95_low": global_low,
        "dice_ci95_high": global_high,
    }
    return patients, slices, summary


#: Keys :func:`patient_tables` adds to the metrics (``None`` under ``split=paper``).
PATIENT_SUMMARY_KEYS = (
    "hd95_per_patient",
    "hd95_per_patient_median",
    "hd95_patients",
    "hd95_inf_patients",
    "volume_similarity_per_patient",
    "detect_patient_sensitivity",
    "detect_patient_specificity",
    "dice_per_patient_ci95_low",
    "dice_per_patient_ci95_high",
    "dice_ci95_low",
    "dice_ci95_high",
)


def volume_metrics(
    scored: dict[int, Scored], names: list[str], per_patient: bool
) -> tuple[dict[str, Any], list[list[Any]], list[list[Any]]]:
    """The whole metric vocabulary of scored volumes, plus the per-patient and per-slice rows."""
    metric = SegmentationMetrics(threshold=0.5, per_patient=per_patient)
    for pid, item in scored.items():
        volume = item.volume
        metric.update(
            torch.from_numpy(item.probs),
            torch.from_numpy(volume.truth),
            torch.full((len(volume.rows),), pid, dtype=torch.long),
            None if volume.detect is None else torch.from_numpy(volume.detect),
            rows=torch.from_numpy(volume.rows),
            pred=torch.from_numpy(item.pred),
        )
    values = metric.compute()
    patients, slices, summary = patient_tables(scored, names, per_patient)
    return {**values, **summary}, patients, slices


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar on stderr, naming the stage a pass predicts (``description``)."""

    def __init__(self) -> None:
        super().__init__(console_kwargs={"stderr": True})
        self.description = "Predicting"

    @property
    def test_description(self) -> str:
        return self.description


def _collect(
    trainer: pl.Trainer, module: Any, loader: Any, tta: bool, stage: str
) -> PredictionCollector:
    """Run the model over ``loader`` (the slices of ``stage``), keeping every prediction."""
    for callback in trainer.callbacks:
        if isinstance(callback, StageProgressBar):
            callback.description = f"Predicting stage={stage}" + (" (+ flip)" if tta else "")
    with extra_callback(trainer, PredictionCollector(tta)) as collector:
        trainer.test(module, dataloaders=loader, verbose=False)
        check_stop()  # a SIGTERM Lightning noted during the pass: no partial results
    return collector


def seen_patients(
    recorded: dict[str, list[str]] | None,
    evaluated: list[str],
    fingerprints: dict[str, str] | None = None,
    evaluated_fingerprints: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Which of the ``evaluated`` patients the checkpoint trained or validated on; ``None``
    when the checkpoint does not record its patients (made before tlunet recorded them).

    A patient is seen when its name is one of ``recorded``'s (``{"train": [...], "val":
    [...]}``) or, given the checkpoint's ``fingerprints`` (recorded name -> content
    fingerprint, :mod:`tlunet.data.fingerprint`) and those of the evaluated patients, when its
    images are those of a recorded patient under another name. Returns the counts (``count``
    seen, of them ``train`` and ``val``, of ``evaluated``), ``compared`` (``names and
    content`` or ``names only``) and ``patients``: per seen patient, the recorded patient it
    matched (``recorded_as``), that patient's ``stage`` and ``matched_by`` (``name``,
    ``content`` or ``name and content``).
    """
    if not recorded:
        return None
    stage_of = {name: "val" for name in recorded.get("val") or []}
    stage_of |= {name: "train" for name in recorded.get("train") or []}
    by_content: dict[str, str] = {}
    compare = bool(fingerprints) and evaluated_fingerprints is not None
    if compare:
        for name in sorted(stage_of, reverse=True):  # the first name wins a shared content
            if fingerprints.get(name):
                by_content[fingerprints[name]] = name
    patients = []
    for name in sorted(set(evaluated)):
        content = evaluated_fingerprints.get(name) if compare else None
        twin = by_content.get(content) if content else None
        if name in stage_of:
            same = content is not None and fingerprints.get(name) == content
            match = (name, "name and content" if same else "name")
        elif twin is not None:
            match = (twin, "content")
        else:
            continue
        patients.append(
            {
                "patient": name,
                "recorded_as": match[0],
                "stage": stage_of[match[0]],
                "matched_by": match[1],
            }
        )
    return {
        "count": len(patients),
        "train": sum(p["stage"] == "train" for p in patients),
        "val": sum(p["stage"] == "val" for p in patients),
        "evaluated": len(set(evaluated)),
        "compared": "names and content" if compare else "names only",
        "patients": patients,
    }


def synthetic_data(data: DictConfig, root_given: bool, cache_dir: str) -> None:
    """The data node of a checkpoint trained on ``data=synthetic``, set for this evaluation.

    ``data.root=`` given on the command line: that folder is evaluated as it is on disk, as
    real data (the phantom settings are dropped: nothing is written there), and a warning says
    so. Otherwise the checkpoint's phantoms are read from, or regenerated into, this machine's
    cache (``<paths.cache_dir>/synthetic``, as ``data=synthetic`` keeps them). Other data
    nodes are left as they are."""
    if data.get("synthetic") is None:
        return
    if root_given:
        data.synthetic = None
        log.warning(
            "The checkpoint was trained on synthetic phantoms (data=synthetic); data.root=%s is "
            "evaluated as real data, as it is on disk (no phantom is written there).",
            data.root,
        )
        return
    home = Path(str(cache_dir)).expanduser() / "synthetic"
    data.synthetic_cache = str(home)
    data.root = str(home / phantom_folder_name(data.synthetic))
    log.info("The checkpoint's synthetic phantoms: %s", data.root)


@dataclass
class EvalOptions:
    """What ``eval.*`` asks for, checked: flip TTA, 3D post-processing (parsed, and as given),
    the threshold (``None``: the checkpoint's; a number; ``"auto"``: tuned on validation)."""

    tta: str | None
    postprocess: tuple[str, int] | None
    postprocess_text: Any
    threshold: Any
    allow_seen_patients: bool

    @property
    def selected(self) -> str:
        """The probabilities the selected options use: with flip TTA or without."""
        return "tta" if self.tta == "flip" else "plain"


def eval_options(cfg: DictConfig) -> EvalOptions:
    """The command's options, each checked before anything loads (one line per mistake)."""
    if not cfg.ckpt_path:
        raise ConfigError(
            "ckpt_path is not set: pass ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt"
        )
    if cfg.stage not in EVAL_STAGES:
        raise ConfigError(f"stage='{cfg.stage}' is unknown; choose one of {list(EVAL_STAGES)}.")
    options = cfg.get("eval") or {}
    tta = options.get("tta")
    if tta not in (None, "flip"):
        raise ConfigError(f"eval.tta='{tta}' is unknown; use flip or null.")
    postprocess = parse_postprocess(options.get("postprocess"))
    threshold_option = options.get("threshold")
    if threshold_option == "auto" and cfg.stage in ("val", "all"):
        raise ConfigError(
            f"eval.threshold=auto tunes the threshold on the validation stage, which stage="
            f"{cfg.stage} contains: the score would be tuned on the slices it is computed on. "
            "Evaluate stage=test, or give a number (eval.threshold=0.4)."
        )
    if threshold_option not in (None, "auto"):
        try:
            fixed = float(threshold_option)
        except (TypeError, ValueError):
            fixed = -1.0
        if not 0 < fixed < 1:
            raise ConfigError(f"eval.threshold={threshold_option} must be in (0, 1) or auto.")
    return EvalOptions(
        tta,
        postprocess,
        options.get("postprocess"),
        threshold_option,
        bool(options.get("allow_seen_patients", False)),
    )


@dataclass
class EvalData:
    """The checkpoint and the data it is evaluated on: its record, the run's config with the
    command's data settings, the DataModule set up with the checkpoint's preprocessing, the
    evaluated patients and which of them the model has seen."""

    checkpoint: dict[str, Any]
    run_cfg: DictConfig
    datamodule: Any
    evaluated: list[str]
    seen: dict[str, Any] | None
    per_patient: bool


def evaluation_data(cfg: DictConfig, options: EvalOptions) -> EvalData:
    """Load the checkpoint (safely), set up its data for ``cfg.stage`` and refuse patients the
    model trained or validated on (unless ``eval.allow_seen_patients``), before the model is
    built."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    stored = checkpoint_section(checkpoint)
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    for key, value in cfg.data.items():
        if value is not None:
            run_cfg.data[key] = value
    # This command's cache (null: decode into memory), never a folder the checkpoint names.
    run_cfg.data.cache_dir = cfg.data.cache_dir
    try:
        synthetic_data(run_cfg.data, cfg.data.root is not None, cfg.paths.cache_dir)
    except ConfigError as exc:  # a hand-made checkpoint's phantom settings
        raise ConfigError(
            f"The checkpoint '{cfg.ckpt_path}' was trained on synthetic phantoms, but its {exc} "
            "Evaluate it on real data with data.root=<folder>."
        ) from exc
    if cfg.data.fold is not None and not run_cfg.data.get("num_folds"):
        raise ConfigError(
            "data.fold needs data.num_folds (the checkpoint was not trained with folds)."
        )
    per_patient = run_cfg.data.get("split") != "paper"
    if options.postprocess is not None and not per_patient:
        raise ConfigError(
            f"eval.postprocess={options.postprocess_text} works on patient volumes, which a "
            "slice-level split (data.split=paper) does not have: drop it or evaluate a "
            "patient split."
        )
    preprocessing = stored.get("preprocessing")
    if not preprocessing:
        log.warning(
            "%s records no preprocessing: image size and normalisation follow its config.",
            cfg.ckpt_path,
        )
    # The model's own input: image size, mean and std from the checkpoint, never recomputed.
    datamodule = instantiate(run_cfg.data, preprocessing=preprocessing or None)
    datamodule.prepare_data()
    datamodule.setup("test")
    if cfg.stage == "all":  # every slice of the data, without augmentation
        datamodule.add_stage_of_every_slice("all")
    datamodule.require_stage(cfg.stage)
    evaluated = datamodule.patients if cfg.stage == "all" else datamodule.stage_patients(cfg.stage)
    seen = check_seen_patients(cfg, options, stored, datamodule, evaluated, per_patient)
    return EvalData(checkpoint, run_cfg, datamodule, evaluated, seen, per_patient)


def check_seen_patients(
    cfg: DictConfig,
    options: EvalOptions,
    stored: dict[str, Any],
    datamodule: Any,
    evaluated: list[str],
    per_patient: bool,
) -> dict[str, Any] | None:
    """The evaluated patients the model trained or validated on, by name and by content (a
    renamed copy) where the checkpoint records fingerprints (:func:`seen_patients`); refused
    unless ``eval.allow_seen_patients``; ``None`` when the checkpoint records no patients."""
    recorded_fingerprints = (stored.get("patient_fingerprints") or {}).get("patients")
    seen = seen_patients(
        stored.get("patients"),
        evaluated,
        recorded_fingerprints,
        datamodule.patient_fingerprints(evaluated) if recorded_fingerprints else None,
    )
    if seen is None:
        log.warning(
            "%s does not record its training patients: cannot check that the %d evaluated "
            "patients are new to it.",
            cfg.ckpt_path,
            len(evaluated),
        )
    elif seen["compared"] == "names only":
        log.warning(
            "%s records no fingerprints of its patients (an older tlunet made it): the "
            "evaluated patients were compared with its training and validation patients by "
            "folder name only, so a renamed copy of one of them would not be found.",
            cfg.ckpt_path,
        )
    renamed = 0 if seen is None else sum(p["matched_by"] == "content" for p in seen["patients"])
    if seen is not None and seen["count"] and not options.allow_seen_patients:
        raise ConfigError(
            f"{seen['count']} of the {seen['evaluated']} patients of stage={cfg.stage} were used "
            f"to train ({seen['train']}) or validate ({seen['val']}) this model"
            + (
                f" ({renamed} of them under another name: the same images as a training or "
                "validation patient)"
                if renamed
                else ""
            )
            + ", so its scores there are not a test. Evaluate new patients, or pass "
            "eval.allow_seen_patients=true (the count is then written to metrics.json as "
            "seen_patients)."
            + (
                " A slice-level split (data.split=paper) shares patients between all stages."
                if not per_patient
                else ""
            )
        )
    return seen


@dataclass
class ModelPass:
    """The model's passes over the evaluated stage: the module, the precision it ran in, the
    Trainer, the patient volumes of probabilities (``plain``, and ``tta`` with flip TTA) and
    the run's own metrics of the plain pass (``baseline``)."""

    module: Any
    precision: Any
    trainer: pl.Trainer
    sources: dict[str, Any]
    baseline: dict[str, Any]


def run_model(cfg: DictConfig, options: EvalOptions, data: EvalData) -> ModelPass:
    """Build the model from the checkpoint and run it over ``cfg.stage`` in the precision its
    run computed in (or ``precision=``), keeping every prediction."""
    module = module_from_checkpoint(data.checkpoint, data.run_cfg)
    # The run's precision by default: the run's own test is reproduced (docs/evaluation.md).
    precision = checkpoint_precision(
        data.checkpoint, cfg.ckpt_path, cfg.accelerator, cfg.get("precision"), "precision"
    )
    log.info("Running the model in %s: %s", precision.precision, precision.source)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        # The model's passes show Lightning's bar on a terminal (stderr), as training does.
        callbacks=[StageProgressBar()] if show_progress() else [],
        enable_progress_bar=show_progress(),
        enable_model_summary=False,
        precision=precision.precision,
    )
    data.datamodule.trainer = trainer  # data.pin_memory=null: pinned when evaluating on CUDA
    loader = data.datamodule.dataloader(cfg.stage, shuffle=False)
    collector = _collect(trainer, module, loader, options.tta == "flip", cfg.stage)
    baseline = {**trainer.callback_metrics, **module.epoch_metrics["test"]}
    sources = {"plain": collector.volumes()}
    if options.tta == "flip":
        sources["tta"] = collector.volumes(tta=True)
    return ModelPass(module, precision, trainer, sources, baseline)


def choose_thresholds(
    options: EvalOptions, data: EvalData, model: ModelPass
) -> tuple[dict[tuple[str, Any], tuple[float, float]], dict[tuple[str, Any], Any]]:
    """With ``eval.threshold=auto``: the threshold of the best validation Dice, tuned on
    exactly the probabilities and post-processing of each row that uses it, and the curves
    it was read from; else nothing to tune."""
    tuned: dict[tuple[str, Any], tuple[float, float]] = {}
    curves: dict[tuple[str, Any], tuple[np.ndarray, np.ndarray]] = {}
    if options.threshold != "auto":
        return tuned, curves
    flip = options.tta == "flip"
    val = _collect(model.trainer, model.module, data.datamodule.dataloader("val"), flip, "val")
    val_sources = {"plain": val.volumes()}
    if flip:
        val_sources["tta"] = val.volumes(tta=True)
    for source, pp in {("plain", None), (options.selected, options.postprocess)}:
        curves[(source, pp)] = tune_threshold(val_sources[source], pp)
        tuned[(source, pp)] = pick_threshold(*curves[(source, pp)])
        log.info(
            "eval.threshold=auto for %s probabilities%s: %.2f (validation Dice %.4f)",
            source,
            f", {options.postprocess_text}" if pp else "",
            *tuned[(source, pp)],
        )
    return tuned, curves


def option_variants(
    options: EvalOptions, threshold: float, tuned: dict[tuple[str, Any], tuple[float, float]]
) -> list[tuple[str, str, float, Any]]:
    """The rows of ``options.csv``: the baseline, every option alone, then all together (the
    effect of each is visible), as (name, probabilities, threshold, post-processing)."""

    def threshold_for(source: str, pp: tuple[str, int] | None) -> float:
        if options.threshold == "auto":
            return tuned[(source, pp)][0]
        return threshold if options.threshold is None else float(options.threshold)

    variants = [("baseline", "plain", threshold, None)]
    if options.tta == "flip":
        variants.append(("tta=flip", "tta", threshold, None))
    if options.postprocess is not None:
        variants.append(
            (f"postprocess={options.postprocess_text}", "plain", threshold, options.postprocess)
        )
    if options.threshold is not None:
        variants.append(
            (f"threshold={options.threshold}", "plain", threshold_for("plain", None), None)
        )
    if len(variants) > 2:
        selected, pp = options.selected, options.postprocess
        variants.append(("all selected", selected, threshold_for(selected, pp), pp))
    return variants


@holds_evaluation_folder
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.stage``; write the files; return the metrics:
    options -> data -> the model's passes -> thresholds -> scores -> files -> figures."""
    options = eval_options(cfg)
    data = evaluation_data(cfg, options)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = run_model(cfg, options, data)
    tuned, curves = choose_thresholds(options, data, model)
    names = data.datamodule.patients
    table = []
    for name, source, thr, pp in progress(
        option_variants(options, model.module.threshold, tuned), "Scoring"
    ):
        scored = score_volumes(model.sources[source], thr, pp)
        values, patients, slices = volume_metrics(scored, names, data.per_patient)
        table.append((name, thr, values))
    # The files and figures hold the selected options (the last row).
    metrics = evaluation_metrics(cfg.stage, table, model.baseline, data.seen)
    files = write_evaluation(cfg, options, data, model, table, tuned, metrics, patients, slices)
    figures = []
    if data.per_patient:
        figures += [
            (
                "per_patient.png",
                lambda path: figure_per_patient(patients, metrics, table, cfg.stage, path),
            ),
            (
                "worst_patients.png",
                lambda path: figure_worst_patients(scored, patients, names, data.datamodule, path),
            ),
        ]
    if curves:
        figures.append(
            (
                "threshold.png",
                lambda path: figure_threshold(
                    curves, tuned, cfg.get("eval") or {}, model.module.threshold, path
                ),
            )
        )
    files += [file for file, draw in figures if draw_figure(draw, out_dir / file)]
    log.info("Evaluation of %s on %s written to %s", cfg.ckpt_path, cfg.stage, out_dir)
    if not data.per_patient:
        print(
            "data.split=paper: per-patient metrics, HD95, per_patient.csv and the per-patient "
            "figures are not applicable (a stage holds scattered slices of each patient)."
        )
    print(f"Evaluation written to {out_dir}: {', '.join(files)}")
    return metrics


def evaluation_metrics(
    stage: str, table: list[tuple[str, float, dict[str, Any]]], baseline: dict[str, Any], seen: Any
) -> dict[str, Any]:
    """metrics.json: the selected options' metrics (the last row of ``table``), the model's
    loss (without options) and, with no option, exactly the run's own computation."""
    metrics: dict[str, Any] = {f"{stage}/{k}": v for k, v in table[-1][2].items()}
    metrics[f"{stage}/loss"] = float(baseline["test/loss"])  # the model's, without options
    if len(table) == 1:  # no option: exactly the run's own computation
        metrics |= {k.replace("test/", f"{stage}/", 1): v for k, v in baseline.items()}
    metrics = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
    metrics["seen_patients"] = None if seen is None else seen["count"]
    return metrics


#: options.csv's metric columns, after the option's name and threshold.
OPTION_COLUMNS = (
    "dice",
    "iou",
    "dice_per_patient",
    "dice_per_image",
    "dice_keras_batch",
    "hd95_per_patient",
    "hd95_inf_patients",
    "volume_similarity_per_patient",
    "detect_accuracy",
)


def write_evaluation(
    cfg: DictConfig,
    options: EvalOptions,
    data: EvalData,
    model: ModelPass,
    table: list[tuple[str, float, dict[str, Any]]],
    tuned: dict[tuple[str, Any], tuple[float, float]],
    metrics: dict[str, Any],
    patients: list[list[Any]],
    slices: list[list[Any]],
) -> list[str]:
    """Write options.csv, per_patient.csv (patient splits), per_slice.csv, evaluation.json and,
    last, metrics.json into the command's folder; return their names in the order shown."""
    out_dir = Path(cfg.paths.output_dir)
    write_text_atomic(
        out_dir / OPTIONS_FILE,
        csv_text(
            ["option", "threshold", *OPTION_COLUMNS],
            [
                [name, thr, *[_cell(values[c]) for c in OPTION_COLUMNS]]
                for name, thr, values in table
            ],
        ),
    )
    files = [METRICS_FILE, EVALUATION_FILE, OPTIONS_FILE, PER_SLICE_FILE]
    if data.per_patient:
        write_text_atomic(out_dir / PER_PATIENT_FILE, csv_text(PER_PATIENT_COLUMNS, patients))
        files.insert(2, PER_PATIENT_FILE)
    write_text_atomic(out_dir / PER_SLICE_FILE, csv_text(PER_SLICE_COLUMNS, slices))
    run_cfg = data.run_cfg
    info = {
        "checkpoint": str(Path(str(cfg.ckpt_path)).expanduser().resolve()),
        "stage": cfg.stage,
        "data_root": str(run_cfg.data.root),
        "split": run_cfg.data.get("split"),
        "fold": run_cfg.data.get("fold") if run_cfg.data.get("num_folds") else None,
        "patients": len(data.evaluated),
        "seen_patients": data.seen,
        "precision": model.precision.info(),
        "options": {
            "tta": options.tta,
            "postprocess": options.postprocess_text,
            "threshold": options.threshold,
            "selected_threshold": table[-1][1],
            "tuned_on_validation": {
                f"{source}{'+' + str(options.postprocess_text) if pp else ''}": {
                    "threshold": thr,
                    "validation_dice": dice,
                }
                for (source, pp), (thr, dice) in tuned.items()
            },
        },
        "preprocessing": data.datamodule.preprocessing,
        "scoring": scoring_info(data.datamodule, model.module, threshold=table[-1][1]),
        "environment": environment_info(),
    }
    write_json_atomic(out_dir / EVALUATION_FILE, info)
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return files


def draw_figure(draw: Callable[[Path], Any], path: Path) -> bool:
    """``draw(path)``; a failure logs a warning and returns False: a figure never costs an
    evaluation its numbers."""
    try:
        draw(path)
    except Exception as exc:
        log.warning("Could not draw %s: %s: %s", path.name, type(exc).__name__, exc)
        return False
    return True


#: How many of the lowest-Dice patients ``worst_patients.png`` shows.
WORST_PATIENTS = 4


def figure_per_patient(
    patients: list[list[Any]],
    metrics: dict[str, Any],
    table: list[tuple[str, float, dict[str, Any]]],
    stage: str,
    path: Path,
) -> None:
    """``per_patient.png``: the Dice of each row of ``per_patient.csv`` with the mean, median
    and bootstrap interval of the mean as written to ``metrics.json`` (``metrics``); the
    options' row of ``table`` (the last) names the threshold and options."""
    name, threshold, _ = table[-1]
    summary = {
        "mean": metrics.get(f"{stage}/dice_per_patient"),
        "median": metrics.get(f"{stage}/dice_per_patient_median"),
        "ci_low": metrics.get(f"{stage}/dice_per_patient_ci95_low"),
        "ci_high": metrics.get(f"{stage}/dice_per_patient_ci95_high"),
    }
    options = "" if name == "baseline" else f", {name}"
    count = f"{len(patients)} patient" + ("" if len(patients) == 1 else "s")
    plot_per_patient(
        [r[0] for r in patients],
        [r[4] for r in patients],
        [r[2] == 0 for r in patients],
        summary,
        f"Per-patient Dice, stage={stage} ({count}, threshold {threshold:g}{options})",
        path,
    )


def worst_slices(
    scored: dict[int, Scored], patients: list[list[Any]], names: list[str], count: int
) -> list[tuple[int, int, float]]:
    """The ``count`` lowest-Dice patients of ``patients`` (``per_patient.csv``'s rows; ties
    in row order) with, for each, the position in its volume of the slice with the most
    wrong pixels (false positives + false negatives; ties: the most tumour, then the first):
    (patient id, slice position, the patient's Dice)."""
    ids = {name: i for i, name in enumerate(names)}
    worst = sorted(range(len(patients)), key=lambda k: patients[k][4])[:count]
    out = []
    for k in worst:
        pid = ids[patients[k][0]]
        item = scored[pid]
        truth = item.volume.truth.astype(bool)
        wrong = (item.pred != truth).reshape(len(truth), -1).sum(axis=1)
        area = truth.reshape(len(truth), -1).sum(axis=1)
        position = int(np.lexsort((-area, -wrong))[0])
        out.append((pid, position, float(patients[k][4])))
    return out


def figure_worst_patients(
    scored: dict[int, Scored],
    patients: list[list[Any]],
    names: list[str],
    datamodule: Any,
    path: Path,
) -> None:
    """``worst_patients.png``: for the lowest-Dice patients, the FLAIR channel of their slice
    with the most wrong pixels, at native resolution, with the masks as scored."""
    grays, truths, preds, titles = [], [], [], []
    for pid, position, dice in worst_slices(scored, patients, names, WORST_PATIENTS):
        item = scored[pid]
        image = np.asarray(datamodule.decoded.images[int(item.volume.rows[position])])
        truth, pred = item.volume.truth[position], item.pred[position]
        tp, fp, fn = error_counts(truth, pred)
        grays.append(image[..., FLAIR])
        truths.append(truth)
        preds.append(pred)
        titles.append(
            f"{names[pid]} slice {item.volume.numbers[position]}\n"
            f"patient Dice {dice:.3f}; TP {tp}, FP {fp}, FN {fn} px"
        )
    if grays:
        plot_error_slices(grays, truths, preds, titles, path)


def figure_threshold(
    curves: dict[tuple[str, Any], tuple[np.ndarray, np.ndarray]],
    tuned: dict[tuple[str, Any], tuple[float, float]],
    options: Any,
    reference: float,
    path: Path,
) -> None:
    """``threshold.png``: validation Dice against threshold for each tuned row (plain
    probabilities; those of the selected options), the chosen thresholds marked."""
    lines = []
    for (source, pp), (grid, dices) in sorted(curves.items(), key=lambda kv: kv[0][1] is not None):
        label = f"{source} probabilities" + (f", then {options.get('postprocess')}" if pp else "")
        lines.append((label, grid, dices, *tuned[(source, pp)]))
    plot_threshold_curves(
        lines, reference, "eval.threshold=auto: global Dice on the validation stage", path
    )


def _cell(value: Any) -> Any:
    return "" if value is None else value


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
