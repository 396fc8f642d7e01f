"""Run a study: every arm on every cross-validation fold, each evaluated on its fold's test
patients, then pooled over folds and compared, paired, with a reference arm.

    python -m tlunet.study cpu_transfer --data-root /tmp/lgg/kaggle_3m [--out DIR] [--jobs N]

A study is a YAML file (``conf/study/<name>.yaml``, or a path): ``common`` overrides for every
run, ``folds`` (``data.num_folds``), ``arms`` (name -> overrides) and the ``reference`` arm.
Each run is ``python -m tlunet.train`` in ``<out>/<arm>/fold<k>/``; the command is resumable:
run it again after a stop and finished runs are skipped, a run stopped part way continues
from its ``last.ckpt`` (``resume=``), and missing evaluations are made. Every patient is a test
patient in exactly one fold, so pooling the folds' ``per_patient.csv`` gives one score per
patient and arm, and ``tlunet.compare`` pairs them across arms. ``--jobs N`` runs N (arm, fold)
jobs at once (several small models share one GPU well; on a CPU keep 1: the runs have a
wall-time budget).

Writes ``<out>/study.md`` and ``<out>/study.json`` (per-fold and pooled results, epochs and
training time, the paired comparisons, the commands, the machine and the commit),
``<out>/<arm>/pooled/`` (the arm's pooled ``per_patient.csv``) and
``<out>/compare/<reference>_vs_<arm>/`` (``tlunet.compare``'s files). Exit status 1 when a run
failed (the others still run; the failures are listed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tlunet.artifacts import (
    EVALUATION_FILE,
    METRICS_FILE,
    PER_PATIENT_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    patient_counts,
)
from tlunet.cli import returns_status
from tlunet.compare import compare
from tlunet.errors import TlunetError
from tlunet.stats import global_dice, global_dice_ci, mean_ci
from tlunet.utils import csv_text, environment_info, write_json_atomic, write_text_atomic

CONF_STUDIES = Path(str(resources.files("tlunet.conf") / "study"))


def load_spec(name_or_path: str) -> dict[str, Any]:
    """A study spec from ``conf/study/<name>.yaml`` or a YAML path, checked."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF_STUDIES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_STUDIES.glob("*.yaml"))
        raise TlunetError(f"Study '{name_or_path}' not found ({path}); known studies: {known}.")
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        raise TlunetError(f"Cannot read study file '{path}': {exc}") from exc
    for key in ("name", "folds", "arms", "reference"):
        if key not in (spec or {}):
            raise TlunetError(f"Study file '{path}' lacks '{key}'.")
    if spec["reference"] not in spec["arms"]:
        raise TlunetError(f"Study '{path}': reference '{spec['reference']}' is not an arm.")
    spec.setdefault("common", [])
    spec["path"] = str(path)
    return spec


def _run(args: list[str], log: Path) -> int:
    """Run ``python -m <args>`` with its output appended to ``log``; its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ python -m {shlex.join(args)}\n")
        f.flush()
        return subprocess.run(
            [sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, check=False
        ).returncode


def train_command(
    spec: dict[str, Any], arm: str, fold: int, root: str, run_dir: Path, extra: list[str]
) -> list[str]:
    """The ``tlunet.train`` arguments of one run: started fresh, or resumed from last.ckpt."""
    if (run_dir / RUN_CONFIG_FILE).is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file():
        return ["tlunet.train", f"resume={run_dir}"]
    return [
        "tlunet.train",
        *spec["common"],
        *spec["arms"][arm],
        *extra,
        f"data.root={root}",
        f"data.num_folds={spec['folds']}",
        f"data.fold={fold}",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
    ]


def run_job(
    spec: dict[str, Any], arm: str, fold: int, root: str, out: Path, extra: list[str]
) -> str | None:
    """Train (or resume, or skip) and evaluate one (arm, fold); a failure message or None."""
    run_dir = (out / arm / f"fold{fold}").resolve()
    log = out / "logs" / f"{arm}_fold{fold}.log"
    if not (run_dir / METRICS_FILE).is_file():
        command = train_command(spec, arm, fold, root, run_dir, extra)
        print(f"[{time.strftime('%H:%M:%S')}] {arm} fold {fold}: {shlex.join(command)}", flush=True)
        status = _run(command, log)
        if status != 0 or not (run_dir / METRICS_FILE).is_file():
            return f"{arm} fold {fold}: tlunet.train exited {status} (see {log})"
    eval_dir = run_dir / "evaluation"
    if not (eval_dir / PER_PATIENT_FILE).is_file():
        # On the device the run trained on: a GPU run's evaluation on the CPU is slow.
        trainer = OmegaConf.load(run_dir / RUN_CONFIG_FILE).get("trainer") or {}
        accelerator = "gpu" if trainer.get("accelerator") in ("gpu", "cuda") else "cpu"
        status = _run(
            [
                "tlunet.evaluate",
                f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                f"accelerator={accelerator}",
                f"hydra.run.dir={eval_dir}",
            ],
            log,
        )
        if status != 0:
            return f"{arm} fold {fold}: tlunet.evaluate exited {status} (see {log})"
    return None


def run_study(
    spec: dict[str, Any],
    root: str,
    out: Path,
    folds: list[int] | None = None,
    arms: list[str] | None = None,
    extra: list[str] | None = None,
    jobs: int = 1,
    command: str | None = None,
    run: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every (fold, arm) not done yet, fold by fold (``jobs`` at once);
    pool and compare what is done (only that with ``run=False``)."""
    folds = list(range(spec["folds"])) if folds is None else folds
    arms = list(spec["arms"]) if arms is None else arms
    unknown = [a for a in arms if a not in spec["arms"]]
    if unknown:
        raise TlunetError(f"Unknown arms {unknown}; the study has {list(spec['arms'])}.")
    bad = [f for f in folds if not 0 <= f < spec["folds"]]
    if bad:
        raise TlunetError(f"Folds {bad} do not exist: the study has {spec['folds']} (0..).")
    work = [(arm, fold) for fold in folds for arm in arms] if run else []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool_:
        results = pool_.map(lambda job: run_job(spec, job[0], job[1], root, out, extra or []), work)
        failures = [r for r in results if r]
    summary = summarise(spec, out, folds, arms)
    summary["failures"] = failures
    summary["command"] = command or f"python -m tlunet.study {spec['name']}"
    write_json_atomic(out / "study.json", summary)
    write_text_atomic(out / "study.md", markdown(summary))
    return summary


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pool(out: Path, arm: str, folds: list[int]) -> Path | None:
    """Concatenate the arm's per-fold ``per_patient.csv`` into ``<out>/<arm>/pooled/``;
    ``None`` unless every fold is evaluated."""
    tables = [out / arm / f"fold{k}" / "evaluation" / PER_PATIENT_FILE for k in folds]
    if not all(t.is_file() for t in tables):
        return None
    rows = [row for t in tables for row in _read_rows(t)]
    names = [r["patient"] for r in rows]
    if len(set(names)) != len(names):
        raise TlunetError(f"Arm {arm}: a patient is a test patient of two folds: {names}")
    header = list(rows[0])
    pooled = out / arm / "pooled"
    write_text_atomic(pooled / PER_PATIENT_FILE, csv_text(header, [list(r.values()) for r in rows]))
    write_json_atomic(
        pooled / EVALUATION_FILE,
        {"checkpoint": f"{arm}: folds {folds} pooled", "sources": [str(t) for t in tables]},
    )
    return pooled


def pooled_metrics(pooled: Path) -> dict[str, Any]:
    """Mean and median per-patient Dice, global Dice (from the patients' pixel counts), with
    bootstrap 95 % intervals over patients."""
    rows = _read_rows(pooled / PER_PATIENT_FILE)
    dice = np.array([float(r["dice"]) for r in rows])
    tp, fp, fn = (np.array(c) for c in patient_counts(rows))
    low, high = mean_ci(dice)
    g_low, g_high = global_dice_ci(tp, fp, fn)
    return {
        "patients": len(rows),
        "dice_per_patient": float(dice.mean()),
        "dice_per_patient_median": float(np.median(dice)),
        "dice_per_patient_ci95": [low, high],
        "dice": global_dice(tp, fp, fn),
        "dice_ci95": [g_low, g_high],
    }


def summarise(spec: dict[str, Any], out: Path, folds: list[int], arms: list[str]) -> dict:
    """Per-fold rows, pooled metrics and paired comparisons of what is done so far."""
    per_fold = []
    for arm in arms:
        for fold in folds:
            run_dir = out / arm / f"fold{fold}"
            row: dict[str, Any] = {"arm": arm, "fold": fold, "complete": False}
            metrics_file = run_dir / "evaluation" / METRICS_FILE
            if metrics_file.is_file() and (run_dir / RUN_INFO_FILE).is_file():
                metrics = json.loads(metrics_file.read_text())
                info = json.loads((run_dir / RUN_INFO_FILE).read_text())
                row |= {
                    "complete": True,
                    "test_patients": metrics.get("test/num_patients"),
                    "dice_per_patient": metrics.get("test/dice_per_patient"),
                    "dice_per_patient_ci95": [
                        metrics.get("test/dice_per_patient_ci95_low"),
                        metrics.get("test/dice_per_patient_ci95_high"),
                    ],
                    "dice": metrics.get("test/dice"),
                    "best_val": info.get("best_score"),
                    "epochs": info.get("epochs"),
                    "train_time_s": info.get("train_time_s"),
                    "encoder_weights_source": (info.get("encoder_weights_source") or {}).get(
                        "source"
                    ),
                    "git_commit": (info.get("environment") or {}).get("git_commit"),
                }
            per_fold.append(row)
    pooled: dict[str, Any] = {}
    pooled_dirs: dict[str, Path] = {}
    for arm in arms:
        directory = pool(out, arm, folds)
        if directory is not None:
            pooled_dirs[arm] = directory
            pooled[arm] = pooled_metrics(directory)
    comparisons = {}
    reference = spec["reference"]
    if reference in pooled_dirs:
        for arm in arms:
            if arm != reference and arm in pooled_dirs:
                result = compare(
                    pooled_dirs[reference],
                    pooled_dirs[arm],
                    out / "compare" / f"{reference}_vs_{arm}",
                )
                comparisons[arm] = {
                    "dice": result["scores"]["dice"],
                    "verdict": result["verdict"],
                }
    return {
        "study": spec["name"],
        "spec": spec,
        "folds": folds,
        "arms": arms,
        "reference": reference,
        "per_fold": per_fold,
        "pooled": pooled,
        "comparisons": comparisons,
        "environment": environment_info(),
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _ci(ci: list | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(summary: dict[str, Any]) -> str:
    ref = summary["reference"]
    lines = [
        f"# Study {summary['study']}",
        "",
        f"Command: `{summary['command']}`; machine: {summary['cpu_model']} "
        f"({summary['environment']['cpu_count']} CPUs); commit "
        f"{summary['environment']['git_commit']}.",
        "",
        "## Pooled over folds (every patient scored once, by the model it was a test patient of)",
        "",
        "| arm | patients | Dice per patient [95 % CI] | median | Dice (all pixels) [95 % CI] "
        f"| difference vs {ref} [95 % CI] | Wilcoxon p |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in summary["arms"]:
        p = summary["pooled"].get(arm)
        if p is None:
            lines.append(f"| {arm} | incomplete | | | | | |")
            continue
        c = summary["comparisons"].get(arm, {}).get("dice")
        diff = (
            f"{c['mean_difference']:+.3f} [{c['ci95_low']:+.3f}, {c['ci95_high']:+.3f}]"
            if c
            else "reference"
            if arm == ref
            else ""
        )
        lines.append(
            f"| {arm} | {p['patients']} | {p['dice_per_patient']:.3f}"
            f"{_ci(p['dice_per_patient_ci95'])} | {p['dice_per_patient_median']:.3f} "
            f"| {p['dice']:.3f}{_ci(p['dice_ci95'])} | {diff} "
            f"| {_f(c['wilcoxon_p'], '{:.3g}') if c else ''} |"
        )
    lines += [
        "",
        "## Per fold",
        "",
        "| arm | fold | test patients | Dice per patient [95 % CI] | Dice | best val | epochs "
        "| train time (min) | encoder weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["per_fold"]:
        if not r["complete"]:
            lines.append(f"| {r['arm']} | {r['fold']} | incomplete | | | | | | |")
            continue
        lines.append(
            f"| {r['arm']} | {r['fold']} | {_f(r['test_patients'], '{:.0f}')} "
            f"| {_f(r['dice_per_patient'])}{_ci(r['dice_per_patient_ci95'])} | {_f(r['dice'])} "
            f"| {_f(r['best_val'])} | {r['epochs']} | {_f(r['train_time_s'] / 60, '{:.1f}')} "
            f"| {r['encoder_weights_source'] or 'none (from scratch)'} |"
        )
    if summary.get("failures"):
        lines += ["", "## Failures", ""] + [f"- {f}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


@returns_status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlunet.study", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("study", help="a study name (conf/study/<name>.yaml) or a YAML file")
    parser.add_argument("--data-root", required=True, help="the kaggle_3m folder")
    parser.add_argument("--out", help="study folder (default: outputs/studies/<name>)")
    parser.add_argument("--folds", help="only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--arms", help="only these arms, comma-separated (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="(arm, fold) runs at once (1)")
    parser.add_argument(
        "--no-run", action="store_true", help="only summarise the runs already done"
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra tlunet.train overrides for new runs (key=value)"
    )
    args = parser.parse_args(argv)
    spec = load_spec(args.study)
    if not Path(args.data_root).is_dir():
        raise TlunetError(f"--data-root '{args.data_root}' is not a folder.")
    base = Path(os.environ.get("TLUNET_OUTPUT_DIR", "outputs"))
    out = Path(args.out) if args.out else base / "studies" / spec["name"]
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    arms = args.arms.split(",") if args.arms else None
    command = "python -m tlunet.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    summary = run_study(
        spec,
        args.data_root,
        out,
        folds,
        arms,
        args.overrides,
        args.jobs,
        command,
        run=not args.no_run,
    )
    print(f"Study written to {out}: study.md, study.json")
    for failure in summary["failures"]:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
