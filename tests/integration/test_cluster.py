"""cluster=slurm / cluster=local: sweeps through hydra-submitit-launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, compose_config, run_cli

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")


def test_without_cluster_the_basic_launcher_runs_jobs() -> None:
    cfg = compose_config([], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")


def test_slurm_launcher_config() -> None:
    cfg = compose_config(["cluster=slurm", "hydra.sweep.dir=/sweeps/s"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert str(cfg.hydra.mode).endswith("MULTIRUN")  # cluster=slurm always submits
    assert launcher.nodes == 1 and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.timeout_min >= 60 and launcher.cpus_per_task >= 1 and launcher.mem_gb > 0
    assert launcher.partition is None and launcher.array_parallelism >= 1
    assert launcher.submitit_folder == "/sweeps/s/.submitit/%j"


def test_slurm_ddp_runs_one_task_per_gpu() -> None:
    cfg = compose_config(
        [
            "cluster=slurm",
            "trainer=ddp",
            "trainer.num_nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu"
    # devices=-1: each task's Lightning uses every GPU SLURM gives the node (4 = tasks per node)
    assert cfg.trainer.devices == -1 and cfg.trainer.sync_batchnorm is True


def test_local_launcher_config() -> None:
    cfg = compose_config(["cluster=local"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1


@pytest.mark.slow
def test_local_submitit_sweep(synthetic_root: Path, tmp_path: Path) -> None:
    """Two encoders as two submitit jobs on this machine: one run directory each."""
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            "cluster=local",
            "encoder=resnet18,mobilenet_v2",
            *[o for o in TINY_RUN if not o.startswith("encoder=")],  # keeps encoder.weights=null
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0_unet_resnet18", "1_unet_mobilenet_v2"]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert 0.0 <= metrics["test/dice_per_patient"] <= 1.0
    assert (sweep / ".submitit").is_dir()
