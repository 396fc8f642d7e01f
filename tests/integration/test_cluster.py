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
def test_local_submitit_sweep_accounts_for_every_job(synthetic_root: Path, tmp_path: Path) -> None:
    """Three submitit jobs on this machine: one completes, one stops on a user error, one is
    killed (SIGKILL at the start of training). Neither stops the others; the sweep lists both
    (one line each, with the reason) and exits 1; the report lists them as not complete."""
    sweep = tmp_path / "sweep"
    repo = Path(__file__).resolve().parents[2]
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            "cluster=local",
            "data.image_size=64,100,96",  # 100 is not a multiple of 32: a user error
            "+callbacks.kill._target_=tests.helpers.KillProcess",
            "+callbacks.kill.when=96",
            "+callbacks.kill.value=${data.image_size}",
            *[o for o in TINY_RUN if not o.startswith("data.image_size")],
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(repo)},
        timeout=300,
    )
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]
    assert f"tlunet error: 2 of 3 jobs of the sweep in '{sweep}' did not complete:" in out.stderr
    lines = {line.split(":")[0].strip(): line for line in out.stderr.splitlines() if "  #" in line}
    assert set(lines) == {"#1 data.image_size=100", "#2 data.image_size=96"}, out.stderr[-3000:]
    assert "must be a positive multiple of 32" in lines["#1 data.image_size=100"]
    assert "started but never ended: killed" in lines["#2 data.image_size=96"]
    assert (sweep / "failed_jobs.txt").read_text().count("  #") == 2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == [f"{i}_unet_resnet18" for i in range(3)]
    metrics = json.loads((jobs[0] / "metrics.json").read_text())
    assert 0.0 <= metrics["test/dice_per_patient"] <= 1.0
    status = [json.loads((j / "job_status.json").read_text())["status"] for j in jobs]
    assert status == ["completed", "failed", "running"]  # the killed job never ended
    assert (sweep / ".submitit").is_dir()

    report = run_cli(["tlunet.report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "2 of 3 runs under" in report.stderr
    md = (sweep / "report.md").read_text()
    assert "## Runs that did not complete (2, in no mean above)" in md
    assert "failed: tlunet error: data.image_size=100" in md
    assert "incomplete: started, never ended (killed" in md
