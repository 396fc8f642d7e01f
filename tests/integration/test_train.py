"""End to end: `python -m tlunet.train` on tiny synthetic data, multirun, and user mistakes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, check_run_dir, run_cli


def test_train_and_test_end_to_end(synthetic_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run_cli(
        ["tlunet.train", *TINY_RUN, f"data.root={synthetic_root}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = check_run_dir(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["encoder"] == "resnet18" and info["split"] == "patient"
    assert info["parameters"] > 1_000_000
    assert set(info["patients"]["test"]).isdisjoint(info["patients"]["train"])
    assert info["environment"]["libraries"]["torch"]
    # metrics.json holds what the test stage logged (float32 in the CSV log).
    header, *rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    last = [r for r in rows if r.split(",")[columns.index("test/dice")]][-1].split(",")
    assert float(last[columns.index("test/dice")]) == pytest.approx(metrics["test/dice"], abs=1e-6)
    # One ending: our table (Lightning's is off), the run directory, the next commands; no
    # product tips or known third-party deprecation warnings around it.
    assert out.stdout.count("Test stage:") == 1 and "DataLoader 0" not in out.stdout
    assert f"Run directory: {run_dir}" in out.stdout and "python -m tlunet.evaluate" in out.stdout
    both = out.stdout + out.stderr
    for noise in ("💡", "Tip:", "LeafSpec", "is not writable", "was configured so"):
        assert noise not in both, noise


def _assert_user_error(out, *fragments: str) -> None:
    assert out.returncode != 0
    text = out.stdout + out.stderr
    for fragment in fragments:
        assert fragment in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_wrong_data_root(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    out = run_cli(
        ["tlunet.train", *TINY_RUN, f"data.root={missing}", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
    )
    _assert_user_error(out, f"data.root '{missing}' does not exist")
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.slow
def test_unset_data_root(tmp_path: Path) -> None:
    out = run_cli(["tlunet.train", *TINY_RUN, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path)
    _assert_user_error(out, "data.root is not set")


@pytest.mark.slow
def test_unknown_encoder_option_and_name(synthetic_root: Path, tmp_path: Path) -> None:
    out = run_cli(["tlunet.train", "encoder=densnet121"], cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'encoder/densnet121'" in out.stderr
    assert "densenet121" in out.stderr  # Hydra lists the available options
    out = run_cli(
        [
            "tlunet.train",
            *TINY_RUN,
            "encoder.name=densnet121",
            f"data.root={synthetic_root}",
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        cwd=tmp_path,
    )
    _assert_user_error(out, "Unknown encoder 'densnet121'", "Did you mean: densenet121")


@pytest.mark.slow
def test_missing_mask_is_named(synthetic_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, data)
    mask = next(data.glob("SYN_P002_*/*_3_mask.tif"))
    mask.unlink()
    out = run_cli(
        ["tlunet.train", *TINY_RUN, f"data.root={data}", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
    )
    image = mask.with_name(mask.name.replace("_mask", ""))
    _assert_user_error(out, f"Missing mask for image '{image}'")


@pytest.mark.slow
def test_misspelled_key(tmp_path: Path) -> None:
    out = run_cli(["tlunet.train", "data.rot=/x"], cwd=tmp_path)
    assert out.returncode != 0
    assert "Key 'rot' is not in struct" in out.stderr


@pytest.mark.slow
def test_freezing_a_scratch_model_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    out = run_cli(
        [
            "tlunet.train",
            *TINY_RUN,
            "model=resunet",
            "model.freeze_encoder=true",
            f"data.root={synthetic_root}",
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        cwd=tmp_path,
    )
    _assert_user_error(out, "model 'resunet' has no pretrained encoder")


@pytest.mark.slow
def test_failed_job_neither_stops_nor_hides_the_others(synthetic_root: Path, tmp_path: Path):
    """The first job of a local sweep stops on a user error: the second still runs; the sweep
    then names the failed job and its reason in one line and exits 1; the report lists it as
    failed and averages only the complete run."""
    sweep = tmp_path / "sweep"
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            "data.image_size=100,64",
            *[o for o in TINY_RUN if not o.startswith("data.image_size")],
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    failed = [line for line in out.stderr.splitlines() if line.startswith("  #")]
    assert len(failed) == 1 and failed[0].startswith("  #0 data.image_size=100: tlunet error:")
    assert f"({sweep / '0_unet_resnet18'})" in failed[0]
    assert f"1 of 2 jobs of the sweep in '{sweep}' did not complete" in out.stderr
    check_run_dir(sweep / "1_unet_resnet18")
    assert not (sweep / "0_unet_resnet18" / "metrics.json").exists()
    # Each job held its run folder, and gave it back as it ended, failed or not.
    assert not list(sweep.glob("*/.tlunet.lock"))

    report = run_cli(["tlunet.report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = {r["run"]: r for r in csv.DictReader((sweep / "report.csv").open())}
    assert rows["0_unet_resnet18"]["status"].startswith("failed: tlunet error: data.image_size")
    assert rows["1_unet_resnet18"]["status"] == "complete"
    md = (sweep / "report.md").read_text()
    beside_paper = md.split("## Beside the paper")[1].split("How to read it")[0]
    assert "| unet | resnet18 | patient | 1 |" in beside_paper  # one run in the mean, not two
