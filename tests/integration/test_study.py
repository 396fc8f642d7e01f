"""Studies: a multirun over the ten models of Table 1 with its report, cross-validation, and
tlunet.study (arms x folds, pooled, compared, resumable)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, check_run_dir, run_cli

TABLE1 = [
    "vgg16",
    "vgg19",
    "mobilenet_v2",
    "inception_v4",
    "efficientnet_b7",
    "inception_resnet_v2",
    "densenet201",
    "densenet121",
    "unet_scratch",
    "resunet",
]


@pytest.mark.slow
def test_ten_model_study_and_report(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    overrides = [o for o in TINY_RUN if not o.startswith("encoder=")]
    # one batch per stage: the ten networks end to end, the sweep's directories and the report
    overrides = [re.sub(r"limit_(\w+)_batches=2", r"limit_\1_batches=1", o) for o in overrides]
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            f"table1={','.join(TABLE1)}",
            *overrides,
            "model.aux_head=true",
            "callbacks.prediction_figure.per_class=1",
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = sorted(
        (p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[0])
    )
    assert len(jobs) == 10
    assert jobs[0].name == "0_unet_transposed_vgg16" and jobs[9].name == "9_resunet_none"
    for job in jobs:
        check_run_dir(job)
    report = run_cli(["tlunet.report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert len(rows) == 10
    assert {r["paper_model"] for r in rows} == {
        "VGG16",
        "VGG19",
        "MobileNetV2",
        "Inception",
        "EfficientNetB7",
        "InceptionResNetV2",
        "DenseNet201",
        "DenseNet121",
        "U-Net (scratch)",
        "ResU-Net (scratch)",
    }
    md = (sweep / "report.md").read_text()
    assert "Mean Dice (paper)" in md and "| 94.26 |" in md and "| 81.33 |" in md
    table = md.split("## All runs")[0]
    assert (
        sum(
            line.startswith("| unet") or line.startswith("| resunet") for line in table.splitlines()
        )
        == 10
    )
    assert (sweep / "report.png").stat().st_size > 1000


@pytest.mark.slow
def test_optuna_search_runs_trials(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    out = run_cli(
        [
            "tlunet.train",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            *TINY_RUN,
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / "run.json").exists()]
    assert len(jobs) == 2
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best


@pytest.mark.slow
def test_three_fold_cross_validation_and_report(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "cv"
    out = run_cli(
        [
            "tlunet.train",
            "-m",
            *TINY_RUN,
            "data.num_folds=3",
            "data.fold=0,1,2",
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3
    infos = [json.loads((j / "run.json").read_text()) for j in jobs]
    assert [i["fold"] for i in infos] == [0, 1, 2]
    tests = [set(i["patients"]["test"]) for i in infos]
    assert all(tests[a].isdisjoint(tests[b]) for a in range(3) for b in range(a + 1, 3))
    assert len(set.union(*tests)) == 6  # every synthetic patient is tested once
    assert len({i["config_hash"] for i in infos}) == 1
    report = run_cli(["tlunet.report", str(sweep)], cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    md = (sweep / "report.md").read_text()
    assert "| unet | resnet18 | patient (3 folds) | 3 |" in md
    assert " ± " in md.split("## All runs")[0]
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert sorted(r["fold"] for r in rows) == ["0", "1", "2"]


@pytest.mark.slow
def test_study_runs_pools_compares_and_resumes(synthetic_root_128: Path, tmp_path: Path) -> None:
    """tlunet.study: every arm on every fold, evaluated, pooled (each patient once) and compared
    with the reference; run again, it skips what is done and resumes what was cut short."""
    spec = tmp_path / "tiny.yaml"
    common = "\n".join(f"  - {o}" for o in TINY_RUN)
    spec.write_text(
        f"name: tiny\nfolds: 2\ncommon:\n{common}\nreference: a\n"
        "arms:\n  a: []\n  b: [optimizer.lr=1.0e-2]\n"
    )
    out = tmp_path / "study"
    args = ["tlunet.study", str(spec), "--data-root", str(synthetic_root_128), "--out", str(out)]
    result = run_cli([*args, "--jobs", "2"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "study.json").read_text())
    assert [r["complete"] for r in summary["per_fold"]] == [True] * 4
    assert summary["pooled"]["a"]["patients"] == 6 == summary["pooled"]["b"]["patients"]
    pooled = list(csv.DictReader(open(out / "a" / "pooled" / "per_patient.csv")))
    assert len({r["patient"] for r in pooled}) == 6  # every patient a test patient once
    # The pooled global Dice from the patients' exact confusion counts.
    tp, fp, fn = (sum(int(r[k]) for r in pooled) for k in ("tp_pixels", "fp_pixels", "fn_pixels"))
    assert summary["pooled"]["a"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert summary["comparisons"]["b"]["dice"]["patients"] >= 1
    assert (out / "compare" / "a_vs_b" / "compare.md").is_file()
    text = (out / "study.md").read_text()
    assert "| a | 6 |" in text and "reference" in text
    # Cut one run short after the fact: its metrics and evaluation gone, its last.ckpt kept.
    (out / "b" / "fold1" / "metrics.json").unlink()
    shutil.rmtree(out / "b" / "fold1" / "evaluation")
    before = (out / "a" / "fold0" / "metrics.json").stat().st_mtime_ns
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (out / "logs" / "b_fold1.log").read_text()
    assert "resume=" in log and "accelerator=cpu" in log  # evaluated where it trained
    assert (out / "b" / "fold1" / "metrics.json").is_file()
    assert (out / "a" / "fold0" / "metrics.json").stat().st_mtime_ns == before  # skipped
    missing = run_cli(["tlunet.study", "nosuch", "--data-root", str(tmp_path)], cwd=tmp_path)
    assert missing.returncode == 1 and "known studies" in missing.stderr
    assert "cpu_transfer" in missing.stderr
