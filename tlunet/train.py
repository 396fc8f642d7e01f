"""Train, validate and test a U-Net: ``python -m tlunet.train encoder=densenet121 data.root=DIR``.

Hydra composes ``conf/train.yaml`` with the command-line overrides; ``-m`` sweeps
(``-m encoder=vgg16,densenet121``) give each job its own directory under ``outputs/multiruns``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tlunet.cli import user_errors_exit
from tlunet.run import train

log = logging.getLogger(__name__)


def _summary(result: dict) -> None:
    console = Console(stderr=False)
    metrics = result["metrics"]
    if metrics:
        table = Table(title="Test metrics (best checkpoint)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k in sorted(metrics):
            value = metrics[k]
            table.add_row(k, "not applicable" if value is None else f"{value:.4f}")
        console.print(table)
    run_dir = result["run_dir"]
    console.print(
        f"Results in [bold]{run_dir}[/bold]: metrics.json, run.json, config.yaml, "
        "checkpoints/best.ckpt, predictions.png, csv/ and tensorboard/ logs.\n"
        "Train on the real data (the Kaggle 'lgg-mri-segmentation' set, unzipped so that "
        "kaggle_3m/ exists):\n"
        "  python -m tlunet.train encoder=densenet121 data.root=/path/to/kaggle_3m"
    )


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    result = train(cfg)
    _summary(result)
    return result["best_score"]  # what a Hydra sweeper (e.g. Optuna) optimises


if __name__ == "__main__":
    main()
