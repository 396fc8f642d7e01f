"""Paired comparison of two models on the same patients:
``python -m tlunet.compare EVAL_A EVAL_B [--output DIR]``.

EVAL_A and EVAL_B are ``tlunet.evaluate`` directories (each holding ``per_patient.csv``) of
two checkpoints on the same patients. For each per-patient score (Dice, IoU, HD95, volume
similarity) the comparison pairs the patients, and reports the mean of each model, the mean
paired difference B - A with its bootstrap 95 % interval (10,000 resamples of the patients,
percentile method, seed 0), the Wilcoxon signed-rank p-value (two-sided), and how many
patients B wins, loses and ties. With 6-30 test patients the seed alone moves a mean Dice by
about 0.05: a difference whose interval contains 0 is not evidence either way.

Writes ``compare.json``, ``compare.md`` and ``compare.png`` (each patient's Dice under A and
under B, joined by a line) into ``--output`` (default ``outputs/comparisons/<A>_vs_<B>`` under
``$TLUNET_OUTPUT_DIR`` or ``outputs``). Refused, with one line, when the two evaluations do not
hold the same patients, or scored them against different masks.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tlunet.artifacts import EVALUATION_FILE, PER_PATIENT_FILE
from tlunet.cli import returns_status
from tlunet.errors import TlunetError
from tlunet.stats import mean_ci, wilcoxon_p
from tlunet.utils import write_json_atomic, write_text_atomic

#: per_patient.csv columns compared, and whether higher is better.
SCORES = {"dice": True, "iou": True, "hd95_px": False, "volume_similarity": True}


def read_evaluation(path: Path) -> dict[str, Any]:
    """An evaluation directory's per-patient rows (by patient) and its metadata."""
    if not path.is_dir():
        raise TlunetError(f"'{path}' is not a folder: pass two tlunet.evaluate directories.")
    table = path / PER_PATIENT_FILE
    if not table.is_file():
        raise TlunetError(
            f"'{path}' holds no per_patient.csv: not a tlunet.evaluate directory, or one of a "
            "slice-level split (data.split=paper), which has no per-patient scores."
        )
    try:
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        patients = {
            r["patient"]: {
                "tumour_pixels_true": int(r["tumour_pixels_true"]),
                **{k: float(r[k]) if r[k] not in ("", None) else math.nan for k in SCORES},
            }
            for r in rows
        }
    except (KeyError, ValueError) as exc:
        raise TlunetError(f"Cannot read '{table}': {type(exc).__name__}: {exc}") from exc
    if not patients:
        raise TlunetError(f"'{table}' lists no patients.")
    info: dict[str, Any] = {}
    if (path / EVALUATION_FILE).is_file():
        info = json.loads((path / EVALUATION_FILE).read_text())
    return {"path": str(path), "patients": patients, "info": info}


def check_pairable(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The shared patients, sorted; :class:`TlunetError` if the sets or the truths differ."""
    only_a = sorted(set(a["patients"]) - set(b["patients"]))
    only_b = sorted(set(b["patients"]) - set(a["patients"]))
    if only_a or only_b:
        raise TlunetError(
            f"The evaluations hold different patients: {len(only_a)} only in {a['path']} "
            f"(e.g. {only_a[:2]}), {len(only_b)} only in {b['path']} (e.g. {only_b[:2]}). "
            "Evaluate both checkpoints on the same stage of the same split."
        )
    names = sorted(a["patients"])
    differ = [
        n
        for n in names
        if a["patients"][n]["tumour_pixels_true"] != b["patients"][n]["tumour_pixels_true"]
    ]
    if differ:
        n = differ[0]
        raise TlunetError(
            f"Patient {n} has {a['patients'][n]['tumour_pixels_true']} true tumour pixels in "
            f"{a['path']} but {b['patients'][n]['tumour_pixels_true']} in {b['path']}: the "
            "evaluations scored against different masks (other data, or made before tlunet "
            "scored at native resolution). Re-evaluate both."
        )
    return names


def paired(a: dict[str, Any], b: dict[str, Any], names: list[str], key: str) -> dict[str, Any]:
    """Paired statistics of score ``key``: means, differences, interval and p over the patients
    where both values are finite. An infinite HD95 (a tumour missed entirely, or one predicted
    where there is none) is the worst score: such patients are counted per model
    (``infinite_a``, ``infinite_b``) and in the wins and losses, never dropped silently. A
    ``nan`` (nothing to measure for either) is left out."""
    x_all = np.array([a["patients"][n][key] for n in names], dtype=np.float64)
    y_all = np.array([b["patients"][n][key] for n in names], dtype=np.float64)
    higher = SCORES[key]
    # Wins and losses with inf as the worst value; nan pairs are not comparable.
    comparable = ~(np.isnan(x_all) | np.isnan(y_all))
    worst = -np.inf if higher else np.inf
    xw = np.where(np.isinf(x_all), worst, x_all)[comparable]
    yw = np.where(np.isinf(y_all), worst, y_all)[comparable]
    finite = np.isfinite(x_all) & np.isfinite(y_all)
    x, y = x_all[finite], y_all[finite]
    counts = {
        "infinite_a": int(np.isinf(x_all).sum()),
        "infinite_b": int(np.isinf(y_all).sum()),
        "b_better": int(((yw > xw) if higher else (yw < xw)).sum()),
        "b_worse": int(((yw < xw) if higher else (yw > xw)).sum()),
        "ties": int((yw == xw).sum()),
    }
    if len(x) == 0:
        return {"patients": 0, **counts}
    d = y - x
    low, high = mean_ci(d)
    return {
        "patients": int(len(x)),
        "excluded_not_finite": int((~finite).sum()),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "mean_difference": float(d.mean()),
        "median_difference": float(np.median(d)),
        "ci95_low": low,
        "ci95_high": high,
        "wilcoxon_p": wilcoxon_p(d),
        **counts,
        "higher_is_better": higher,
    }


def _label(evaluation: dict[str, Any]) -> str:
    info = evaluation["info"]
    return info.get("checkpoint") or evaluation["path"]


def markdown(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    lines = [
        "# tlunet paired comparison",
        "",
        f"- A: `{a['path']}` (checkpoint `{a['label']}`)",
        f"- B: `{b['path']}` (checkpoint `{b['label']}`)",
        f"- {result['patients']} patients, paired; difference = B - A; 95 % interval: "
        "bootstrap over patients (10,000 resamples, percentile); p: Wilcoxon signed-rank, "
        "two-sided.",
        "",
        "| score | patients | mean A | mean B | mean difference (B - A) | 95 % interval "
        "| Wilcoxon p | B better / worse / tied | infinite in A / B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in result["scores"].items():
        wins = f"{s['b_better']} / {s['b_worse']} / {s['ties']}"
        infinite = f"{s['infinite_a']} / {s['infinite_b']}"
        if not s.get("patients"):
            lines.append(f"| {key} | 0 | n/a | n/a | n/a | n/a | n/a | {wins} | {infinite} |")
            continue
        lines.append(
            f"| {key} | {s['patients']} | {s['mean_a']:.4f} | {s['mean_b']:.4f} "
            f"| {s['mean_difference']:+.4f} | [{s['ci95_low']:+.4f}, {s['ci95_high']:+.4f}] "
            f"| {s['wilcoxon_p']:.3g} | {wins} | {infinite} |"
        )
    dice = result["scores"]["dice"]
    lines += ["", result["verdict"], ""]
    if dice.get("patients", 0) < 10:
        lines.append(
            f"Only {dice.get('patients', 0)} patients: the interval is wide and the Wilcoxon "
            "test cannot reach p < 0.05 with fewer than 6 pairs."
        )
    lines += [
        "",
        "HD95 is in pixels, lower is better. An infinite HD95 (a tumour missed entirely, or one "
        "predicted where there is none) counts as the worst value in the wins and losses and "
        "is listed per model; the means, interval and p are over the patients finite in both.",
    ]
    return "\n".join(lines) + "\n"


def verdict(dice: dict[str, Any]) -> str:
    if not dice.get("patients"):
        return "No patient has a Dice under both models."
    low, high = dice["ci95_low"], dice["ci95_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return "Too few patients for an interval."
    if low > 0:
        return f"Per-patient Dice: B is better than A (interval [{low:+.4f}, {high:+.4f}] > 0)."
    if high < 0:
        return f"Per-patient Dice: B is worse than A (interval [{low:+.4f}, {high:+.4f}] < 0)."
    return f"Per-patient Dice: no difference shown (interval [{low:+.4f}, {high:+.4f}] contains 0)."


def plot(a: dict[str, Any], b: dict[str, Any], names: list[str], path: Path) -> Path:
    """Each patient's Dice under A and B, joined by a line (green: B better, red: worse)."""
    import matplotlib.pyplot as plt

    from tlunet.viz import save_figure  # sets the Agg backend

    x = [a["patients"][n]["dice"] for n in names]
    y = [b["patients"][n]["dice"] for n in names]
    fig, ax = plt.subplots(figsize=(4.2, 4.5))
    for xa, yb in zip(x, y, strict=True):
        color = "tab:green" if yb > xa else "tab:red" if yb < xa else "grey"
        ax.plot([0, 1], [xa, yb], color=color, alpha=0.7, marker="o", markersize=4)
    ax.plot([0, 1], [np.mean(x), np.mean(y)], color="black", linewidth=2.5, label="mean")
    ax.set_xticks([0, 1], ["A", "B"])
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice per patient (native resolution)")
    ax.set_title(f"Paired per-patient Dice ({len(names)} patients)", fontsize=9)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def compare(path_a: str | Path, path_b: str | Path, output: str | Path | None = None) -> dict:
    """Compare two evaluation directories; write the files; return ``compare.json``'s data."""
    a, b = read_evaluation(Path(path_a)), read_evaluation(Path(path_b))
    names = check_pairable(a, b)
    if output is None:
        base = Path(os.environ.get("TLUNET_OUTPUT_DIR", "outputs"))
        output = base / "comparisons" / f"{Path(path_a).name}_vs_{Path(path_b).name}"
    out = Path(output)
    scores = {key: paired(a, b, names, key) for key in SCORES}
    result = {
        "a": {"path": a["path"], "label": _label(a)},
        "b": {"path": b["path"], "label": _label(b)},
        "patients": len(names),
        "patient_names": names,
        "difference": "B - A",
        "bootstrap": "10,000 resamples of the patients, percentile 95 % interval, seed 0",
        "scores": scores,
        "verdict": verdict(scores["dice"]),
        "per_patient": [
            {"patient": n, "dice_a": a["patients"][n]["dice"], "dice_b": b["patients"][n]["dice"]}
            for n in names
        ],
    }
    write_json_atomic(out / "compare.json", result)
    write_text_atomic(out / "compare.md", markdown(result))
    plot(a, b, names, out / "compare.png")
    result["output"] = str(out)
    return result


@returns_status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tlunet.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("eval_a", help="evaluation directory of model A (outputs/evaluations/...)")
    parser.add_argument("eval_b", help="evaluation directory of model B, on the same patients")
    parser.add_argument("--output", help="where to write compare.{json,md,png}")
    args = parser.parse_args(argv)
    result = compare(args.eval_a, args.eval_b, args.output)
    print(result["verdict"])
    print(f"Written to {result['output']}: compare.json, compare.md, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
