"""The LightningModule: loss, optimisation and metric bookkeeping around any network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import tlunet
from tlunet.metrics import SegmentationMetrics, prefixed

STAGES = ("train", "val", "test")


class SegmentationModule(pl.LightningModule):
    """Train/validate/test a binary segmentation network.

    Args:
        net: maps images (N, 3, H, W) to logits (N, 1, H, W).
        loss: ``loss(logits, target)`` with target (N, 1, H, W) in {0, 1}.
        optimizer: partial taking ``params`` (e.g. ``Adam`` with its lr), from the config.
        scheduler: partial taking ``optimizer`` (e.g. ``ReduceLROnPlateau``), or ``None``.
        monitor: the logged metric the scheduler follows (e.g. ``val/dice_per_patient``).
        threshold: probability at or above which a pixel is tumour.
        run_config: the run's composed config, stored in checkpoints so they are self-describing.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/dice_per_patient",
        threshold: float = 0.5,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(run_config, DictConfig):  # plain containers load with weights_only=True
            run_config = OmegaConf.to_container(run_config, resolve=True)
        self.save_hyperparameters(
            {"threshold": threshold, "monitor": monitor, "config": run_config or {}}, logger=False
        )
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.monitor = monitor
        self.threshold = threshold
        #: The last computed metrics of each stage, full precision (``{"val/dice": ...}``).
        self.epoch_metrics: dict[str, dict[str, float]] = {}
        # Keys carry a suffix: "train" would clash with nn.Module.train.
        self.metrics = nn.ModuleDict(
            {f"{s}_metrics": SegmentationMetrics(threshold=threshold) for s in STAGES}
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for images (N, 3, H, W)."""
        return self.net(images)

    def _step(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"]).float()
        loss = self.loss(logits, batch["mask"])
        probs = torch.sigmoid(logits)
        self.metrics[f"{stage}_metrics"].update(probs.detach(), batch["mask"], batch["patient"])
        self.log(
            f"{stage}/loss",
            loss,
            on_epoch=True,
            on_step=False,
            batch_size=len(logits),
            sync_dist=True,
        )
        if stage == "train":
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss, probs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"probs": self._step(batch, "test")[1]}

    def _log_metrics(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_metrics"]
        if not metric.update_called:
            return
        values = prefixed(metric.compute(), stage)
        metric.reset()
        self.epoch_metrics[stage] = values
        # Values are already reduced across processes by torchmetrics: no sync_dist.
        for name, value in values.items():
            self.log(name, value, prog_bar=name == self.monitor)

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer=optimizer),
                "monitor": self.monitor,
                "interval": "epoch",
                "frequency": 1,
                # Epochs without validation (check_val_every_n_epoch > 1) skip the step.
                "strict": False,
            },
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        checkpoint["tlunet"] = {
            "version": tlunet.__version__,
            "preprocessing": getattr(datamodule, "preprocessing", None),
        }
