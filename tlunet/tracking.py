"""Experiment tracking: MLflow and Weights & Biases beside the CSV and TensorBoard logs.

Every logger of a run (``logger=`` group) receives, through Lightning's logger API:

- at the start, the resolved config as hyperparameters, flattened to dotted keys
  (``model.net.encoder_name``): TensorBoard's HPARAMS tab, MLflow's params, W&B's config;
- during the run, the training/validation metrics; after it, the test metrics (and, for
  TensorBoard's HPARAMS tab, ``hp_metric`` = the run's headline metric);
- at the end, the run's figures (``curves.png``, ``predictions.png``); MLflow also stores
  ``metrics.json``, ``run.json``, ``config.yaml`` and the best checkpoint as artifacts.

MLflow and W&B are optional (``pip install 'tlunet[tracking]'``); asking for one that is not
installed stops the run before it starts with one line naming the package.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tlunet.errors import ConfigError

log = logging.getLogger(__name__)

#: MLflow's limit on a param value's length (longer values are cut, with a marker).
MAX_PARAM_CHARS = 6000
INSTALL_HINT = "pip install 'tlunet[tracking]'"


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested (resolved) config as ``{"dotted.key": value}``: scalars kept, lists as text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value if not isinstance(value, str) else value[:MAX_PARAM_CHARS]
        else:
            out[name] = str(value)[:MAX_PARAM_CHARS]
    return out


def _require(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs the package '{module}': {INSTALL_HINT}") from exc


def mlflow_logger(
    log_dir: str,
    run_dir: str,
    experiment_name: str = "tlunet",
    tracking_uri: str | None = None,
    tags: dict[str, Any] | None = None,
) -> Any:
    """Lightning's ``MLFlowLogger``; by default a local store that works offline:
    ``<log_dir>/mlruns/mlflow.db`` (SQLite: MLflow 3 keeps the plain-file store in maintenance
    mode) with artifacts in ``<log_dir>/mlruns/artifacts``. ``tracking_uri`` (or the
    ``MLFLOW_TRACKING_URI`` environment variable) names any other store or server."""
    _require("mlflow", "logger=mlflow")
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = None
    if not uri:
        root = Path(log_dir).expanduser().resolve() / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        artifact_location = str(root / "artifacts")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the store's schema messages
    try:
        return MLFlowLogger(
            experiment_name=experiment_name,
            run_name=Path(run_dir).name,
            tracking_uri=uri,
            tags={"run_dir": str(Path(run_dir).resolve()), **(tags or {})},
            artifact_location=artifact_location,
        )
    except Exception as exc:  # an unreachable server, a read-only store...
        raise ConfigError(f"MLflow tracking store '{uri}' cannot be used: {exc}") from exc


def wandb_logged_in() -> bool:
    """Whether W&B credentials are set (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_logger(
    run_dir: str, project: str = "tlunet", mode: str | None = None, **kwargs: Any
) -> Any:
    """Lightning's ``WandbLogger`` writing into the run directory (``<run>/wandb``); ``mode``
    ``offline`` unless the user is logged in (``wandb login`` or ``WANDB_API_KEY``): an offline
    run is uploaded later with ``wandb sync <run>/wandb/offline-run-*``."""
    _require("wandb", "logger=wandb")
    from pytorch_lightning.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    return WandbLogger(
        project=project, name=Path(run_dir).name, save_dir=run_dir, mode=mode, **kwargs
    )


def log_config(loggers: Iterable[Any], config: Mapping[str, Any]) -> None:
    """Every logger gets the resolved config as hyperparameters (dotted keys)."""
    params = flat_params(config)
    for logger in loggers:
        logger.log_hyperparams(params)


def log_results(
    loggers: Iterable[Any],
    run_dir: Path,
    headline: tuple[str, float] | None,
    figures: Iterable[Path],
    artifacts: Iterable[Path],
) -> None:
    """After the run: ``hp_metric`` for TensorBoard's HPARAMS tab, the figures for every
    logger, and for MLflow the run's files as artifacts. A logger that fails here costs the
    run nothing (its results are on disk): a warning names it."""
    figures = [f for f in figures if f.is_file()]
    artifacts = [a for a in artifacts if a and Path(a).is_file()]
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind == "TensorBoardLogger":
                _tensorboard_results(logger, headline, figures)
            elif kind == "MLFlowLogger":
                for path in figures:
                    logger.experiment.log_artifact(logger.run_id, str(path), "figures")
                for path in artifacts:
                    folder = "checkpoints" if Path(path).suffix == ".ckpt" else None
                    logger.experiment.log_artifact(logger.run_id, str(path), folder)
            elif kind == "WandbLogger":
                for path in figures:
                    logger.log_image(key=f"figures/{path.stem}", images=[str(path)])
                logger.experiment.finish()  # writes its summary and config files now
        except Exception as exc:
            log.warning("Could not send the run's results to %s: %s", kind, exc)


def _tensorboard_results(logger: Any, headline: tuple[str, float] | None, figures: list) -> None:
    import numpy as np
    from PIL import Image

    if headline is not None:
        logger.log_metrics({"hp_metric": headline[1]})
    for path in figures:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        logger.experiment.add_image(f"figures/{path.stem}", pixels, dataformats="HWC")
    logger.experiment.flush()
