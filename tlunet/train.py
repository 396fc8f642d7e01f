"""Train, validate and test a U-Net: ``python -m tlunet.train encoder=densenet121 data.root=DIR``.

Hydra composes ``conf/train.yaml`` with the command-line overrides; ``-m`` sweeps
(``-m encoder=vgg16,densenet121``) give each job its own directory under ``outputs/multiruns``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from tlunet.cli import register_sweep_plugins, user_errors_exit

log = logging.getLogger(__name__)
register_sweep_plugins()  # -m: the sweeper that accounts for every job (tlunet.sweeps)


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    # Imported once the config is composed: a mistyped key or override is reported before
    # torch and Lightning load (seconds, not the 10-20 s of their import).
    from tlunet.run import train
    from tlunet.summary import print_run_summary

    result = train(cfg)
    print_run_summary(result)
    return result["best_score"]  # what a Hydra sweeper (e.g. Optuna) optimises


if __name__ == "__main__":
    main()
