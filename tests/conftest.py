"""Shared fixtures: tiny synthetic kaggle_3m sets, Hydra composition, subprocess runs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tlunet.data.synthetic import write_synthetic_dataset
from tlunet.run import REQUIRED_TEST_METRICS

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
#: Environment variable naming the unpacked real sample (a kaggle_3m folder).
REAL_DATA_ENV = "TLUNET_DATA_ROOT"

TINY = {"num_patients": 6, "slices_per_patient": (6, 9), "image_size": 64, "seed": 1}
#: Phantoms twice the network's side in TINY_RUN: runs on them score at a resolution (128 px)
#: other than the one the network sees (64 px), like kaggle_3m (256 px) at data.image_size=128.
#: Seed 3: the validation patient (3 of 6 slices) and the test patient (2 of 8) have tumour.
TINY_128 = {**TINY, "image_size": 128, "seed": 3}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny read-only synthetic kaggle_3m set (6 patients, 64x64); copy it before editing."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "kaggle_3m", **TINY)


@pytest.fixture(scope="session")
def synthetic_root_128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like ``synthetic_root`` with 128x128 slices (read-only; copy it before editing)."""
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic128") / "kaggle_3m", **TINY_128
    )


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Everything under ``root``, hidden entries included: per relative path its kind, mode and
    modification time, plus a file's size and sha256 or a link's target. Equal snapshots: the
    tree was not written to."""
    found: dict[str, tuple] = {}
    paths = [root]
    for folder, dirs, files in os.walk(root):  # does not follow links
        paths += [Path(folder, name) for name in dirs + files]
    for path in sorted(paths):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir", st.st_mode)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return found


def compose_config(
    overrides: list[str] | None = None, return_hydra_config: bool = False
) -> DictConfig:
    """The composed ``train`` config, as ``python -m tlunet.train`` would see it (with its
    ``hydra`` node, launcher settings included, when ``return_hydra_config``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=overrides or [],
            return_hydra_config=return_hydra_config,
        )


def cli_env(cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's subprocess: offline, with a private cache under ``cwd``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TLUNET_CACHE_DIR": str(cwd / ".tlunet-cache"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``python -m <args>`` in a subprocess, offline, with a private cache; return the result."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=cli_env(cwd, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


#: Overrides that make a training run tiny and quiet.
TINY_RUN = [
    "encoder=resnet18",
    "encoder.weights=null",
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.progress_bar=null",
    "logger=csv",
]


def train_tiny(root: Path, work: Path, *overrides: str) -> Path:
    """Train a TINY_RUN on ``root`` in ``work``; return its run directory. An override of a
    TINY_RUN key (or group: ``encoder=...`` replaces ``encoder.weights=null`` too) replaces it."""
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    keys = [o.split("=", 1)[0] for o in overrides]
    base = [
        o
        for o in TINY_RUN
        if not any(o.split("=", 1)[0] == k or o.startswith(f"{k}.") for k in keys)
    ]
    out = run_cli(
        ["tlunet.train", *base, f"data.root={root}", f"hydra.run.dir={run_dir}", *overrides],
        cwd=work,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(synthetic_root_128: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny training run (its directory): network at 64 px on 128-px phantoms, so
    its scores go through the resize to native resolution."""
    return train_tiny(
        synthetic_root_128, tmp_path_factory.mktemp("tiny_run"), "trainer.limit_test_batches=1.0"
    )


@pytest.fixture(scope="session")
def tiny_bf16_run(synthetic_root_128: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_run`` in bf16 autocast, the precision ``trainer=cpu`` (``mixed``) resolves to on a
    CPU with bf16 instructions; skips on a CPU without them (``mixed`` is fp32 there)."""
    from tlunet.builders import resolve_precision

    if resolve_precision("mixed", "cpu") != "bf16-mixed":
        pytest.skip("this CPU has no bf16 instructions: trainer=cpu runs in fp32 here")
    return train_tiny(
        synthetic_root_128,
        tmp_path_factory.mktemp("tiny_bf16_run"),
        "trainer.limit_test_batches=1.0",
        "trainer.precision=mixed",  # trainer=cpu's
    )


def copy_patient_renamed(root: Path, patient: str, dst_root: Path, name: str) -> Path:
    """Copy ``root/patient`` to ``dst_root/name``, renaming its files as kaggle_3m names them
    (``<name>/<name>_<n>.tif``, ``<name>_<n>_mask.tif``): the same slices under a new name."""
    dst = dst_root / name
    dst.mkdir(parents=True)
    for file in (root / patient).iterdir():
        shutil.copy2(file, dst / file.name.replace(patient, name, 1))
    return dst


def check_run_dir(run_dir: Path) -> dict[str, float]:
    """Assert a finished run directory holds every file and metric a run promises."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in REQUIRED_TEST_METRICS:
        assert isinstance(metrics[name], float), name
        if name != "test/loss":
            assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
    assert math.isfinite(metrics["test/loss"]) and metrics["test/loss"] >= 0
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml", "run.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / "predictions.png").stat().st_size > 1000
    return metrics


def real_data_root() -> Path:
    """The real sample named by TLUNET_DATA_ROOT, or skip the test."""
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set (the unpacked kaggle_3m sample)")
    root = Path(value)
    if not root.is_dir():
        pytest.fail(f"{REAL_DATA_ENV}={value} is not a folder")
    return root
