"""tlunet's own Lightning extensions: callbacks, an atomic checkpoint writer, a resumable
CSV logger."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from tlunet.utils import write_text_atomic
from tlunet.viz import denormalize, plot_predictions

log = logging.getLogger(__name__)


class PredictionFigure(pl.Callback):
    """Draw test slices with and without tumour (slice, true mask, predicted mask) into
    ``path`` - the paper's Fig. 5.

    Tumour rows show, for up to ``per_class`` patients, the slice with the largest true tumour
    area; tumour-free rows show, for up to ``per_class`` patients, the brightest tumour-free
    slice (the most brain in view). One row per patient is kept in memory.
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
        masks = batch["mask"][:, 0].cpu().numpy() > 0
        preds = outputs["probs"][:, 0].float().cpu().numpy() >= pl_module.threshold
        for i in range(len(masks)):
            pid = int(batch["patient"][i])
            area = float(masks[i].sum())
            row = (
                batch["image"][i].float().cpu().numpy(),
                masks[i],
                preds[i],
                pid,
                int(batch["slice"][i]),
            )
            kept, score = (self._tumour, area) if area > 0 else (self._free, float(row[0].mean()))
            if pid not in kept or score > kept[pid][0]:
                kept[pid] = (score, row)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        tumour = [row for _, row in self._tumour.values()][: self.per_class]
        free = [row for _, row in self._free.values()][: self.per_class]
        rows = tumour + free
        if not rows:
            return
        datamodule = trainer.datamodule
        pre = getattr(datamodule, "preprocessing", {"mean": (0, 0, 0), "std": (1, 1, 1)})
        patients = getattr(datamodule, "patients", None)
        images = denormalize(np.stack([r[0] for r in rows]), pre["mean"], pre["std"])
        titles = [f"{patients[r[3]] if patients else f'patient {r[3]}'} slice {r[4]}" for r in rows]
        truths = np.stack([r[1] for r in rows]).astype(np.uint8)
        preds = np.stack([r[2] for r in rows]).astype(np.uint8)
        plot_predictions(images, truths, preds, titles, self.path)
        self._tumour, self._free = {}, {}
        log.info("Prediction figure written to %s", self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place: a run killed
    while saving leaves the previous ``last.ckpt`` intact, never a truncated one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # on disk before it replaces the previous checkpoint
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted, and a
    process killed while saving never loses the rows already saved: Lightning's writer
    truncates the file and writes it again whenever a new column appears (at the first
    validation, the first train epoch...), so a kill in between left it empty. Here a new
    header rewrites the file through a temporary file and a rename, and new rows are appended
    in one ``write``."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        exists = path.is_file()
        if self._record_new_keys() or not exists:
            rows: list[dict[str, Any]] = []
            if exists:
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
            write_text_atomic(path, _csv_rows(self.metrics_keys, rows + self.metrics, header=True))
        else:
            data = _csv_rows(self.metrics_keys, self.metrics, header=False).encode()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                while data:
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
        self.metrics = []


def _csv_rows(fieldnames: list[str], rows: list[dict[str, Any]], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class CSVLogger(pl.loggers.CSVLogger):
    """``csv/metrics.csv``, continued across a resumed run (``resume=DIR``)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
    write_text_atomic(path, _csv_rows(fieldnames, rows, header=True))
