"""Reproducibility and crash recovery: equal seeds give equal runs, and a run killed part way
and resumed ends exactly where an uninterrupted one does."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, cli_env, run_cli, tree_snapshot

EPOCHS = 5
#: A tiny run with augmentation, every stage, deterministic algorithms and several epochs.
RUN = [
    *[o for o in TINY_RUN if not o.startswith(("trainer.max_epochs", "trainer.limit_train"))],
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=4",
    "data.num_workers=2",  # workers fetch from the sampler before Lightning sets its epoch
    "trainer.deterministic=true",
    "seed=7",
]


def _train(root: Path, run_dir: Path, *extra: str) -> dict[str, float]:
    out = run_cli(
        ["tlunet.train", *RUN, f"data.root={root}", f"hydra.run.dir={run_dir}", *extra],
        cwd=run_dir.parent,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _val_curve(run_dir: Path) -> list[tuple[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["epoch"], r["val/dice_per_patient"]) for r in rows if r.get("val/dice_per_patient")]


@pytest.fixture(scope="module")
def reference(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (seed 7, deterministic)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _train(synthetic_root, run_dir)
    return run_dir


@pytest.mark.slow
def test_equal_seeds_give_identical_runs(reference: Path, synthetic_root: Path, tmp_path: Path):
    # No DataLoader workers instead of two: order and augmentations do not depend on them.
    metrics = _train(synthetic_root, tmp_path / "again", "data.num_workers=0")
    assert metrics == json.loads((reference / "metrics.json").read_text())
    assert _same_weights(_weights(tmp_path / "again"), _weights(reference))
    run = json.loads((reference / "run.json").read_text())
    assert run["environment"]["libraries"]["torch"] == metadata.version("torch")
    assert run["environment"]["tlunet"] and "git_commit" in run["environment"]
    assert (reference / "config.yaml").is_file()

    _train(synthetic_root, tmp_path / "other", "seed=8")
    assert not _same_weights(_weights(tmp_path / "other"), _weights(reference))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(
    reference: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tlunet.train",
            *RUN,
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert last.exists(), "the run ended or timed out before its first checkpoint"
    killed = torch.load(last, map_location="cpu", weights_only=True)
    killed_at = killed["epoch"]
    spent_before_kill = killed["tlunet"]["train_time_s"]
    assert spent_before_kill > 0
    assert killed_at < EPOCHS - 1, "the run was not killed part way"
    assert not (run_dir / "metrics.json").exists()

    out = run_cli(["tlunet.train", f"resume={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )
    assert _same_weights(_weights(run_dir), _weights(reference))
    assert _val_curve(run_dir) == _val_curve(reference)  # one log, no gap and no repeat
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from"] == str(last) and run["epochs"] == EPOCHS
    # The training time counts the killed process's share too, not only the resumed one's.
    assert run["train_time_s"] > spent_before_kill

    # A finished run is not resumed again.
    again = run_cli(["tlunet.train", f"resume={run_dir}"], cwd=tmp_path)
    assert again.returncode == 1 and "is complete" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "holds no config.yaml"),
        ("no_config", "holds no config.yaml"),
        ("no_checkpoint", "stopped before its first epoch ended"),
        ("tampered", "Cannot load checkpoint .* safely"),
        ("overrides", r"drop the other overrides \['encoder=vgg16'\]"),
        ("moved", "was started in '/elsewhere/run': resume it there"),
        ("before_native_scoring", "made by tlunet before 0.2.0"),
    ],
)
def test_resume_mistakes(case: str, message: str, tmp_path: Path) -> None:
    import re

    run_dir = tmp_path / "run"
    extra = []
    if case != "missing":
        (run_dir / "checkpoints").mkdir(parents=True)
    if case in ("no_checkpoint", "tampered", "overrides"):
        (run_dir / "config.yaml").write_text(f"paths:\n  output_dir: {run_dir}\n")
    if case in ("tampered", "overrides"):

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        torch.save({"state_dict": {}, "payload": Evil()}, run_dir / "checkpoints" / "last.ckpt")
    if case == "overrides":
        extra = ["encoder=vgg16"]
    if case == "before_native_scoring":  # a checkpoint without "scoring": "native"
        (run_dir / "config.yaml").write_text(f"paths:\n  output_dir: {run_dir}\n")
        torch.save(
            {
                "state_dict": {},
                "hyper_parameters": {"config": {"seed": 1}},
                "epoch": 3,
                "global_step": 30,
                "tlunet": {"version": "0.1.0"},
            },
            run_dir / "checkpoints" / "last.ckpt",
        )
    if case == "no_config":  # a folder of the user's, with a log of its own
        (run_dir / "train.log").write_text("the user's log\n")
        (run_dir / "notes.txt").write_text("the user's notes\n")
    before = tree_snapshot(run_dir) if run_dir.exists() else None
    if case == "moved":
        (run_dir / "config.yaml").write_text("paths:\n  output_dir: /elsewhere/run\n")
        torch.save(
            {"state_dict": {}, "hyper_parameters": {"config": {"seed": 1}}},
            run_dir / "checkpoints" / "last.ckpt",
        )
    out = run_cli(["tlunet.train", f"resume={run_dir}", *extra], cwd=tmp_path)
    assert out.returncode == 1
    assert re.search(message, out.stderr), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "pwned" not in out.stdout
    if case == "missing":  # Hydra's folder for the mistyped path is not left behind
        assert not run_dir.exists()
    if case == "no_config":  # nothing written there: no .hydra-resumed/, no log lines
        assert tree_snapshot(run_dir) == before


def test_sampler_order_and_augmentations_are_functions_of_seed_and_epoch(
    synthetic_root: Path,
) -> None:
    import albumentations as A

    from tlunet.data.datamodule import LGGDataModule
    from tlunet.data.dataset import SeededShuffleSampler

    sampler = SeededShuffleSampler(50, seed=3)
    sampler.set_epoch(4)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(50))  # a permutation
    sampler.set_epoch(4)
    assert list(sampler) == first  # set_epoch replays an epoch exactly
    assert list(sampler) != first  # without set_epoch the next pass is the next epoch
    assert list(SeededShuffleSampler(50, seed=4)) != list(SeededShuffleSampler(50, seed=3))

    dm = LGGDataModule(
        root=str(synthetic_root),
        image_size=64,
        num_workers=0,
        augment=[A.Affine(rotate=(-30, 30), p=1)],
    )
    dm.setup("fit")
    train = dm.datasets["train"]
    a, b, c = train[(0, 11)], train[(0, 11)], train[(0, 12)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])


_KILLED_WHILE_SAVING = """
import csv, os, signal, sys
from tlunet.callbacks import CSVLogger

logger = CSVLogger(sys.argv[1], name="csv", version="")
logger.log_metrics({"val/loss": 0.5, "epoch": 0}, step=3)
logger.log_metrics({"val/loss": 0.4, "epoch": 1}, step=7)  # appended to the existing header
logger.save()
logger.log_metrics({"val/loss": 0.3, "epoch": 2}, step=11)
logger.save()
real = csv.DictWriter.writerows

def killed(self, rows):  # the process dies while writing the next rows
    real(self, list(rows)[:1])
    os.kill(os.getpid(), signal.SIGKILL)

csv.DictWriter.writerows = killed
logger.log_metrics({sys.argv[2]: 0.7, "epoch": 2}, step=11)
logger.save()
"""


@pytest.mark.parametrize("key", ["train/loss", "val/loss"], ids=["new-column", "append"])
def test_metrics_csv_keeps_its_rows_when_killed_while_saving(key: str, tmp_path: Path) -> None:
    # Lightning's own writer truncates metrics.csv and writes it again when a column appears:
    # a kill in between (as in the kill-and-resume test, right after a checkpoint) emptied it.
    out = subprocess.run(
        [sys.executable, "-c", _KILLED_WHILE_SAVING, str(tmp_path), key],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["step"], r["val/loss"]) for r in rows] == [
        ("0", "3", "0.5"),
        ("1", "7", "0.4"),
        ("2", "11", "0.3"),
    ]
