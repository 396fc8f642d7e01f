"""Build what a run is made of from its config: the LightningModule, the Trainer (with its
precision resolved for the machine), callbacks and loggers. Used by ``tlunet.train``, by the
checkpoint loader of ``evaluate``/``predict``/``export``, and by the benchmark."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tlunet.errors import ConfigError
from tlunet.models import MODELS

if TYPE_CHECKING:  # Lightning loads when a Trainer is built: inference never needs it
    import pytorch_lightning as pl

log = logging.getLogger(__name__)


def cpu_bf16_flags() -> list[str]:
    """The bf16 instructions of this CPU in /proc/cpuinfo: ``amx_bf16`` (Intel AMX matrix
    units), ``avx512_bf16`` (bf16 dot products: Intel Cooper Lake and later, AMD Zen 4)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast speeds up training on this CPU: with AMX or AVX512-BF16 (measured:
    1.8x for a ResNet18 U-Net and 1.25x for Lite0 at 128 px on an AMD EPYC with avx512_bf16,
    BENCHMARKS.md); without either, bf16 is emulated and slower than fp32."""
    return bool(cpu_bf16_flags())


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """``mixed`` -> on a GPU, ``bf16-mixed`` where it supports bf16, else ``16-mixed``; on the
    CPU, ``bf16-mixed`` where it has bf16 instructions (AMX or AVX512-BF16), else ``32-true``."""
    if str(precision) != "mixed":
        return precision
    if accelerator == "cpu" or not torch.cuda.is_available():
        if accelerator in ("gpu", "cuda"):
            raise ConfigError(
                "trainer=gpu was asked for but no CUDA GPU is visible "
                "(torch.cuda.is_available() is False). Use trainer=cpu for the CPU."
            )
        return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every non-null ``_target_`` entry of a dict config (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if v is not None and "_target_" in v]


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Any]) -> pl.Trainer:
    precision = resolve_precision(cfg.trainer.get("precision", "32-true"), cfg.trainer.accelerator)
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        torch.set_float32_matmul_precision("high")
    from tlunet.callbacks import AtomicCheckpointIO  # here: inference never loads the callbacks

    overrides = {}
    if cfg.trainer.get("sync_batchnorm") and cfg.trainer.accelerator == "cpu":
        log.warning("trainer.sync_batchnorm needs CUDA (torch's SyncBatchNorm): off on the CPU.")
        overrides["sync_batchnorm"] = False
    return instantiate(
        cfg.trainer,
        precision=precision,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        **overrides,
    )


def build_module(cfg: DictConfig) -> Any:
    """The LightningModule of ``cfg``: one ``instantiate`` of ``cfg.module`` (network, loss,
    optimiser and scheduler partials, model options: conf/train.yaml), with the composed
    config stored for its checkpoints."""
    builder = MODELS.get(cfg.model.net.get("arch", ""))
    if cfg.model.get("freeze_encoder") and not getattr(builder, "pretrained_encoder", True):
        raise ConfigError(
            f"model.freeze_encoder=true: model '{cfg.model.name}' has no pretrained encoder "
            "to keep frozen (it is trained from scratch)."
        )
    module = instantiate(cfg.module)
    module.set_run_config(OmegaConf.to_container(cfg, resolve=True))
    return module
