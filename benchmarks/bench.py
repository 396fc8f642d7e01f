"""Benchmarks: where training and inference time goes, and what the framework itself costs.

    python -m benchmarks.bench                  # the real sample if TLUNET_DATA_ROOT is set
    python -m benchmarks.bench --data-root DIR  # any kaggle_3m folder
    python -m benchmarks.bench --device cuda    # GPU: fp32 vs mixed, channels_last on/off

Run from the repository's root (``make bench``, or ``tlunet-bench`` anywhere inside a clone).
The targets the figures are checked against are in ``benchmarks/targets.yaml``.

Sections (``--sections``):

- ``data``: samples/s of the training pipeline (cached decode, augmentation, collate) with 0, 1
  and 2 DataLoader workers, against a naive pipeline that opens both TIFFs with PIL for every
  sample and applies the same augmentation.
- ``start``: cold start (index + decoded-slice cache build) and warm start (index + cache
  open) on the benchmark data and on a synthetic set of 3929 slices, the full data set's size.
- ``train``: images/s of the Lightning training step (the framework's module, callbacks and
  loggers) against a bare PyTorch loop written here (same network, batch, loss, precision and
  Adam), and their ratio.
- ``infer``: slices/s of ``tlunet.evaluate`` over every slice and of ``tlunet.predict``.

Every measurement runs in its own process, which reports its peak resident memory (and that
of its DataLoader workers). The table is printed and written to ``bench.json`` and
``bench.md`` in ``--out`` (default ``outputs/bench/<time>``).

This module is the command; the measurements are in ``benchmarks/measure.py``, the report
(tables and targets) in ``benchmarks/render.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.measure import (
    FULL_SET_SLICES,
    REAL_DATA_ENV,
    SECTIONS,
    Step,
    bench_data_root,
    machine_info,
    run_isolated,
    run_sections,
)
from benchmarks.render import evaluate_targets, load_targets, render

#: The command, and the names other code imported from here before measure.py and render.py
#: held them: re-exported for one release (tlunet 0.3); import them from there.
__all__ = [
    "FULL_SET_SLICES",
    "SECTIONS",
    "cli",
    "evaluate_targets",
    "load_targets",
    "main",
    "parse_args",
    "render",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, its sections checked (and a visible GPU for ``--device cuda``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Benchmark the data pipeline, the training step and inference.",
    )
    parser.add_argument(
        "--data-root", help=f"a kaggle_3m folder (default: ${REAL_DATA_ENV}, else a synthetic set)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default outputs/bench/<time>)")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--image-size",
        type=int,
        default=128,
        help="side of the data, inference and second training measurement (px)",
    )
    parser.add_argument(
        "--small-size",
        type=int,
        default=64,
        help="side of the first training measurement (px); 0 skips it",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--encoders",
        default="resnet18,mobilenet_v2",
        help="encoders of the training measurements (the first one is also "
        "timed at --small-size and used for inference)",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="training precisions (default: 32-true,bf16-mixed on cpu, 32-true,mixed on cuda)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("false", "true", "both"),
        default="true",
        help="channels-last memory format in the training measurements",
    )
    parser.add_argument("--compile", action="store_true", help="also time model.compile=true")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternated bare/Lightning runs per case (median)"
    )
    parser.add_argument("--batches", type=int, default=100, help="batches per data measurement")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts")
    parser.add_argument(
        "--full-size",
        type=int,
        default=FULL_SET_SLICES,
        help="slices of the synthetic full-size set (start section)",
    )
    parser.add_argument(
        "--synthetic-patients",
        type=int,
        default=40,
        help="patients of the synthetic benchmark data (without real data)",
    )
    parser.add_argument("--predict-patients", type=int, default=4)
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible")
    return args


def _recording_step(console: Any, started: float, partial: Path, machine: dict[str, Any]) -> Step:
    """A ``Step`` that prints its label with the seconds since ``started``, runs the job in its
    own process and appends its result, with ``machine``, to ``partial`` before returning it."""

    def step(label: str, name: str, **kwargs: Any) -> dict[str, Any]:
        console.print(f"[dim]{time.perf_counter() - started:6.0f}s[/dim] {label}")
        result = run_isolated(name, **kwargs)
        # Each measurement is kept as soon as it exists: a bench cut short (a time limit, a
        # lost machine) still leaves its figures, with the machine, in bench.partial.jsonl.
        with open(partial, "a") as f:
            f.write(json.dumps({"label": label, "machine": machine, **result}) + "\n")
        return result

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sections of the command line, print the report and write it, with the figures,
    to ``bench.md`` and ``bench.json`` in the output folder; return the results."""
    from rich.console import Console

    from tlunet.utils import write_json_atomic, write_text_atomic

    args = parse_args(argv)
    console = Console()
    out = args.out or Path(os.environ.get("TLUNET_OUTPUT_DIR", "outputs")) / "bench" / (
        datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("TLUNET_CACHE_DIR", Path.home() / ".cache" / "tlunet")) / "bench"
    started = time.perf_counter()
    root, description = bench_data_root(args, cache)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.device),
        "data_root": root,
        "data_description": description,
        "real_data": bool(args.data_root or os.environ.get(REAL_DATA_ENV)),
    }
    partial = out / "bench.partial.jsonl"
    partial.unlink(missing_ok=True)
    step = _recording_step(console, started, partial, results["machine"])
    results.update(run_sections(args, root, out, cache, step))
    results["targets"] = evaluate_targets(results)
    results["total_s"] = round(time.perf_counter() - started, 1)
    text = render(results)
    write_json_atomic(out / "bench.json", results)
    write_text_atomic(out / "bench.md", f"`{results['command']}`\n\n{text}")
    partial.unlink(missing_ok=True)  # bench.json holds everything now
    print(text)
    console.print(
        f"Benchmark done in {results['total_s']:.0f} s: {out / 'bench.json'}, {out / 'bench.md'}"
    )
    return results


def cli() -> None:
    """``main`` with the command line (exit status 0); ``tlunet-bench`` ends here."""
    main()


if __name__ == "__main__":
    cli()
