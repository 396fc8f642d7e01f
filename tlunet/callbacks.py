"""tlunet's own Lightning callbacks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from tlunet.viz import denormalize, plot_predictions

log = logging.getLogger(__name__)


class PredictionFigure(pl.Callback):
    """During testing, keep the first ``per_class`` slices with tumour and without, then draw
    them (slice, true mask, predicted mask) into ``path`` - the paper's Fig. 5."""

    def __init__(self, path: str, per_class: int = 3) -> None:
        self.path = Path(path)
        self.per_class = per_class
        self._rows: dict[bool, list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = {True: [], False: []}

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
        if all(len(v) >= self.per_class for v in self._rows.values()):
            return
        masks = batch["mask"][:, 0].cpu().numpy() > 0
        preds = outputs["probs"][:, 0].float().cpu().numpy() >= pl_module.threshold
        datamodule = trainer.datamodule
        patients = getattr(datamodule, "patients", None)
        for i in range(len(masks)):
            rows = self._rows[bool(masks[i].any())]
            if len(rows) >= self.per_class:
                continue
            image = batch["image"][i : i + 1].float().cpu().numpy()
            pre = getattr(datamodule, "preprocessing", {"mean": (0, 0, 0), "std": (1, 1, 1)})
            shown = denormalize(image, pre["mean"], pre["std"])[0]
            pid = int(batch["patient"][i])
            name = patients[pid] if patients else f"patient {pid}"
            title = f"{name} slice {int(batch['slice'][i])}"
            rows.append((shown, masks[i].astype(np.uint8), preds[i].astype(np.uint8), title))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self._rows[True] + self._rows[False]
        if not rows or not trainer.is_global_zero:
            return
        images, truths, preds, titles = zip(*rows, strict=True)
        plot_predictions(np.stack(images), np.stack(truths), np.stack(preds), titles, self.path)
        log.info("Prediction figure written to %s", self.path)
