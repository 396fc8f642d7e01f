"""The file contract: the names of the files one tlunet command writes and another reads, the
columns of its tables, and where the checkpoint keeps tlunet's own record. One place for
them, so that a writer and its readers cannot drift apart; a file's older forms are upgraded
when it is read (:func:`patient_counts`; a checkpoint's config: :func:`tlunet.checkpoint.
upgrade_config`).

A run folder (``tlunet.train``): :data:`RUN_CONFIG_FILE`, :data:`RUN_INFO_FILE`, :data:`METRICS_FILE` (written
last: a run holding it is complete), ``checkpoints/``, ``csv/metrics.csv``. An evaluation folder
(``tlunet.evaluate``): :data:`METRICS_FILE`, :data:`EVALUATION_FILE`, :data:`PER_PATIENT_FILE`,
:data:`PER_SLICE_FILE`, :data:`OPTIONS_FILE`. A sweep job's folder: :data:`JOB_STATUS_FILE`; the sweep's:
:data:`FAILED_JOBS_FILE`. A checkpoint: its ``hyper_parameters["config"]`` (the run's config) and
:data:`CHECKPOINT_SECTION` (version, preprocessing, precision, patients, scoring). An export:
its sidecar (:data:`tlunet.predict_onnx.SIDECAR_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: A training run's resolved config (what ``resume=`` continues, what the report reads).
RUN_CONFIG_FILE = "config.yaml"
#: What a run trained, on what, how long and from where (``tlunet.run.write_results``).
RUN_INFO_FILE = "run.json"
#: A run's test metrics, or an evaluation's metrics; a run holding it is complete.
METRICS_FILE = "metrics.json"
#: What an evaluation scored and how (checkpoint, stage, options, seen patients).
EVALUATION_FILE = "evaluation.json"
#: An evaluation's tables: one row per patient, per slice, per option.
PER_PATIENT_FILE = "per_patient.csv"
PER_SLICE_FILE = "per_slice.csv"
OPTIONS_FILE = "options.csv"
#: A sweep job's state (running, completed, failed with its reason), and the sweep's list.
JOB_STATUS_FILE = "job_status.json"
FAILED_JOBS_FILE = "failed_jobs.txt"
#: The checkpoint's key for tlunet's record of the run (beside Lightning's own keys).
CHECKPOINT_SECTION = "tlunet"

#: per_patient.csv's confusion counts over the patient's native-resolution pixels (true
#: positives, false positives, false negatives): a global Dice over any set of patients is
#: computed from them exactly.
PATIENT_COUNT_COLUMNS = ("tp_pixels", "fp_pixels", "fn_pixels")
#: per_patient.csv's columns, in order.
PER_PATIENT_COLUMNS = (
    "patient",
    "slices",
    "tumour_pixels_true",
    "tumour_pixels_pred",
    "dice",
    "iou",
    "hd95_px",
    "volume_similarity",
    "detected",
    *PATIENT_COUNT_COLUMNS,
)
#: per_slice.csv's columns, in order.
PER_SLICE_COLUMNS = ("patient", "slice", "tumour_pixels_true", "tumour_pixels_pred", "dice")


def checkpoint_section(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """tlunet's record in a loaded checkpoint (empty for a checkpoint without one)."""
    return dict(checkpoint.get(CHECKPOINT_SECTION) or {})


def patient_counts(rows: Sequence[Mapping[str, str]]) -> tuple[list[float], ...]:
    """``(tp, fp, fn)`` per row of a per_patient.csv read with ``csv.DictReader``. A table
    written before it held the counts (tlunet 0.3.0) has them rebuilt from the rounded Dice and
    the pixel counts (Dice = 2 TP / (true + predicted)), rounded to whole pixels."""
    if all(r.get("tp_pixels") not in (None, "") for r in rows):
        return tuple([float(r[k]) for r in rows] for k in PATIENT_COUNT_COLUMNS)
    tp, fp, fn = [], [], []
    for r in rows:
        true, pred = float(r["tumour_pixels_true"]), float(r["tumour_pixels_pred"])
        positives = float(round(float(r["dice"]) * (true + pred) / 2))
        tp.append(positives)
        fp.append(pred - positives)
        fn.append(true - positives)
    return tp, fp, fn
