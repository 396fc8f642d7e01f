"""The measurements of the benchmarks (``python -m benchmarks.bench``): the jobs, each run in a
process of its own that reports its peak resident memory, the data they run on, the machine
they run on, and the sections, which say which jobs run with what.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import multiprocessing as mp
import os
import platform
import resource
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

REPO_CONF = Path(str(importlib.resources.files("tlunet.conf")))
REAL_DATA_ENV = "TLUNET_DATA_ROOT"
FULL_SET_SLICES = 3929  # slices of the full kaggle_3m set (110 patients)
SECTIONS = ("data", "start", "train", "infer")

#: Runs the job named by its second argument with the keyword arguments, in its own process,
#: and returns its result; the first argument labels it in the progress lines.
Step = Callable[..., dict[str, Any]]


# -- helpers run in the measuring processes -------------------------------------------------------
def _compose(config_name: str, overrides: list[str]) -> Any:
    """The Hydra config ``config_name`` of the package's ``conf/`` with ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _data_overrides(root: str, image_size: int, batch_size: int, cache_dir: str) -> list[str]:
    """The overrides of the data config every job shares."""
    return [
        f"data.root={root}",
        f"data.image_size={image_size}",
        f"data.batch_size={batch_size}",
        f"data.cache_dir={cache_dir}",
    ]


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its (finished) children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


def _sync(device: str) -> None:
    """Wait for the GPU's queued work (``cuda``), so a clock reading follows it; else nothing."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class NaivePILDataset:
    """The baseline: open both TIFFs with PIL for every sample, then the same transform."""

    def __init__(self, records: list[Any], transform: Any) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        r = self.records[i]
        image = np.asarray(Image.open(r.image_path).convert("RGB"))
        mask = (np.asarray(Image.open(r.mask_path)) > 0).astype(np.uint8)
        out = self.transform(image=image, mask=mask)
        return {
            "image": out["image"].float(),
            "mask": out["mask"].unsqueeze(0).float(),
            "patient": torch.tensor(0),
            "slice": torch.tensor(r.slice),
            "row": torch.tensor(i),
        }


def job_data(
    root: str,
    image_size: int,
    batch_size: int,
    workers: int,
    naive: bool,
    batches: int,
    cache_dir: str,
) -> dict[str, Any]:
    """Samples/s of the training DataLoader (shuffled, augmented, collated)."""
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    cfg = _compose("train", _data_overrides(root, image_size, batch_size, cache_dir))
    cfg.data.num_workers = workers
    dm = instantiate(cfg.data)
    dm.setup("fit")
    loader = dm.train_dataloader()
    if naive:
        train = dm.datasets["train"]
        records = [dm.records[int(i)] for i in train.rows]
        loader = DataLoader(
            NaivePILDataset(records, train.transform),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
        )
    started = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_at = time.perf_counter()
    samples = 0
    for _ in range(batches - 1):
        try:
            batch = next(iterator)
        except StopIteration:  # a short data set: start another epoch
            iterator = iter(loader)
            batch = next(iterator)
        samples += len(batch["image"])
    ended = time.perf_counter()
    del iterator  # joins the workers, so their peak memory is counted below
    return {
        "pipeline": "naive PIL" if naive else "tlunet",
        "workers": workers,
        "image_size": image_size,
        "batch_size": batch_size,
        "samples": samples + len(first["image"]),
        "first_batch_s": round(first_at - started, 3),
        "samples_per_s": round(samples / (ended - first_at), 1),
    }


def job_start(root: str, cache_dir: str, warm: bool) -> dict[str, Any]:
    """Index + decoded-slice cache build (cold) or open (warm) of ``root``."""
    from tlunet.data.cache import decode_slices
    from tlunet.data.index import index_kaggle3m

    if not warm:
        shutil.rmtree(cache_dir, ignore_errors=True)
    started = time.perf_counter()
    records = index_kaggle3m(root)
    indexed = time.perf_counter()
    decoded = decode_slices(records, root, cache_dir)
    ended = time.perf_counter()
    return {
        "root": root,
        "start": "warm" if warm else "cold",
        "slices": len(records),
        "shape": list(decoded.images.shape[1:]),
        "index_s": round(indexed - started, 3),
        "cache_s": round(ended - indexed, 3),
        "total_s": round(ended - started, 3),
    }


def _fixed_batches(cfg: Any, count: int) -> list[dict[str, Any]]:
    """``count`` training batches (augmented, from the data), decoded once: the training
    measurements then time the step alone."""
    from hydra.utils import instantiate

    cfg = copy.deepcopy(cfg)
    cfg.data.num_workers = 0
    dm = instantiate(cfg.data)
    dm.setup("fit")
    distinct = []
    for batch in dm.train_dataloader():
        distinct.append(batch)
        if len(distinct) == 4:
            break
    return [distinct[i % len(distinct)] for i in range(count)]


def job_train(
    root: str,
    loop: str,
    encoder: str,
    image_size: int,
    batch_size: int,
    warmup: int,
    steps: int,
    device: str,
    precision: str,
    channels_last: bool,
    compile_net: bool,
    cache_dir: str,
    out_dir: str,
) -> dict[str, Any]:
    """Images/s of ``steps`` training steps after ``warmup`` steps: Lightning or a bare loop."""
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from tlunet.builders import _instantiate_dict, build_module, build_trainer, resolve_precision

    overrides = [
        *_data_overrides(root, image_size, batch_size, cache_dir),
        f"encoder={encoder}",
        "encoder.weights=null",
        f"paths.output_dir={out_dir}",
        f"trainer={'gpu' if device == 'cuda' else 'default'}",
        f"trainer.precision={precision}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "callbacks.early_stopping=null",  # no validation here: nothing to monitor
        "callbacks.prediction_figure=null",
    ]
    overrides += [f"model.channels_last={str(channels_last).lower()}"]
    overrides += ["model.compile=true"] if compile_net else []
    cfg = _compose("train", overrides)
    batches = _fixed_batches(cfg, warmup + steps)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    pl.seed_everything(0)
    net = instantiate(cfg.model.net)
    times: dict[str, float] = {}

    if loop == "lightning":

        class StepTimer(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == warmup:
                    _sync(device)
                    times["start"] = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx == warmup + steps - 1:
                    _sync(device)
                    times["end"] = time.perf_counter()

        module = build_module(cfg)
        callbacks = [*_instantiate_dict(cfg.callbacks), StepTimer()]
        trainer = build_trainer(cfg, callbacks, _instantiate_dict(cfg.logger))
        trainer.fit(module, train_dataloaders=loader)
        resolved = str(trainer.precision)
    else:
        resolved = resolve_precision(precision, "gpu" if device == "cuda" else "cpu")
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(resolved)
        net = net.to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        forward = torch.compile(net) if compile_net else net
        loss_fn = instantiate(cfg.loss)
        optimizer = instantiate(cfg.optimizer)(params=net.parameters())
        scaler = torch.amp.GradScaler(device, enabled=resolved == "16-mixed")
        net.train()
        for i, batch in enumerate(loader):
            if i == warmup:
                _sync(device)
                times["start"] = time.perf_counter()
            images = batch["image"].to(device, non_blocking=True)
            images = images.contiguous(memory_format=memory_format)
            masks = batch["mask"].to(device, non_blocking=True)
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = forward(images)
            loss = loss_fn(logits.float(), masks)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        _sync(device)
        times["end"] = time.perf_counter()
    result = {
        "loop": loop,
        "encoder": encoder,
        "image_size": image_size,
        "batch_size": batch_size,
        "precision": resolved,
        "channels_last": channels_last,
        "compile": compile_net,
        "steps": steps,
        "images_per_s": round(steps * batch_size / (times["end"] - times["start"]), 2),
    }
    if device == "cuda":
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def job_checkpoint(root: str, encoder: str, image_size: int, cache_dir: str, out_dir: str) -> dict:
    """A checkpoint of the model the inference section times (one training step)."""
    from tlunet.run import train

    cfg = _compose(
        "train",
        [
            *_data_overrides(root, image_size, 16, cache_dir),
            f"encoder={encoder}",
            "encoder.weights=null",
            "data.num_workers=0",
            f"paths.output_dir={out_dir}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "callbacks.progress_bar=null",
            "callbacks.prediction_figure=null",
            "logger=csv",
            "test=false",
        ],
    )
    train(cfg)
    return {"ckpt_path": str(Path(out_dir) / "checkpoints" / "last.ckpt")}


def job_evaluate(ckpt_path: str, root: str, device: str, out_dir: str) -> dict[str, Any]:
    """``tlunet.evaluate`` over every slice of ``root`` (stage=all)."""
    from tlunet.evaluate import evaluate

    cfg = _compose(
        "evaluate",
        [
            f"ckpt_path={ckpt_path}",
            f"data.root={root}",
            "stage=all",
            "eval.allow_seen_patients=true",  # a throughput measure, not a test
            f"accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            f"paths.output_dir={out_dir}",
        ],
    )
    started = time.perf_counter()
    metrics = evaluate(cfg)
    elapsed = time.perf_counter() - started
    slices = sum(1 for _ in open(Path(out_dir) / "per_slice.csv")) - 1
    return {
        "command": "tlunet.evaluate stage=all",
        "slices": slices,
        "seconds": round(elapsed, 2),
        "slices_per_s": round(slices / elapsed, 1),
        "dice_per_patient": metrics.get("all/dice_per_patient"),
    }


def job_predict(ckpt_path: str, folders: list[str], device: str, out_dir: str) -> dict[str, Any]:
    """``tlunet.predict`` on each patient folder in turn (masks, overlays, areas written)."""
    from tlunet.predict import predict
    from tlunet.slices import list_inputs

    slices = 0
    started = time.perf_counter()
    for i, folder in enumerate(folders):
        cfg = _compose(
            "predict",
            [
                f"ckpt_path={ckpt_path}",
                f"input={folder}",
                f"output={Path(out_dir) / str(i)}",
                f"accelerator={'gpu' if device == 'cuda' else 'cpu'}",
                "paths.output_dir=.",
            ],
        )
        predict(cfg)
        slices += len(list_inputs(Path(folder)))
    elapsed = time.perf_counter() - started
    return {
        "command": f"tlunet.predict x{len(folders)} patient folders",
        "slices": slices,
        "seconds": round(elapsed, 2),
        "slices_per_s": round(slices / elapsed, 1),
    }


#: The jobs by name: ``run_isolated`` passes the name, its measuring process looks it up here.
JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "data": job_data,
    "start": job_start,
    "train": job_train,
    "checkpoint": job_checkpoint,
    "evaluate": job_evaluate,
    "predict": job_predict,
}


# -- running a job in its own process -------------------------------------------------------------
def _child(name: str, kwargs: dict[str, Any], queue: Any) -> None:
    """The measuring process: job ``name`` of ``JOBS`` with ``kwargs``, its output silenced; puts
    ("ok", its result with the peak memory) or ("error", the traceback) on ``queue``."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # progress bars and prints of the measured code stay off the table
    os.dup2(devnull, 2)
    try:
        import logging

        logging.disable(logging.WARNING)  # keep the benchmark's output to its table
        import warnings

        warnings.filterwarnings("ignore")
        result = JOBS[name](**kwargs)
        own, children = _peak_rss_mb()
        result["peak_rss_mb"] = own
        if kwargs.get("workers"):  # DataLoader workers: the largest one's peak
            result["workers_peak_rss_mb"] = children
        queue.put(("ok", result))
    except BaseException:
        queue.put(("error", traceback.format_exc()))


def run_isolated(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run job ``name`` in a fresh process (its own peak memory); return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(name, kwargs, queue))
    process.start()
    while True:
        try:
            status, payload = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():  # killed (e.g. out of memory) before it could report
                raise RuntimeError(
                    f"benchmark job '{name}' died with exit code {process.exitcode}"
                ) from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark job '{name}' failed:\n{payload}")
    return payload


# -- the machine and the data ---------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """The machine the figures come from: CPU, memory, versions, commit and ``device``."""
    import torch

    import tlunet
    from tlunet.builders import cpu_bf16_flags
    from tlunet.utils import git_commit

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model or platform.processor(),
        "cpu_bf16_flags": cpu_bf16_flags(),  # amx_bf16 / avx512_bf16: bf16-mixed is fast
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tlunet": tlunet.__version__,
        "git_commit": git_commit(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench_data_root(args: argparse.Namespace, cache: Path) -> tuple[str, str]:
    """(root, description) of the data the data/train/infer sections use."""
    from tlunet.data.synthetic import write_synthetic_dataset

    root = args.data_root or os.environ.get(REAL_DATA_ENV)
    if root:
        if not Path(root).is_dir():
            raise SystemExit(f"tlunet bench error: data root '{root}' is not a folder.")
        return str(root), f"{root} (real)"
    size = args.synthetic_patients
    path = cache / f"synthetic-p{size}"
    write_synthetic_dataset(path, num_patients=size, slices_per_patient=(20, 52), seed=0)
    return str(path), f"synthetic, {size} patients (no {REAL_DATA_ENV} set)"


def _full_size_root(cache: Path, total: int) -> str:
    """A synthetic set of ``total`` slices in ``cache`` (written once), for the start section."""
    from tlunet.data.synthetic import seed_for_total_slices, write_synthetic_dataset

    patients, span = (110, (20, 52)) if total >= 110 * 20 else (max(1, total // 10), (3, 17))
    seed = seed_for_total_slices(patients, span, total)
    path = cache / f"synthetic-{total}"
    write_synthetic_dataset(path, num_patients=patients, slices_per_patient=span, seed=seed)
    return str(path)


# -- the sections ---------------------------------------------------------------------------------
def _start_section(
    args: argparse.Namespace, root: str, cache: Path, step: Step
) -> list[dict[str, Any]]:
    """Cold then warm start on the benchmark data and on the synthetic full-size set, each
    with a cache of its own, removed after."""
    full = _full_size_root(cache, args.full_size)
    rows = []
    for label, data_root in (("benchmark data", root), (f"{args.full_size} slices", full)):
        private = str(cache / "start-cache")
        rows.append(
            step(f"start: cold, {label}", "start", root=data_root, cache_dir=private, warm=False)
        )
        rows.append(
            step(f"start: warm, {label}", "start", root=data_root, cache_dir=private, warm=True)
        )
        shutil.rmtree(private, ignore_errors=True)
    return rows


def _data_section(
    args: argparse.Namespace, root: str, cache_dir: str, step: Step
) -> list[dict[str, Any]]:
    """The tlunet pipeline with each ``--workers`` count, then the naive PIL one (not with 1)."""
    rows = []
    for naive in (False, True):
        for workers in (int(w) for w in args.workers.split(",")):
            if naive and workers == 1:
                continue
            rows.append(
                step(
                    f"data: {'naive PIL' if naive else 'tlunet'} pipeline, {workers} workers",
                    "data",
                    root=root,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    workers=workers,
                    naive=naive,
                    batches=args.batches,
                    cache_dir=cache_dir,
                )
            )
    return rows


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median images/s, with the spread of all of them."""
    speeds = sorted(r["images_per_s"] for r in runs)
    median = sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]
    return {**median, "repeats": len(runs), "range": f"{speeds[0]}-{speeds[-1]}"}


def _train_section(
    args: argparse.Namespace, root: str, out: Path, cache_dir: str, step: Step
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Bare and Lightning runs, alternated ``--repeats`` times per case; rows and ratios."""
    encoders = args.encoders.split(",")
    # bf16-mixed on the CPU: fast with AMX or AVX512-BF16, an emulation elsewhere; measured on
    # every CPU so the figure says which (trainer=cpu's "mixed" picks it only with those).
    precisions = args.precisions or (
        "32-true,mixed" if args.device == "cuda" else "32-true,bf16-mixed"
    )
    channels = {"false": [False], "true": [True], "both": [False, True]}[args.channels_last]
    compiles = [False, True] if args.compile else [False]
    sizes = [(encoders[0], args.small_size)] if args.small_size > 0 else []
    sizes += [(e, args.image_size) for e in encoders]
    cases = [
        (encoder, size, precision, channels_last, compile_net)
        for encoder, size in sizes
        for precision in precisions.split(",")
        for channels_last in channels
        for compile_net in compiles
    ]
    rows, pairs = [], []
    for encoder, size, precision, channels_last, compile_net in cases:
        runs: dict[str, list[dict[str, Any]]] = {"bare": [], "lightning": []}
        for repeat in range(args.repeats):  # alternated, so drift hits both loops alike
            for loop in runs:
                label = (
                    f"train: {loop}, {encoder}, {size} px, {precision}, channels_last="
                    f"{channels_last}, compile={compile_net} ({repeat + 1}/{args.repeats})"
                )
                runs[loop].append(
                    step(
                        label,
                        "train",
                        root=root,
                        loop=loop,
                        encoder=encoder,
                        image_size=size,
                        batch_size=args.batch_size,
                        warmup=args.warmup,
                        steps=args.steps,
                        device=args.device,
                        precision=precision,
                        channels_last=channels_last,
                        compile_net=compile_net,
                        cache_dir=cache_dir,
                        out_dir=str(out / "train-run"),
                    )
                )
        bare, lightning = _median_run(runs["bare"]), _median_run(runs["lightning"])
        rows += [bare, lightning]
        keys = ("encoder", "image_size", "batch_size", "precision", "channels_last", "compile")
        ratio = lightning["images_per_s"] / bare["images_per_s"]
        pairs.append({**{k: lightning[k] for k in keys}, "ratio": round(ratio, 3)})
    shutil.rmtree(out / "train-run", ignore_errors=True)
    return rows, pairs


def _infer_section(
    args: argparse.Namespace, root: str, out: Path, cache_dir: str, step: Step
) -> list[dict[str, Any]]:
    """``tlunet.evaluate`` over every slice and ``tlunet.predict`` on ``--predict-patients``
    folders, with a checkpoint of the first encoder trained for one step; their runs removed."""
    ckpt = step(
        "infer: a checkpoint to time",
        "checkpoint",
        root=root,
        encoder=args.encoders.split(",")[0],
        image_size=args.image_size,
        cache_dir=cache_dir,
        out_dir=str(out / "infer-run"),
    )["ckpt_path"]
    rows = [
        step(
            "infer: tlunet.evaluate stage=all",
            "evaluate",
            ckpt_path=ckpt,
            root=root,
            device=args.device,
            out_dir=str(out / "infer-evaluate"),
        ),
    ]
    folders = sorted(str(p) for p in Path(root).iterdir() if p.is_dir())
    rows.append(
        step(
            "infer: tlunet.predict",
            "predict",
            ckpt_path=ckpt,
            folders=folders[: args.predict_patients],
            device=args.device,
            out_dir=str(out / "infer-predict"),
        )
    )
    for name in ("infer-run", "infer-evaluate", "infer-predict"):
        shutil.rmtree(out / name, ignore_errors=True)
    return rows


def run_sections(
    args: argparse.Namespace, root: str, out: Path, cache: Path, step: Step
) -> dict[str, Any]:
    """The figures of the ``--sections`` asked for, run in the order start, data, train, infer
    on the data at ``root``, their runs in ``out`` and their caches in ``cache``: the results'
    "start", "data", "train" and "train_pairs", and "inference" entries."""
    sections = args.sections.split(",")
    slices_cache = str(cache / "slices")  # shared by the data/train/infer jobs (warm after start)
    results: dict[str, Any] = {}
    if "start" in sections:
        results["start"] = _start_section(args, root, cache, step)
    if "data" in sections:
        results["data"] = _data_section(args, root, slices_cache, step)
    if "train" in sections:
        results["train"], results["train_pairs"] = _train_section(
            args, root, out, slices_cache, step
        )
    if "infer" in sections:
        results["inference"] = _infer_section(args, root, out, slices_cache, step)
    return results
