"""Tests on the real 40-patient kaggle_3m sample, found through TLUNET_DATA_ROOT (skipped without).

mkdir -p /tmp/lgg && tar -xJf ../shared/data/kaggle_3m-dev40.tar.xz -C /tmp/lgg
TLUNET_DATA_ROOT=/tmp/lgg/kaggle_3m make test
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import check_run_dir, real_data_root, run_cli
from tlunet.data.cache import decode_slices
from tlunet.data.index import index_kaggle3m

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

#: The acceptance command of issue 2, apart from where its outputs go.
ACCEPTANCE = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "data.image_size=128",
    "encoder.weights=null",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def real_root() -> Path:
    return real_data_root()


def test_index_and_decode_real_sample(real_root: Path, tmp_path: Path) -> None:
    records = index_kaggle3m(real_root)
    patients = {r.patient for r in records}
    assert len(patients) == 40 and len(records) == 1425
    decoded = decode_slices(records, real_root, tmp_path / "cache")
    assert decoded.images.shape == (1425, 256, 256, 3)
    assert int(decoded.has_tumour.sum()) == 476  # the sample's README: 476 slices with tumour
    per_patient = {p: 0 for p in patients}
    for r, t in zip(records, decoded.has_tumour, strict=True):
        per_patient[r.patient] += int(t)
    assert per_patient["TCGA_HT_A61B_19991127"] == 25
    assert set(np.unique(decoded.masks[:200]).tolist()) == {0, 1}


def test_acceptance_run_densenet121(real_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_cli(
        [
            "tlunet.train",
            "encoder=densenet121",
            f"data.root={real_root}",
            *ACCEPTANCE,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_run_dir(run_dir)


def test_acceptance_multirun_three_encoders(real_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            "encoder=vgg16,mobilenet_v2,densenet121",
            f"data.root={real_root}",
            *ACCEPTANCE,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_unet_vgg16", "1_unet_mobilenet_v2", "2_unet_densenet121"]
    for job in jobs:
        check_run_dir(job)


def test_check_names_an_empty_patient_folder_of_the_real_sample(
    real_root: Path, tmp_path: Path
) -> None:
    """Issue 14's acceptance: the sample with one patient's slices missing (a half copy) is
    not read as a clean 39-patient set: the check exits 1 naming the empty folder."""
    copy = tmp_path / "kaggle_3m"
    copy.mkdir()
    for entry in real_root.iterdir():
        (copy / entry.name).symlink_to(entry)  # a copy without copying 1425 slices
    half = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    half.unlink()
    half.mkdir()
    out = run_cli(["tlunet.data.check", f"data.root={copy}"], cwd=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"Patient folder '{half}' is empty" in out.stdout
    assert f"tlunet error: 1 problem in '{copy}'" in out.stderr
    assert "39 patients" in out.stdout and "Traceback" not in out.stderr
