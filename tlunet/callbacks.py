"""tlunet's own Lightning extensions: callbacks, an atomic checkpoint writer, a resumable
CSV logger (``CSVLogger``, defined with Lightning's private parts in
:mod:`tlunet.lightning_compat`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from tlunet.lightning_compat import (  # noqa: F401  (CSVLogger, ModelCheckpoint: conf/)
    CSVLogger,
    ModelCheckpoint,
    csv_rows,
)
from tlunet.scoring import native_mask_tensor
from tlunet.utils import atomic_path, write_text_atomic
from tlunet.viz import denormalize, plot_predictions

log = logging.getLogger(__name__)


class PredictionFigure(pl.Callback):
    """Draw test slices with and without tumour into ``path`` - the paper's Fig. 5: each slice
    beside its FLAIR channel with the prediction's true positives, false positives and false
    negatives in colour (:func:`tlunet.viz.overlay_errors`).

    Tumour rows show, for up to ``per_class`` patients, the slice with the largest true tumour
    area; tumour-free rows show, for up to ``per_class`` patients, the brightest tumour-free
    slice (the most brain in view). One row per patient is kept in memory. Where the batch has
    the masks at native resolution (``mask_native``) and the datamodule its decoded slices,
    the slice, mask and prediction are those scored: native size, probabilities resized then
    thresholded (:func:`tlunet.scoring.native_mask_tensor`); otherwise the network's input.
    A failure to draw logs a warning: it never costs the run its test metrics.
    """

    def __init__(self, path: str, per_class: int = 3) -> None:
        self.path = Path(path)
        self.per_class = per_class
        self._tumour: dict[int, tuple[float, tuple]] = {}
        self._free: dict[int, tuple[float, tuple]] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tumour, self._free = {}, {}

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "probs" not in outputs:
            return
        decoded = getattr(getattr(trainer, "datamodule", None), "decoded", None)
        native = "mask_native" in batch and "row" in batch and decoded is not None
        if native:
            masks = batch["mask_native"][:, 0].cpu().numpy() > 0
            preds = native_mask_tensor(
                outputs["probs"].cpu(), masks.shape[-2:], pl_module.threshold
            )
            preds = preds[:, 0].numpy()
        else:
            masks = batch["mask"][:, 0].cpu().numpy() > 0
            preds = outputs["probs"][:, 0].float().cpu().numpy() >= pl_module.threshold
        for i in range(len(masks)):
            pid = int(batch["patient"][i])
            area = float(masks[i].sum())
            if native:  # (H, W, 3) uint8 as on disk
                image = np.array(decoded.images[int(batch["row"][i])])
                brightness = float(image.mean()) / 255.0
            else:  # (3, S, S) normalised
                image = batch["image"][i].float().cpu().numpy()
                brightness = float(image.mean())
            row = (image, masks[i], preds[i], pid, int(batch["slice"][i]), native)
            kept, score = (self._tumour, area) if area > 0 else (self._free, brightness)
            if pid not in kept or score > kept[pid][0]:
                kept[pid] = (score, row)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        tumour = [row for _, row in self._tumour.values()][: self.per_class]
        free = [row for _, row in self._free.values()][: self.per_class]
        rows = tumour + free
        self._tumour, self._free = {}, {}
        if not rows:
            return
        try:
            self._draw(trainer, rows)
        except Exception as exc:  # a figure must never cost the run its results
            log.warning("Could not draw the prediction figure %s: %s", self.path, exc)
            return
        log.info("Prediction figure written to %s", self.path)

    def _draw(self, trainer: pl.Trainer, rows: list[tuple]) -> None:
        datamodule = trainer.datamodule
        pre = getattr(datamodule, "preprocessing", {"mean": (0, 0, 0), "std": (1, 1, 1)})
        patients = getattr(datamodule, "patients", None)
        if rows[0][5]:
            images = np.stack([r[0] for r in rows])
        else:
            images = denormalize(np.stack([r[0] for r in rows]), pre["mean"], pre["std"])
        titles = [f"{patients[r[3]] if patients else f'patient {r[3]}'} slice {r[4]}" for r in rows]
        truths = np.stack([r[1] for r in rows]).astype(np.uint8)
        preds = np.stack([r[2] for r in rows]).astype(np.uint8)
        plot_predictions(images, truths, preds, titles, self.path)


def checkpoint_intact(path: Path) -> str:
    """What is intact when writing the checkpoint ``path`` failed, and how to go on: the run
    continues from its ``last.ckpt`` (kept complete by the atomic write) with
    ``resume=<run dir>``; without one (the first epoch's) the run has to start again."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    last = path.parent / "last.ckpt"
    if last.is_file() and run_dir is not None:
        return (
            f"the last complete checkpoint '{last}' is intact; once the disk can be written "
            f"again (space freed, folder writable), continue with resume={run_dir}"
        )
    others = sorted(p for p in path.parent.glob("*.ckpt") if p.is_file())
    if others:
        return (
            f"'{others[0]}' is intact, but no last.ckpt exists yet to resume from: start the "
            "run again once the disk can be written"
        )
    return "no checkpoint of this run was written yet (its inputs are intact)"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place: a run killed
    while saving leaves the previous ``last.ckpt`` intact, never a truncated one. A write that
    fails for the disk's sake (no space, a file size limit, a read-only folder) raises
    :class:`tlunet.errors.WriteError` naming the checkpoint and the last complete one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        with atomic_path(path, checkpoint_intact(path)) as tmp:
            try:
                super().save_checkpoint(checkpoint, tmp, storage_options)
            except RuntimeError as exc:  # torch's zip writer: "file write failed", no errno
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, OSError):
                    raise cause from exc
                raise


def truncate_metrics_csv(path: Path, last_epoch: int, global_step: int) -> None:
    """Drop the rows of ``metrics.csv`` logged after a checkpoint taken at the end of epoch
    ``last_epoch`` (step ``global_step``): those of the killed run's unfinished epoch, which the
    resumed run logs again. Rows without an epoch (the learning rate, logged as an epoch
    starts) are kept when they precede ``global_step``."""
    if not path.is_file():
        return

    def kept(row: dict[str, str]) -> bool:
        if row.get("epoch"):
            return float(row["epoch"]) <= last_epoch
        return not row.get("step") or float(row["step"]) < global_step

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fieldnames = list(reader.fieldnames or [])
        rows = [r for r in reader if kept(r)]
    write_text_atomic(path, csv_rows(fieldnames, rows, header=True))
