"""Recompute every metric of a checkpoint on a chosen split, without retraining.

    python -m tlunet.evaluate ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt \\
        [data.root=DIR] [data.split=patient|paper] [data.fold=i] [stage=test|val|train|all]

Writes into the evaluation directory: ``metrics.json`` (the run's metric names with the stage
prefix, plus ``hd95_per_patient``, ``volume_similarity_per_patient`` and per-patient detection),
``per_patient.csv`` (patient, slices, tumour pixels true/predicted, Dice, IoU, HD95 in pixels,
volume similarity) and ``per_slice.csv``. Model, preprocessing and split come from the
checkpoint; ``data.*`` values given on the command line replace the checkpoint's.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tlunet.cli import user_errors_exit
from tlunet.errors import ConfigError
from tlunet.metrics import SegmentationMetrics
from tlunet.postprocess import best_threshold, parse_postprocess, postprocess_volume
from tlunet.run import build_module
from tlunet.utils import csv_text, write_json_atomic, write_text_atomic
from tlunet.volume_metrics import dice_iou, hd95, volume_similarity

log = logging.getLogger(__name__)
#: What ``stage=`` may name: a stage of the split, or ``all`` (every slice of the data).
EVAL_STAGES = ("test", "val", "train", "all")


class PredictionCollector(pl.Callback):
    """Keeps every evaluated slice's probabilities (float32), truth (uint8) and identity; with
    ``tta=True`` also the average of the plain and the horizontally flipped prediction."""

    def __init__(self, tta: bool = False) -> None:
        self.tta = tta
        self.rows: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        probs = outputs["probs"][:, 0].float()
        tta = None
        if self.tta:
            with torch.no_grad():
                flipped = torch.sigmoid(pl_module(torch.flip(batch["image"], dims=[-1])).float())
            tta = ((probs + torch.flip(flipped[:, 0], dims=[-1])) / 2).cpu().numpy()
        probs = probs.cpu().numpy()
        truths = (batch["mask"][:, 0] > 0).cpu().numpy().astype(np.uint8)
        for i in range(len(probs)):
            self.rows.append(
                (
                    int(batch["patient"][i]),
                    int(batch["slice"][i]),
                    probs[i],
                    truths[i],
                    None if tta is None else tta[i],
                )
            )

    def volumes(self, tta: bool = False) -> dict[int, tuple[list[int], np.ndarray, np.ndarray]]:
        """patient id -> (slice numbers, probabilities (S, H, W), truth (S, H, W)), slice order."""
        by_patient: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for pid, number, probs, truth, tta_probs in self.rows:
            by_patient.setdefault(pid, []).append((number, tta_probs if tta else probs, truth))
        out = {}
        for pid, items in by_patient.items():
            items.sort(key=lambda t: t[0])
            out[pid] = (
                [t[0] for t in items],
                np.stack([t[1] for t in items]),
                np.stack([t[2] for t in items]),
            )
        return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A tlunet checkpoint, loaded without executing pickled code."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{path}' does not exist or is not a file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Cannot load checkpoint '{path}' safely (weights_only): {type(exc).__name__}: {exc}"
        ) from exc
    config = checkpoint.get("hyper_parameters", {}).get("config")
    if not config or "state_dict" not in checkpoint:
        raise ConfigError(f"'{path}' is not a tlunet checkpoint (no stored run config).")
    return checkpoint


def module_from_checkpoint(checkpoint: dict[str, Any], run_cfg: DictConfig | None = None) -> Any:
    """The trained LightningModule of ``checkpoint`` (built from its stored config), eval mode."""
    run_cfg = run_cfg or OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    run_cfg = run_cfg.copy()
    # The weights come from the checkpoint: never download encoder weights here.
    for key in ("encoder_weights", "encoder_weights_path"):
        if key in run_cfg.model.net:
            run_cfg.model.net[key] = None
    module = build_module(run_cfg, instantiate(run_cfg.model.net))
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise ConfigError(f"The checkpoint's weights do not match its own config: {exc}") from exc
    return module.eval()


def patient_tables(
    volumes: dict[int, tuple[list[int], np.ndarray, np.ndarray]], names: list[str]
) -> tuple[list[list[Any]], list[list[Any]], dict[str, float]]:
    """Per-patient and per-slice tables, and per-patient summary metrics, from binary
    prediction volumes ``patient id -> (slice numbers, prediction, truth)``."""
    patients, slices = [], []
    for pid in sorted(volumes, key=lambda p: names[p]):
        numbers, pred, truth = volumes[pid]
        pred, truth = pred.astype(bool), truth.astype(bool)
        dice, iou = dice_iou(pred, truth)
        patients.append(
            [
                names[pid],
                len(numbers),
                int(truth.sum()),
                int(pred.sum()),
                dice,
                iou,
                hd95(pred, truth),
                volume_similarity(pred, truth),
            ]
        )
        for k, number in enumerate(numbers):
            p, t = pred[k], truth[k]
            slices.append([names[pid], number, int(t.sum()), int(p.sum()), dice_iou(p, t)[0]])
    hd = [r[6] for r in patients if math.isfinite(r[6])]
    truth_any = np.array([r[2] > 0 for r in patients])
    pred_any = np.array([r[3] > 0 for r in patients])
    summary = {
        "hd95_per_patient": float(np.mean(hd)) if hd else float("nan"),
        "hd95_per_patient_median": float(np.median(hd)) if hd else float("nan"),
        "volume_similarity_per_patient": float(np.mean([r[7] for r in patients])),
        "detect_patient_sensitivity": float(pred_any[truth_any].mean())
        if truth_any.any()
        else float("nan"),
        "detect_patient_specificity": float((~pred_any[~truth_any]).mean())
        if (~truth_any).any()
        else float("nan"),
    }
    return patients, slices, summary


def binarise(
    volumes: dict[int, tuple[list[int], np.ndarray, np.ndarray]],
    threshold: float,
    postprocess: tuple[str, int] | None,
) -> dict[int, tuple[list[int], np.ndarray, np.ndarray]]:
    """Threshold probability volumes and post-process each patient's volume."""
    return {
        pid: (numbers, postprocess_volume(probs >= threshold, postprocess), truth)
        for pid, (numbers, probs, truth) in volumes.items()
    }


def volume_metrics(
    volumes: dict[int, tuple[list[int], np.ndarray, np.ndarray]], names: list[str]
) -> tuple[dict[str, float], list[list[Any]], list[list[Any]]]:
    """The whole metric vocabulary of binary prediction volumes, plus the per-patient tables."""
    metric = SegmentationMetrics(threshold=0.5)
    for pid, (_, pred, truth) in volumes.items():
        metric.update(
            torch.from_numpy(pred.astype(np.float32)),
            torch.from_numpy(truth.astype(np.float32)),
            torch.full((len(pred),), pid, dtype=torch.long),
        )
    values = metric.compute()
    patients, slices, summary = patient_tables(volumes, names)
    return {**values, **summary}, patients, slices


def _collect(trainer: pl.Trainer, module: Any, loader: Any, tta: bool) -> PredictionCollector:
    collector = PredictionCollector(tta)
    trainer.callbacks.append(collector)
    try:
        trainer.test(module, dataloaders=loader, verbose=False)
    finally:
        trainer.callbacks.remove(collector)
    return collector


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.stage``; write the files; return the metrics."""
    if not cfg.ckpt_path:
        raise ConfigError(
            "ckpt_path is not set: pass ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt"
        )
    if cfg.stage not in EVAL_STAGES:
        raise ConfigError(f"stage='{cfg.stage}' is unknown; choose one of {list(EVAL_STAGES)}.")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    for key, value in cfg.data.items():
        if value is not None:
            run_cfg.data[key] = value
    if cfg.data.fold is not None and not run_cfg.data.get("num_folds"):
        raise ConfigError(
            "data.fold needs data.num_folds (the checkpoint was not trained with folds)."
        )
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(run_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    if cfg.stage == "all":  # every slice of the data, without augmentation
        everything = copy.copy(datamodule.datasets["test"])
        everything.rows = np.arange(len(datamodule.records), dtype=np.int64)
        datamodule.datasets["all"] = everything
    if len(datamodule.datasets[cfg.stage]) == 0:
        raise ConfigError(f"The {cfg.stage} stage of this split is empty.")
    module = module_from_checkpoint(checkpoint, run_cfg)
    options = cfg.get("eval") or {}
    tta = options.get("tta")
    if tta not in (None, "flip"):
        raise ConfigError(f"eval.tta='{tta}' is unknown; use flip or null.")
    postprocess = parse_postprocess(options.get("postprocess"))
    threshold_option = options.get("threshold")
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="32-true",
    )
    datamodule.trainer = trainer  # data.pin_memory=null: pinned when evaluating on CUDA
    loader = datamodule.dataloader(cfg.stage, shuffle=False)
    collector = _collect(trainer, module, loader, tta == "flip")
    baseline = {**trainer.callback_metrics, **module.epoch_metrics["test"]}
    names = datamodule.patients
    plain = collector.volumes()

    threshold = module.threshold
    if threshold_option == "auto":
        # Chosen on the validation stage, never on the evaluated one.
        val = _collect(trainer, module, datamodule.dataloader("val"), tta == "flip")
        val_volumes = val.volumes(tta == "flip")
        threshold, val_dice = best_threshold(
            np.concatenate([v[1].ravel() for v in val_volumes.values()]),
            np.concatenate([v[2].ravel() for v in val_volumes.values()]),
        )
        log.info("eval.threshold=auto: %.2f (validation Dice %.4f)", threshold, val_dice)
    elif threshold_option is not None:
        threshold = float(threshold_option)
        if not 0 < threshold < 1:
            raise ConfigError(f"eval.threshold={threshold_option} must be in (0, 1) or auto.")

    # Every option alone, then all together: the effect of each is visible.
    flipped = collector.volumes(tta=True) if tta == "flip" else None
    variants = [("baseline", plain, module.threshold, None)]
    if flipped is not None:
        variants.append(("tta=flip", flipped, module.threshold, None))
    if postprocess is not None:
        variants.append(
            (f"postprocess={options.get('postprocess')}", plain, module.threshold, postprocess)
        )
    if threshold != module.threshold:
        variants.append((f"threshold={threshold:.2f}", plain, threshold, None))
    if len(variants) > 2:
        variants.append(
            ("all selected", plain if flipped is None else flipped, threshold, postprocess)
        )
    table = []
    for name, volumes, thr, pp in variants:
        values, patients, slices = volume_metrics(binarise(volumes, thr, pp), names)
        table.append((name, thr, values))
    # metrics.json, per_patient.csv, per_slice.csv: the selected options (the last variant).
    metrics = {f"{cfg.stage}/{k}": float(v) for k, v in table[-1][2].items()}
    metrics[f"{cfg.stage}/loss"] = float(baseline["test/loss"])  # the model's, without options
    if len(table) == 1:  # no option: exactly the run's own computation
        metrics |= {k.replace("test/", f"{cfg.stage}/", 1): float(v) for k, v in baseline.items()}
    columns = [
        "dice",
        "iou",
        "dice_per_patient",
        "dice_per_image",
        "hd95_per_patient",
        "volume_similarity_per_patient",
        "detect_accuracy",
    ]
    write_text_atomic(
        out_dir / "options.csv",
        csv_text(
            ["option", "threshold", *columns],
            [[name, thr, *[values[c] for c in columns]] for name, thr, values in table],
        ),
    )
    write_text_atomic(
        out_dir / "per_patient.csv",
        csv_text(
            [
                "patient",
                "slices",
                "tumour_pixels_true",
                "tumour_pixels_pred",
                "dice",
                "iou",
                "hd95_px",
                "volume_similarity",
            ],
            patients,
        ),
    )
    write_text_atomic(
        out_dir / "per_slice.csv",
        csv_text(["patient", "slice", "tumour_pixels_true", "tumour_pixels_pred", "dice"], slices),
    )
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("Evaluation of %s on %s written to %s", cfg.ckpt_path, cfg.stage, out_dir)
    print(f"Evaluation written to {out_dir}: metrics.json, per_patient.csv, per_slice.csv")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
