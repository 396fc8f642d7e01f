"""Issue 3's acceptance: a multirun over the ten models of Table 1, then the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .conftest import TINY_RUN, check_run_dir, run_cli

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


def test_ten_model_study_and_report(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    overrides = [o for o in TINY_RUN if not o.startswith("encoder=")]
    overrides = [o.replace("limit_train_batches=2", "limit_train_batches=1") for o in overrides]
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
