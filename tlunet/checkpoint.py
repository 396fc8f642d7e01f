"""Load a tlunet checkpoint safely and rebuild its trained module: the one path
``tlunet.train`` (resume), ``evaluate``, ``predict`` and ``export`` use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tlunet.builders import build_module
from tlunet.errors import ConfigError
from tlunet.models.aux_head import upgrade_state_dict
from tlunet.targets import check_checkpoint
from tlunet.utils import load_tensors_safely


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A tlunet checkpoint, loaded without executing pickled code, whose stored config names
    only ``_target_``s tlunet builds (:func:`tlunet.targets.check_checkpoint`): nothing a
    checkpoint names is called before that check."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path '{path}' does not exist or is not a file.")
    checkpoint = load_tensors_safely(path, "checkpoint ")
    hyper = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    config = hyper.get("config") if isinstance(hyper, dict) else None
    if not isinstance(config, dict) or not config or "state_dict" not in checkpoint:
        raise ConfigError(f"'{path}' is not a tlunet checkpoint (no stored run config).")
    check_checkpoint(checkpoint, path)
    return checkpoint


def upgrade_config(run_cfg: DictConfig) -> DictConfig:
    """A stored run config of tlunet < 0.3 in today's layout: the module node built the module
    with its network, loss, optimiser and scheduler passed by hand, and the aux head was the
    module's, not the network's. Resolved values, as checkpoints store them."""
    run_cfg = run_cfg.copy()
    model = run_cfg.model
    if "aux_head" not in model.net:
        model.net.aux_head = bool(model.get("aux_head", False))
        model.net.aux_hidden = int(model.get("aux_hidden", 256))
    if "net" not in run_cfg.module:
        run_cfg.module.net = model.net
        run_cfg.module.loss = run_cfg.loss
        run_cfg.module.optimizer = run_cfg.optimizer
        run_cfg.module.scheduler = run_cfg.get("scheduler")
        run_cfg.module.per_patient = run_cfg.data.get("split") != "paper"
        run_cfg.module.aux_loss_weight = model.get("aux_loss_weight", 0.2)
        run_cfg.module.freeze_encoder = bool(model.get("freeze_encoder", False))
        run_cfg.module.unfreeze_at_epoch = model.get("unfreeze_at_epoch")
        run_cfg.module.channels_last = bool(model.get("channels_last", False))
        run_cfg.module.compile = model.get("compile", False) or False
    return run_cfg


def module_from_checkpoint(checkpoint: dict[str, Any], run_cfg: DictConfig | None = None) -> Any:
    """The trained LightningModule of ``checkpoint`` (built from its stored config), eval mode."""
    run_cfg = upgrade_config(run_cfg or OmegaConf.create(checkpoint["hyper_parameters"]["config"]))
    # The weights come from the checkpoint: never download encoder weights here.
    for key in ("encoder_weights", "encoder_weights_path"):
        if key in run_cfg.module.net:
            run_cfg.module.net[key] = None
    module = build_module(run_cfg)
    state = upgrade_state_dict(checkpoint["state_dict"], module.has_aux)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"The checkpoint's weights do not match its own config: {exc}") from exc
    return module.eval()
