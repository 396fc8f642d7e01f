"""The benchmarks' report: the results as markdown tables, and how the performance targets
(``benchmarks/targets.yaml``) stand on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS_FILE = Path(__file__).with_name("targets.yaml")


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``columns`` of ``rows``."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def load_targets(path: Path = TARGETS_FILE) -> dict[str, Any]:
    """The performance targets (``benchmarks/targets.yaml``)."""
    import yaml

    return yaml.safe_load(path.read_text())


def evaluate_targets(
    results: dict[str, Any], targets: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """How each performance target (``benchmarks/targets.yaml``) stands on these figures."""
    t = targets or load_targets()
    out = []
    step = t["lightning_vs_bare"]
    for pair in results.get("train_pairs", []):
        if pair["batch_size"] == step["batch_size"] and pair["image_size"] == step["image_size"]:
            out.append(
                {
                    "target": f"Lightning >= {step['min_ratio']}x bare loop ({pair['encoder']}, "
                    f"b{step['batch_size']}, {step['image_size']} px"
                    + (", channels-last)" if pair.get("channels_last") else ")"),
                    "value": pair["ratio"],
                    "met": pair["ratio"] >= step["min_ratio"],
                }
            )
    pipe = t["data_vs_training"]
    data = [
        r
        for r in results.get("data", [])
        if r["pipeline"] == "tlunet" and r["workers"] == pipe["workers"]
    ]
    train = [r for r in results.get("train", []) if r["loop"] == "lightning"]
    if data and train:
        size = data[0]["image_size"]
        same = [r["images_per_s"] for r in train if r["image_size"] == size]
        if same:
            need = pipe["min_factor"] * max(same)
            out.append(
                {
                    "target": f"data, {pipe['workers']} workers >= {pipe['min_factor']}x fastest "
                    f"model's training images/s ({size} px)",
                    "value": f"{data[0]['samples_per_s']} vs {pipe['min_factor']} x {max(same)} "
                    f"= {need:.1f}",
                    "met": data[0]["samples_per_s"] >= need,
                }
            )
    warm = t["warm_start"]
    for row in results.get("start", []):
        if row["start"] == "warm" and row["slices"] == warm["slices"]:
            out.append(
                {
                    "target": f"warm start over {warm['slices']} slices < {warm['max_s']} s",
                    "value": row["total_s"],
                    "met": row["total_s"] < warm["max_s"],
                }
            )
    sample = t["sample_evaluation"]
    for row in results.get("inference", []):
        if row["command"].startswith("tlunet.evaluate") and results.get("real_data"):
            out.append(
                {
                    "target": "evaluation of the 40-patient sample, 128 px ResNet18 U-Net < "
                    f"{sample['max_s']} s",
                    "value": row["seconds"],
                    "met": row["seconds"] < sample["max_s"],
                }
            )
    return out


def render(results: dict[str, Any]) -> str:
    """The report: the machine and the data, then a markdown table per section measured and
    one of the targets."""
    m = results["machine"]
    parts = [
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['memory_gb']} GiB, "
        f"bf16 instructions: {', '.join(m.get('cpu_bf16_flags') or []) or 'none'}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), device {m.get('gpu', m['device'])}",
        f"Data: {results['data_description']}",
        "",
    ]
    if results.get("data"):
        parts.append(
            _table(
                "Training data pipeline (decode, augment, collate)",
                results["data"],
                [
                    "pipeline",
                    "workers",
                    "image_size",
                    "batch_size",
                    "samples_per_s",
                    "first_batch_s",
                    "peak_rss_mb",
                    "workers_peak_rss_mb",
                ],
            )
        )
    if results.get("start"):
        parts.append(
            _table(
                "Cold and warm start (index + decoded-slice cache)",
                results["start"],
                ["root", "start", "slices", "index_s", "cache_s", "total_s", "peak_rss_mb"],
            )
        )
    if results.get("train"):
        parts.append(
            _table(
                "Training step: Lightning vs a bare PyTorch loop",
                results["train"],
                [
                    "loop",
                    "encoder",
                    "image_size",
                    "batch_size",
                    "precision",
                    "channels_last",
                    "compile",
                    "images_per_s",
                    "range",
                    "peak_rss_mb",
                    "peak_gpu_memory_mb",
                ],
            )
        )
        parts.append(
            _table(
                "Lightning / bare ratio",
                results["train_pairs"],
                [
                    "encoder",
                    "image_size",
                    "batch_size",
                    "precision",
                    "channels_last",
                    "compile",
                    "ratio",
                ],
            )
        )
    if results.get("inference"):
        parts.append(
            _table(
                "Inference",
                results["inference"],
                ["command", "slices", "seconds", "slices_per_s", "peak_rss_mb"],
            )
        )
    if results.get("targets"):
        rows = [{**t, "met": "yes" if t["met"] else "NO"} for t in results["targets"]]
        parts.append(_table("Targets", rows, ["target", "value", "met"]))
    return "\n".join(parts)
