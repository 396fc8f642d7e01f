"""Load a tlunet checkpoint safely and rebuild its trained module: the one path
``tlunet.train`` (resume), ``evaluate``, ``predict`` and ``export`` use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tlunet.builders import build_module
from tlunet.errors import ConfigError
from tlunet.utils import load_tensors_safely


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A tlunet checkpoint, loaded without executing pickled code."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{path}' does not exist or is not a file.")
    checkpoint = load_tensors_safely(path, "checkpoint ")
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
