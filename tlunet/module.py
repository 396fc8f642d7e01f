"""The LightningModule: loss, optimisation and metric bookkeeping around any network."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchmetrics
from omegaconf import DictConfig, OmegaConf
from torch import nn

import tlunet
from tlunet.artifacts import CHECKPOINT_SECTION, checkpoint_section
from tlunet.data.fingerprint import FINGERPRINT
from tlunet.errors import ConfigError
from tlunet.metrics import SegmentationMetrics, prefixed
from tlunet.models.aux_head import split_outputs, upgrade_state_dict
from tlunet.models.runtime import network_input, prepare_network, probabilities
from tlunet.scoring import to_native

STAGES = ("train", "val", "test")
#: The loss terms logged per stage (``loss_seg`` and ``loss_aux`` only with the aux head).
LOSS_TERMS = ("loss", "loss_seg", "loss_aux")


class SegmentationModule(pl.LightningModule):
    """Train/validate/test a binary segmentation network.

    Built by one ``hydra.utils.instantiate`` of the run config's ``module`` node (network,
    loss, optimiser and scheduler partials included; ``tlunet.builders.build_module``).

    Args:
        net: maps images (N, 3, H, W) to logits (N, 1, H, W), or, with the paper's aux head
            (:class:`tlunet.models.aux_head.SegmentationWithAux`), to ``(logits, label
            logits (N, 2))``. The head's cross-entropy, times ``aux_loss_weight``, is then
            added to the loss, and its probability (>= 0.5) drives ``detect_*`` in every stage
            and in ``tlunet.evaluate`` (without a head: "the predicted mask is non-empty").
        loss: ``loss(logits, target)`` with target (N, 1, H, W) in {0, 1}.
        optimizer: partial taking ``params`` (e.g. ``Adam`` with its lr), from the config.
        scheduler: partial taking ``optimizer`` (e.g. ``ReduceLROnPlateau``), or ``None``.
        monitor: the logged metric the scheduler follows (e.g. ``val/dice_per_patient``).
        threshold: probability at or above which a pixel is tumour.
        per_patient: compute per-patient metrics (``False`` under ``split=paper``, where a
            stage holds a few scattered slices of each patient: they are then ``None``).
        aux_loss_weight: weight of the aux head's cross-entropy (unused without a head).

    Scoring: validation and test batches carry ``mask_native``, the masks at the resolution
    of the files on disk; their metrics are computed on the probabilities resized to it
    (:func:`tlunet.scoring.to_native`), the path ``tlunet.predict`` takes. Training metrics
    and every loss are at the network's resolution (augmented training slices have no native
    mask).
        freeze_encoder: keep ``net.encoder`` frozen (no gradient, BatchNorm statistics fixed)...
        unfreeze_at_epoch: ...until this epoch (0-based); ``None``: for the whole run.
        channels_last: keep ``net``'s weights and its input batches in channels-last memory
            format (faster convolutions on recent GPUs and some CPUs; ``make bench`` tells).
        compile: ``torch.compile`` the network: ``True``, or a dict of ``torch.compile``
            arguments (``{"mode": "max-autotune"}``, ``{"backend": "eager"}``). The state dict
            keeps its names, so checkpoints load with or without it.
        run_config: the run's composed config, stored in checkpoints so they are self-describing
            (:meth:`set_run_config` sets it after the instantiation).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/dice_per_patient",
        threshold: float = 0.5,
        per_patient: bool = True,
        run_config: dict[str, Any] | None = None,
        aux_loss_weight: float = 0.2,
        freeze_encoder: bool = False,
        unfreeze_at_epoch: int | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self._train_time_before = 0.0  # fit() seconds of the runs this one resumed
        self._fit_started: float | None = None  # perf_counter() at this process's fit() start
        self.save_hyperparameters({"threshold": threshold, "monitor": monitor}, logger=False)
        self.set_run_config(run_config)
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.monitor = monitor
        self.threshold = threshold
        self.per_patient = bool(per_patient)
        #: Whether ``net`` carries the image-level aux head (returns label logits too).
        self.has_aux = getattr(net, "aux_head", None) is not None
        self.aux_loss_weight = float(aux_loss_weight)
        self.freeze_encoder = freeze_encoder
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self._encoder_frozen = False
        if freeze_encoder:
            if getattr(net, "encoder", None) is None:
                raise ConfigError(
                    f"model.freeze_encoder=true: the network {type(net).__name__} has no "
                    ".encoder to freeze."
                )
            self.set_encoder_frozen(True)
        #: The last computed metrics of each stage, full precision (``{"val/dice": ...}``).
        self.epoch_metrics: dict[str, dict[str, float]] = {}
        # Keys carry a suffix: "train" would clash with nn.Module.train.
        self.metrics = nn.ModuleDict(
            {
                f"{s}_metrics": SegmentationMetrics(threshold=threshold, per_patient=per_patient)
                for s in STAGES
            }
        )
        # Epoch means of the loss terms, reduced across processes in the epoch-end hooks
        # together with the metrics (not by self.log(sync_dist=True), whose reduction happens
        # whenever a rank first reads the value: rank 0's progress bar reads it before
        # on_train_epoch_end, the other ranks after it, and the collectives then deadlock).
        self.loss_means = nn.ModuleDict(
            {
                f"{s}_{t}": torchmetrics.MeanMetric(nan_strategy="disable")  # NaN shows as NaN
                for s in STAGES
                for t in LOSS_TERMS
            }
        )
        self.channels_last = bool(channels_last)
        prepare_network(self.net, self.channels_last, compile)

    def set_run_config(self, run_config: dict[str, Any] | DictConfig | None) -> None:
        """Store the run's composed config in the hyperparameters (and so in checkpoints)."""
        if isinstance(run_config, DictConfig):  # plain containers load with weights_only=True
            run_config = OmegaConf.to_container(run_config, resolve=True)
        self.hparams["config"] = run_config or {}

    @property
    def detect_source(self) -> str:
        """What ``detect_*`` are computed from: ``aux_head`` or ``mask`` (predicted non-empty)."""
        return "aux_head" if self.has_aux else "mask"

    def forward(self, images: torch.Tensor) -> Any:
        """The network's output for images (N, 3, H, W): logits (N, 1, H, W), or with the aux
        head ``(logits, label logits (N, 2))``."""
        return self.net(network_input(images, self.channels_last))

    # -- encoder freezing -----------------------------------------------------------------

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze (no gradients, eval-mode BatchNorm/dropout) or unfreeze ``net.encoder``."""
        encoder = self.net.encoder
        for p in encoder.parameters():
            p.requires_grad_(not frozen)
        self._encoder_frozen = frozen
        encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> SegmentationModule:
        super().train(mode)
        if mode and self._encoder_frozen:
            self.net.encoder.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def apply_freeze_schedule(self, epoch: int) -> None:
        """Frozen while ``freeze_encoder`` and ``epoch < unfreeze_at_epoch`` (or no unfreeze)."""
        if not self.freeze_encoder:
            return
        frozen = self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch
        if frozen != self._encoder_frozen:
            self.set_encoder_frozen(frozen)

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()
        if (
            self.freeze_encoder
            and self.unfreeze_at_epoch is not None
            and self.trainer.world_size > 1
        ):
            # DDP leaves parameters without requires_grad out of gradient synchronisation for
            # good: unfrozen encoders would drift apart between processes.
            raise ConfigError(
                "model.unfreeze_at_epoch is not supported with more than one process; "
                "freeze for the whole run or train on one device."
            )

    def on_train_epoch_start(self) -> None:
        self.apply_freeze_schedule(self.current_epoch)

    # -- steps ----------------------------------------------------------------------------
    def compute_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Forward pass and loss: (total loss, logits, loss terms, tumour probability or None)."""
        logits, aux_logits = split_outputs(self(batch["image"]))
        logits = logits.float()
        seg_loss = self.loss(logits, batch["mask"])
        if aux_logits is None:
            return seg_loss, logits, {}, None
        aux_logits = aux_logits.float()
        label = (batch["mask"].flatten(1).amax(dim=1) > 0).long()
        aux_loss = nn.functional.cross_entropy(aux_logits, label)
        total = seg_loss + self.aux_loss_weight * aux_loss
        detect_prob = torch.softmax(aux_logits, dim=1)[:, 1]
        return total, logits, {"loss_seg": seg_loss, "loss_aux": aux_loss}, detect_prob

    def _step(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        loss, logits, terms, detect_prob = self.compute_loss(batch)
        probs = torch.sigmoid(logits)
        truth = batch.get("mask_native")
        if truth is None:  # training: the augmented slice at the network's resolution
            scored, truth = probs.detach(), batch["mask"]
        else:
            scored = to_native(probs.detach(), truth.shape[-2:])
        self.metrics[f"{stage}_metrics"].update(
            scored,
            truth,
            batch["patient"],
            None if detect_prob is None else detect_prob.detach(),
            # Unique slice ids: the metric drops the slices DDP's sampler repeats as padding.
            rows=batch.get("row"),
        )
        for name, value in {"loss": loss, **terms}.items():
            self.loss_means[f"{stage}_{name}"].update(value.detach().float(), weight=len(logits))
        if stage == "train":
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss, probs, detect_prob

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Probabilities (N, 1, S, S) at the network's resolution, and the aux head's
        tumour probability (N,) or ``None``, for callbacks (figures, ``tlunet.evaluate``)."""
        _, probs, detect_prob = self._step(batch, "test")
        return {"probs": probs, "detect_prob": detect_prob}

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tumour probabilities (N, 1, S, S) and the aux head's slice probability (N,) (or
        ``None`` without a head) for normalised images (N, 3, S, S)."""
        return probabilities(self(images))

    def _log_metrics(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_metrics"]
        if not metric.update_called:
            return
        values = prefixed(metric.compute(), stage)
        metric.reset()
        for term in LOSS_TERMS:
            mean = self.loss_means[f"{stage}_{term}"]
            if mean.update_called:
                values[f"{stage}/{term}"] = float(mean.compute())
                mean.reset()
        self.epoch_metrics[stage] = values
        # Values are already reduced across processes by torchmetrics: no sync_dist.
        for name, value in values.items():
            if value is not None:  # None: not applicable (per-patient under split=paper)
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
        patients = fingerprints = None
        if getattr(datamodule, "stage_rows", None):
            # Which patients the model saw: tlunet.evaluate refuses to score it on them, found
            # by name or, renamed, by their images (hashed once per run, reused at each save);
            # and the whole split, which a resumed run must find again (tlunet.run).
            patients = {s: datamodule.stage_patients(s) for s in ("train", "val", "test")}
            if hasattr(datamodule, "patient_fingerprints"):
                fingerprints = {
                    "method": FINGERPRINT,
                    "patients": datamodule.patient_fingerprints(
                        sorted({*patients["train"], *patients["val"]})
                    ),
                }
        checkpoint[CHECKPOINT_SECTION] = {
            "version": tlunet.__version__,
            "preprocessing": getattr(datamodule, "preprocessing", None),
            "patients": patients,
            "patient_fingerprints": fingerprints,
            # What the run computed in (Lightning's name, "mixed" resolved): evaluate and
            # predict run the checkpoint in it by default, so they reproduce the run's test.
            "precision": str(self.trainer.precision),
            "detect_source": self.detect_source,
            # Validation scores at native resolution (tlunet >= 0.2.0): resumable with this code.
            "scoring": "native",
            "rng": rng_state(),
            # Wall time spent in fit() up to this checkpoint, over every resume.
            "train_time_s": self.train_time_s(),
        }

    def train_time_s(self) -> float:
        """Seconds spent in ``fit()`` so far: this process's share plus that of the runs it
        resumed (from the checkpoint); 0 before ``fit()``."""
        if self._fit_started is None:
            return self._train_time_before
        return self._train_time_before + time.perf_counter() - self._fit_started

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming a fit: the random streams continue where the checkpoint left them, so the
        # resumed run computes what the uninterrupted one would have.
        # Checkpoints of tlunet < 0.3 keep the aux head beside the network: today's names.
        checkpoint["state_dict"] = upgrade_state_dict(checkpoint["state_dict"], self.has_aux)
        section = checkpoint_section(checkpoint)
        state = section.get("rng")
        if self._trainer is not None and self.trainer.state.fn == "fit":
            if state:
                set_rng_state(state)
            self._train_time_before = float(section.get("train_time_s") or 0.0)


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and Python random states, as types ``weights_only`` loads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
