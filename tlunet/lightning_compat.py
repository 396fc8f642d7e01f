"""Every place tlunet relies on Lightning's private internals, in one module.

Tested with pytorch-lightning 2.6 (2.6.6); ``pyproject.toml`` bounds the dependency to 2.6.x.
A new Lightning release needs these checked, and only these:

- :class:`AppendingCSVWriter` subclasses ``ExperimentWriter`` and uses its ``_fs``,
  ``metrics_keys``, ``metrics``, ``metrics_file_path`` and ``_record_new_keys()``;
  :class:`CSVLogger` overrides ``experiment`` with ``_experiment``, ``_fs`` and ``root_dir``.
- :func:`epochs_processed` reads ``trainer.fit_loop.epoch_progress``.
- :func:`extra_callback` adds a callback to ``trainer.callbacks`` for one call.
- :class:`ModelCheckpoint` calls ``_should_skip_saving_checkpoint``,
  ``_should_save_on_train_epoch_end``, ``_monitor_candidates`` and ``_save_last_checkpoint``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from tlunet.utils import WRITE_ERRNOS, write_error, write_text_atomic


def epochs_processed(trainer: pl.Trainer) -> int:
    """Training epochs the trainer has finished (restored from the checkpoint on resume)."""
    return trainer.fit_loop.epoch_progress.current.processed


@contextmanager
def extra_callback(trainer: pl.Trainer, callback: pl.Callback) -> Iterator[pl.Callback]:
    """``callback`` takes part in the trainer's calls made inside the block, then leaves."""
    trainer.callbacks.append(callback)
    try:
        yield callback
    finally:
        trainer.callbacks.remove(callback)


class AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is continued, not deleted, and a
    process killed while saving never loses the rows already saved: Lightning's writer
    truncates the file and writes it again whenever a new column appears (at the first
    validation, the first train epoch...), so a kill in between left it empty. Here a new
    header rewrites the file through a temporary file and a rename, and new rows are appended
    in one ``write``."""

    _header: list[str] | None = None  # the columns of the file on disk

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))
            self._header = list(self.metrics_keys)

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        exists = path.is_file()
        self._record_new_keys()
        # Against the file's own header, not whether this call saw new keys: a save stopped
        # while rewriting the file (Ctrl-C, a full disk) leaves its header as it was.
        if not exists or self.metrics_keys != self._header:
            rows: list[dict[str, Any]] = []
            if exists:
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
            write_text_atomic(path, csv_rows(self.metrics_keys, rows + self.metrics, header=True))
            self._header = list(self.metrics_keys)
        else:
            data = csv_rows(self.metrics_keys, self.metrics, header=False).encode()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            complete = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data) :]
            except OSError as exc:  # no half row: the log ends with its last complete row
                os.ftruncate(fd, complete)
                if exc.errno in WRITE_ERRNOS:
                    raise write_error(path, exc, "its rows before this epoch are intact") from exc
                raise
            finally:
                os.close(fd)
        self.metrics = []


def csv_rows(fieldnames: list[str], rows: list[dict[str, Any]], header: bool) -> str:
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
            self._experiment = AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``save_last=True`` writing ``last.ckpt`` after
    every epoch's validation again. Lightning 2.6 writes it only when a top-k checkpoint was
    saved at the same step, so ``last.ckpt`` was the last *improved* epoch: a run stopped
    after epochs without improvement resumed from before them, and lost them. Same class name,
    so checkpoints of either class resume with the other."""

    def _save_last_too(self, trainer: pl.Trainer, on_train_epoch_end: bool) -> None:
        if (
            self.save_last is True
            and not self._should_skip_saving_checkpoint(trainer)  # nothing saved at this step
            and self._should_save_on_train_epoch_end(trainer) == on_train_epoch_end
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_too(trainer, on_train_epoch_end=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_too(trainer, on_train_epoch_end=False)
