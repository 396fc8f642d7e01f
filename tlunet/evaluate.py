"""Recompute every metric of a checkpoint on a chosen split, without retraining.

    python -m tlunet.evaluate ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt \\
        [data.root=DIR] [data.split=patient|paper] [data.fold=i] [stage=test|val|train]

Writes into the evaluation directory: ``metrics.json`` (the run's metric names with the stage
prefix, plus ``hd95_per_patient``, ``volume_similarity_per_patient`` and per-patient detection),
``per_patient.csv`` (patient, slices, tumour pixels true/predicted, Dice, IoU, HD95 in pixels,
volume similarity) and ``per_slice.csv``. Model, preprocessing and split come from the
checkpoint; ``data.*`` values given on the command line replace the checkpoint's.
"""

from __future__ import annotations

import csv
import io
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
from tlunet.run import build_module
from tlunet.utils import write_json_atomic, write_text_atomic
from tlunet.volume_metrics import dice_iou, hd95, volume_similarity

log = logging.getLogger(__name__)


class PredictionCollector(pl.Callback):
    """Keeps every evaluated slice's binary prediction and truth (uint8) with its identity."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, np.ndarray, np.ndarray]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        preds = (outputs["probs"][:, 0] >= pl_module.threshold).cpu().numpy().astype(np.uint8)
        truths = (batch["mask"][:, 0] > 0).cpu().numpy().astype(np.uint8)
        for i in range(len(preds)):
            self.rows.append(
                (int(batch["patient"][i]), int(batch["slice"][i]), preds[i], truths[i])
            )


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


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def patient_tables(
    rows: list[tuple[int, int, np.ndarray, np.ndarray]], names: list[str]
) -> tuple[list[list[Any]], list[list[Any]], dict[str, float]]:
    """Per-patient and per-slice tables, and per-patient summary metrics."""
    by_patient: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for pid, number, pred, truth in rows:
        by_patient.setdefault(pid, []).append((number, pred, truth))
    patients, slices = [], []
    for pid in sorted(by_patient, key=lambda p: names[p]):
        items = sorted(by_patient[pid], key=lambda t: t[0])
        pred = np.stack([t[1] for t in items]).astype(bool)
        truth = np.stack([t[2] for t in items]).astype(bool)
        dice, iou = dice_iou(pred, truth)
        patients.append(
            [
                names[pid],
                len(items),
                int(truth.sum()),
                int(pred.sum()),
                dice,
                iou,
                hd95(pred, truth),
                volume_similarity(pred, truth),
            ]
        )
        for number, p, t in items:
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


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.stage``; write the files; return the metrics."""
    if not cfg.ckpt_path:
        raise ConfigError(
            "ckpt_path is not set: pass ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt"
        )
    if cfg.stage not in ("train", "val", "test"):
        raise ConfigError(f"stage='{cfg.stage}' is unknown; choose test, val or train.")
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
    if len(datamodule.datasets[cfg.stage]) == 0:
        raise ConfigError(f"The {cfg.stage} stage of this split is empty.")
    module = module_from_checkpoint(checkpoint, run_cfg)
    collector = PredictionCollector()
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        logger=False,
        callbacks=[collector],
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="32-true",
    )
    loader = datamodule.dataloader(cfg.stage, shuffle=False)
    results = trainer.test(module, dataloaders=loader, verbose=False)
    values = {**results[0], **module.epoch_metrics["test"]}
    metrics = {k.replace("test/", f"{cfg.stage}/", 1): float(v) for k, v in values.items()}
    patients, slices, summary = patient_tables(collector.rows, datamodule.patients)
    metrics |= {f"{cfg.stage}/{k}": v for k, v in summary.items()}
    write_text_atomic(
        out_dir / "per_patient.csv",
        _csv(
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
        _csv(["patient", "slice", "tumour_pixels_true", "tumour_pixels_pred", "dice"], slices),
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
