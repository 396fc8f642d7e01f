"""Compare runs: ``python -m tlunet.report DIR`` writes ``report.md``, ``report.csv`` and
``report.png`` into DIR (or ``--output``).

Every folder under DIR holding a ``run.json`` is a run (a single run, a multirun's jobs, several
sweeps), and so is one that never got that far (a ``config.yaml`` beside ``.hydra/``, or a sweep
job's ``job_status.json``): it is listed as incomplete or failed, with the reason, and is in no
configuration's mean. ``report.csv`` has one row per run: model, encoder, split, seed, epochs, the test
metrics (the names of docs/metrics.md, fractions in [0, 1]), the best validation value, training time,
parameters, and the paper's Table 1 values (as fractions) where comparable. ``report.md``
groups runs that differ only in their seed into mean +- standard deviation, beside the paper.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlunet.artifacts import JOB_STATUS_FILE, METRICS_FILE, RUN_CONFIG_FILE, RUN_INFO_FILE
from tlunet.cli import returns_status
from tlunet.errors import TlunetError
from tlunet.paper import COMPARABLE, TABLE1, paper_label
from tlunet.sweeps import read_job_status
from tlunet.utils import write_text_atomic

#: Test metrics carried into the report, in column order.
METRICS = (
    "dice",
    "iou",
    "dice_keras_batch",
    "iou_keras_batch",
    "dice_mean_paper",
    "iou_mean_paper",
    "dice_per_patient",
    "dice_per_patient_median",
    "dice_per_image",
    "pixel_accuracy",
    "detect_accuracy",
    "detect_sensitivity",
    "detect_specificity",
    "loss",
)
#: Fields that identify a configuration; runs equal in these are seeds (or folds) of one
#: configuration. ``config_hash`` leaves out the seed and ``data.fold``.
GROUP_KEYS = (
    "model",
    "encoder",
    "encoder_weights",
    "split",
    "image_size",
    "config_hash",
    "scoring",
)
#: ``scoring`` of runs made before tlunet 0.2.0, which scored at the network's resolution.
OLD_SCORING = "network resolution (before tlunet 0.2.0)"


def _is_run_dir(folder: Path) -> bool:
    """A run directory: ``run.json`` (written when training ends), or, for a run that never got
    there, the ``config.yaml`` a run writes when it starts beside Hydra's ``.hydra/``, or the
    ``job_status.json`` of a sweep's job."""
    if (folder / RUN_INFO_FILE).is_file():
        return True
    if (folder / RUN_CONFIG_FILE).is_file():
        return (folder / ".hydra").is_dir() or (folder / JOB_STATUS_FILE).is_file()
    # A sweep job that stopped before writing config.yaml; a completed job without one wrote
    # its run elsewhere (resume=<run dir> through a sweep): not a run of its own.
    return read_job_status(folder).get("status") in ("failed", "running")


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (:func:`_is_run_dir`, complete or not), sorted by path."""
    candidates = {root} | {
        p.parent
        for name in (RUN_INFO_FILE, RUN_CONFIG_FILE, JOB_STATUS_FILE)
        for p in root.rglob(name)
    }
    return sorted(
        d
        for d in candidates
        if _is_run_dir(d) and not any(part.startswith(".") for part in d.relative_to(root).parts)
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TlunetError(f"Cannot read '{path}': {exc}") from exc


def _info_from_config(run_dir: Path) -> dict[str, Any]:
    """What ``run.json`` would say, from the ``config.yaml`` a run writes when it starts."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG_FILE), resolve=False)
    except Exception:  # a damaged config: the row still says the run is incomplete
        return {}
    model, encoder, data = (cfg.get(k) or {} for k in ("model", "encoder", "data"))
    return {
        "model": model.get("name"),
        "encoder": encoder.get("name"),
        "encoder_weights": encoder.get("weights"),
        "split": data.get("split"),
        "image_size": data.get("image_size"),
        "seed": cfg.get("seed"),
        "fold": data.get("fold") if data.get("num_folds") else None,
    }


def run_status(run_dir: Path, has_info: bool, has_metrics: bool) -> str:
    """``complete``, or why not: ``failed: <reason>`` (a sweep's job that stopped on an error)
    or ``incomplete: <what is known>``."""
    if has_metrics:
        return "complete"
    job = read_job_status(run_dir)
    if job.get("status") == "failed":
        return f"failed: {job.get('error', 'no reason recorded')}"
    if job.get("status") == "running":
        return "incomplete: started, never ended (killed, or still running); no metrics.json"
    if has_info:
        return "incomplete: trained but not tested (test=false, or the test stage failed)"
    return "incomplete: no metrics.json (stopped, killed or still running)"


def load_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One report row from a run directory's ``run.json`` and ``metrics.json`` (for a run that
    never finished, from its ``config.yaml``)."""
    has_info = (run_dir / RUN_INFO_FILE).is_file()
    info = _read_json(run_dir / RUN_INFO_FILE) if has_info else _info_from_config(run_dir)
    metrics_path = run_dir / METRICS_FILE
    metrics: dict[str, Any] = _read_json(metrics_path) if metrics_path.exists() else {}
    label = paper_label(info.get("model", ""), info.get("encoder", ""))
    row: dict[str, Any] = {
        "run": str(run_dir.relative_to(root)) or ".",
        "complete": bool(metrics),
        "status": run_status(run_dir, has_info, bool(metrics)),
        "model": info.get("model"),
        "encoder": info.get("encoder"),
        "encoder_weights": info.get("encoder_weights"),
        "split": info.get("split"),
        "image_size": info.get("image_size"),
        "seed": info.get("seed"),
        "fold": info.get("fold"),
        "epochs": info.get("epochs"),
        "monitor": info.get("monitor"),
        "best_val": info.get("best_score"),
        "train_time_s": info.get("train_time_s"),
        "parameters": info.get("parameters"),
        "paper_model": label,
        "aux_head": info.get("aux_head"),
        "config_hash": info.get("config_hash"),
        # Never averaged with runs scored otherwise (GROUP_KEYS).
        "scoring": "native" if (info.get("scoring") or {}).get("resolution") else OLD_SCORING,
    }
    for name in METRICS:
        row[name] = metrics.get(f"test/{name}")
    paper = TABLE1.get(label) if label else None
    for column, index in COMPARABLE.values():
        # The paper's Accuracy is its image-level head's: only comparable with ours from a head.
        comparable = paper and (column != "Accuracy" or row["aux_head"])
        row[f"paper_{column.lower().replace(' ', '_')}"] = (
            paper[index] / 100 if comparable else None
        )
    return row


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return None, None, 0
    std = statistics.stdev(clean) if len(clean) > 1 else None
    return statistics.fmean(clean), std, len(clean)


def group_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate complete runs sharing ``GROUP_KEYS``: mean and std of every metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["complete"]:
            groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        agg: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        agg["runs"] = len(members)
        agg["seeds"] = sorted({m["seed"] for m in members if m["seed"] is not None})
        agg["folds"] = sorted({m["fold"] for m in members if m["fold"] is not None})
        agg["paper_model"] = members[0]["paper_model"]
        agg["aux_head"] = members[0]["aux_head"]
        for name in (*METRICS, "best_val", "epochs", "train_time_s"):
            agg[name] = _mean_std([m[name] for m in members])
        agg["parameters"] = members[0]["parameters"]
        out.append(agg)
    return out


def _pct(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, _ = stat
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _num(value: Any, fmt: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value) if isinstance(value, float) else str(value)


def _paper(label: str | None, index: int) -> str:
    return f"{TABLE1[label][index]:.2f}" if label in TABLE1 else "—"


def _split_label(group: dict[str, Any]) -> str:
    folds = group.get("folds") or []
    return f"{group['split']} ({len(folds)} folds)" if folds else str(group["split"])


def markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]], root: Path) -> str:
    lines = [
        f"# tlunet report: {root}",
        "",
        f"{len(rows)} runs ({sum(r['complete'] for r in rows)} complete). Values are test-set "
        "percentages, mean ± standard deviation over the runs (seeds, or cross-validation folds) of "
        "one configuration.",
        "",
        "## Beside the paper's Table 1",
        "",
        "| model | encoder | split | runs | Mean Dice (ours: dice_keras_batch) | Mean Dice (paper) "
        "| Mean IoU (ours: iou_keras_batch) | Mean IoU (paper) "
        "| Accuracy (ours: detect_accuracy) | Accuracy (paper) | written-definition Mean Dice "
        "(dice_mean_paper) | tumour Dice | Dice per patient | epochs | train time (s) "
        "| parameters |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in sorted(groups, key=lambda g: -(g["dice_keras_batch"][0] or -1)):
        label = g["paper_model"]
        lines.append(
            f"| {g['model']} | {g['encoder']} | {_split_label(g)} | {g['runs']} "
            f"| {_pct(g['dice_keras_batch'])} | {_paper(label, 2)} "
            f"| {_pct(g['iou_keras_batch'])} | {_paper(label, 1)} "
            f"| {_pct(g['detect_accuracy'])} | {_paper(label, 0) if g['aux_head'] else '—'} "
            f"| {_pct(g['dice_mean_paper'])} "
            f"| {_pct(g['dice'])} | {_pct(g['dice_per_patient'])} "
            f"| {_num(g['epochs'][0], '{:.0f}')} | {_num(g['train_time_s'][0], '{:.0f}')} "
            f"| {_num(g['parameters'], '{:,}')} |"
        )
    incomplete = [r for r in rows if not r["complete"]]
    if incomplete:
        lines += [
            "",
            f"## Runs that did not complete ({len(incomplete)}, in no mean above)",
            "",
            *[
                f"- `{r['run']}` ({r['model']}, {r['encoder']}, seed {r['seed']}): {r['status']}"
                for r in incomplete
            ],
        ]
    lines += [
        "",
        "How to read it:",
        "- The paper's *Mean Dice/IoU* sit beside `dice_keras_batch`/`iou_keras_batch`: Dice and "
        "IoU of the soft predictions per batch of 32 slices, smoothed with 100, averaged over "
        "batches, the metric of the Keras notebooks whose 3005/393/531 split the paper uses. On a "
        "paper-protocol run they land on the paper's scale; the definition the paper writes "
        "(`dice_mean_paper`: background and tumour weighted by pixel share) does not: background "
        "is about 99 % of the pixels, so predicting no tumour at all already scores about 98 % "
        '(README: "Which metric is the paper\'s Mean Dice?").',
        "- *tumour Dice* (`dice`) and *Dice per patient* (`dice_per_patient`, mean over patient "
        "volumes, the dataset authors' metric) measure the tumour itself; they are the numbers to "
        "compare models by.",
        "- *Accuracy (paper)* cannot be pixel accuracy (that is > 99 % here); it is read as the "
        "image-level tumour / no-tumour accuracy, ours `detect_accuracy` (from the auxiliary head "
        'with `model.aux_head=true`, else from "predicted mask non-empty").',
        "- The paper split by slices (`split=paper`), which leaks neighbouring slices of a patient "
        "into the test set; `split=patient` numbers are lower and are the honest ones. The paper's "
        "Loss column is its own loss and is not compared.",
        "",
        "## All runs",
        "",
        "| run | model | encoder | split | seed | fold | epochs | "
        + " | ".join(METRICS)
        + " | best val | train time (s) |",
        "|" + "---|" * (9 + len(METRICS)),
    ]
    for r in rows:
        cells = [_num(r[m]) for m in METRICS]
        status = "" if r["complete"] else " (incomplete)"
        if r["scoring"] != "native":
            status += f" (scored at {r['scoring']})"
        lines.append(
            f"| {r['run']}{status} | {r['model']} | {r['encoder']} | {r['split']} | {r['seed']} | {_num(r['fold'])} "
            f"| {r['epochs']} | " + " | ".join(cells) + f" | {_num(r['best_val'])} "
            f"| {_num(r['train_time_s'], '{:.0f}')} |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def bar_chart(groups: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per configuration: Mean Dice (ours: dice_keras_batch; paper), tumour Dice,
    Dice per patient."""
    import matplotlib.pyplot as plt
    import numpy as np

    from tlunet.viz import save_figure  # sets the Agg backend

    groups = sorted(groups, key=lambda g: -(g["dice_keras_batch"][0] or -1))
    names = [f"{g['model']}\n{g['encoder']}" for g in groups]
    series = [
        ("Mean Dice (ours: dice_keras_batch)", [g["dice_keras_batch"] for g in groups]),
        (
            "Mean Dice (paper)",
            [
                (TABLE1[g["paper_model"]][2] / 100, None, 1)
                if g["paper_model"] in TABLE1
                else (None, None, 0)
                for g in groups
            ],
        ),
        ("tumour Dice", [g["dice"] for g in groups]),
        ("Dice per patient", [g["dice_per_patient"] for g in groups]),
    ]
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4.5))
    for i, (label, stats) in enumerate(series):
        means = [100 * s[0] if s[0] is not None else 0 for s in stats]
        errs = [100 * s[1] if s[1] is not None else 0 for s in stats]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=errs, label=label)
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("test set, %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("tlunet runs beside the paper's Table 1")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def write_report(root: str | Path, output: str | Path | None = None) -> dict[str, Path]:
    """Build the report of every run under ``root``; return the written files."""
    root = Path(root)
    if not root.is_dir():
        raise TlunetError(f"Run directory '{root}' does not exist or is not a folder.")
    runs = find_runs(root)
    if not runs:
        raise TlunetError(
            f"No runs under '{root}': expected folders holding run.json "
            "(outputs/runs/<run> or outputs/multiruns/<sweep>)."
        )
    rows = [load_run(d, root) for d in runs]
    groups = group_runs(rows)
    out = Path(output) if output else root
    files = {
        "md": write_text_atomic(out / "report.md", markdown(rows, groups, root)),
        "csv": write_text_atomic(out / "report.csv", to_csv(rows)),
    }
    if groups:
        files["png"] = bar_chart(groups, out / "report.png")
    incomplete = [r for r in rows if not r["complete"]]
    if incomplete:
        print(
            f"warning: {len(incomplete)} of {len(rows)} runs under '{root}' did not complete "
            "(listed in report.md with the reason; in no mean):",
            file=sys.stderr,
        )
        for r in incomplete:
            print(f"  {r['run']}: {r['status']}", file=sys.stderr)
    return files


@returns_status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlunet.report", description=__doc__)
    parser.add_argument("root", help="a run or (multi)run directory, e.g. outputs/multiruns/<date>")
    parser.add_argument("--output", help="where to write the report (default: the directory)")
    args = parser.parse_args(argv)
    files = write_report(args.root, args.output)
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
