"""The ending of ``python -m tlunet.train``: one table of the test metrics that tell models
apart, each with a few words on what it computes, then where the run's files are and the next
commands to try. Every metric is in ``metrics.json``; this table is the short version."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tlunet.artifacts import METRICS_FILE, RUN_CONFIG_FILE, RUN_INFO_FILE

#: The test metrics shown, most telling first, with what each computes (the full definitions
#: are in ``tlunet.metrics`` and docs/metrics.md).
HEADLINE_METRICS: tuple[tuple[str, str], ...] = (
    ("dice_per_patient", "Dice of each patient's volume, mean"),
    ("dice_per_patient_median", "the same, median over patients"),
    ("dice", "Dice of all tumour pixels pooled"),
    ("detect_sensitivity", "tumour slices with a tumour drawn"),
    ("detect_specificity", "tumour-free slices left empty"),
    ("dice_per_image", "Dice of each slice, mean"),
)


def _value(value: Any) -> str:
    if value is None:
        return "not applicable"
    return f"{float(value):.3f}"


def summary_table(
    metrics: Mapping[str, Any], stage: str = "test", tested: str = "best checkpoint"
) -> Table | None:
    """The table of :data:`HEADLINE_METRICS` found in ``metrics`` (keys ``<stage>/<name>``)."""
    rows = [
        (name, _value(metrics[f"{stage}/{name}"]), meaning)
        for name, meaning in HEADLINE_METRICS
        if f"{stage}/{name}" in metrics
    ]
    if not rows:
        return None
    patients = metrics.get(f"{stage}/num_patients")
    slices = metrics.get(f"{stage}/num_slices")
    size = ""
    if slices is not None:
        size = f": {int(slices)} slices"
        if patients is not None:
            size += f" of {int(patients)} patients"
    table = Table(title=f"Test stage{size} ({tested}, native resolution)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("what it computes")
    for row in rows:
        table.add_row(*row)
    return table


def print_run_summary(result: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the ending of a training run: the table, the run's files, the next commands."""
    console = console or Console()
    metrics = result.get("metrics") or {}
    table = summary_table(metrics, tested=result.get("tested", "best checkpoint"))
    if table is not None:
        console.print(table)
        console.print(
            f"All {len(metrics)} test metrics (IoU, the paper's background-weighted 'Mean "
            "Dice', Keras-style batch Dice...) are in metrics.json."
        )
    run_dir = Path(result["run_dir"])
    files = [
        name
        for name in (METRICS_FILE, RUN_INFO_FILE, RUN_CONFIG_FILE, "predictions.png", "curves.png")
        if (run_dir / name).exists()
    ]
    console.print(
        f"Run directory: [bold]{run_dir}[/bold] ({', '.join(files)}, checkpoints/)",
        soft_wrap=True,  # a path is never broken across lines
    )
    best = run_dir / "checkpoints" / "best.ckpt"
    steps = []
    if (run_dir / "predictions.png").exists():
        steps.append(f"  see the test predictions:  {run_dir / 'predictions.png'}")
    if best.exists():
        steps.append(f"  per-patient evaluation:    python -m tlunet.evaluate ckpt_path={best}")
    if result.get("synthetic"):
        steps.append(
            "  the real data (the Kaggle 'lgg-mri-segmentation' set, unzipped so that "
            "kaggle_3m/ exists), with ImageNet weights that install offline:\n"
            "    python -m tlunet.train encoder=efficientnet_lite0 data.root=/path/to/kaggle_3m"
        )
    if steps:
        console.print("Next:\n" + "\n".join(steps), highlight=False, soft_wrap=True)
