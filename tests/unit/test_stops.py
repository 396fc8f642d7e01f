"""tlunet.stops and the sweep's side of it, in-process: signals within ``handled()``, the stop
and out-of-memory lines, the sweep's accounting of a stop, and the requeue that continues a
run with ``resume=`` (submitit's checkpoint protocol, called directly: no cluster here)."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict, read_write

from tests.conftest import TINY_RUN, compose_config
from tlunet import stops
from tlunet.cli import user_errors_exit
from tlunet.errors import JobFailed
from tlunet.sweeps import report_failures, requeue_overrides

# --- signals ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_signal_left() -> Iterator[None]:
    yield
    stops._received = None  # the next command starts afresh anyway; other tests too


def test_sigterm_within_handled_raises_stopped_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stops.Stopped) as raised, stops.handled():
        with stops.handled():  # nested: one set of handlers
            os.kill(os.getpid(), signal.SIGTERM)
    assert raised.value.exit_code == 143 and stops.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_lightning_defers_is_kept_for_later() -> None:
    """Lightning's handler calls the one it found (ours): ours records the signal and leaves
    the stop to Lightning's loops, whose SIGTERMException (a SystemExit) then stands for it."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    with stops.handled():
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: ours(signum, frame))
        os.kill(os.getpid(), signal.SIGTERM)  # no Stopped here
        stop = stops.as_stop(SIGTERMException())
        with pytest.raises(stops.Stopped):
            stops.check()
    assert stop is not None and stop.exit_code == 143
    assert stops.as_stop(SystemExit(0)) is not None  # still the stop, once received
    with stops.handled():  # a new command starts afresh
        assert stops.received() is None and stops.as_stop(SystemExit(0)) is None


def test_a_command_stopped_is_one_line_with_exit_128_plus_n(capsys) -> None:
    @user_errors_exit
    def command() -> None:
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(SystemExit) as exited:
        command()
    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "tlunet error: stopped by Ctrl-C (SIGINT) before it ended: run the command again for "
        "its results"
    ]


def test_stop_messages(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert stops.stop_message(signal.SIGTERM, run) == (
        f"stopped by SIGTERM before the first epoch of the run ended: '{run}' holds no "
        "checkpoint; start the run again"
    )
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 4, "global_step": 50}, last)
    assert stops.stop_message(signal.SIGTERM, run) == (
        f"stopped by SIGTERM after epoch 5; '{last}' is intact; continue with: "
        f"python -m tlunet.train resume={run}"
    )


# --- out of memory ---------------------------------------------------------------------------

CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RuntimeError(CPU_OOM), "CPU RAM"),
        (MemoryError(), "CPU RAM"),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "GPU memory",
        ),
        (
            RuntimeError("Caught RuntimeError in DataLoader worker process 0.\n" + CPU_OOM),
            "CPU RAM",
        ),
        (RuntimeError("DataLoader worker (pid 4321) is killed by signal: Killed. "), "CPU RAM"),
        (RuntimeError("DataLoader worker (pid 4321) is killed by signal: Aborted. "), None),
        (RuntimeError("shapes cannot be multiplied"), None),
    ],
)
def test_out_of_memory_is_recognised(error: BaseException, kind: str | None) -> None:
    try:
        raise ValueError("wrapped") from error
    except ValueError as wrapped:
        found = stops.out_of_memory(wrapped)
    assert (found[0] if found else None) == kind


def test_training_out_of_gpu_memory_is_one_line(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Through the entry point's error handling, in-process: the model's build stands in for
    the first allocation that fails."""
    from tlunet import run

    def build_module(cfg):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.15 GiB of which 1.19 GiB is free."
        )

    monkeypatch.setattr(run, "build_module", build_module)
    out = tmp_path / "run"
    cfg = compose_config(
        [
            *TINY_RUN,
            f"data.root={synthetic_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={out}",
        ]
    )
    with pytest.raises(SystemExit) as exited:
        user_errors_exit(run.train)(cfg)
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "tlunet error: ran out of GPU memory with data.batch_size=4 at data.image_size=64 (CUDA "
        "out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of "
        "which 1.19 GiB is free.): lower data.batch_size (e.g. data.batch_size=2 "
        "+trainer.accumulate_grad_batches=2 keeps the effective batch of 4) or data.image_size "
        "(e.g. data.image_size=32); no checkpoint of this run was written yet (its inputs are "
        "intact)."
    ]


def test_a_metrics_csv_save_stopped_while_rewriting_is_redone_whole(
    tmp_path: Path, monkeypatch
) -> None:
    """A save stopped while it rewrote the file for new columns (Ctrl-C, a full disk) leaves
    the old file; the next save rewrites it again instead of appending rows with columns its
    header lacks (which made the CSV unreadable to a resumed run)."""
    from tlunet import lightning_compat

    writer = lightning_compat.AppendingCSVWriter(str(tmp_path))
    writer.log_metrics({"a": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"a": 2.0, "b": 3.0}, step=1)  # a new column: the file is rewritten
    real = lightning_compat.write_text_atomic

    def stopped(*args, **kwargs):
        raise stops.Stopped(signal.SIGINT)

    monkeypatch.setattr(lightning_compat, "write_text_atomic", stopped)
    with pytest.raises(stops.Stopped):
        writer.save()
    monkeypatch.setattr(lightning_compat, "write_text_atomic", real)
    writer.save()  # as Lightning's teardown does
    with open(writer.metrics_file_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"]) for r in rows] == [("1.0", ""), ("2.0", "3.0")]


# --- sweeps ----------------------------------------------------------------------------------


def test_a_stopped_sweep_lists_every_job_and_exits_128_plus_n(tmp_path: Path, capsys) -> None:
    job0 = tmp_path / "0_unet_resnet18"
    job0.mkdir()
    line = "tlunet error: stopped by SIGTERM after epoch 2; ... resume=x"
    status = {"job": 0, "overrides": ["seed=1"], "status": "failed", "error": line}
    (job0 / "job_status.json").write_text(json.dumps(status))
    failed = JobReturn(overrides=["seed=1"], status=JobStatus.FAILED)
    failed.return_value = JobFailed(line)
    jobs = [(0, ["seed=1"], failed), (1, ["seed=2"], None), (2, ["seed=3"], None)]
    with pytest.raises(SystemExit) as exited:
        report_failures(tmp_path, jobs, stops.Stopped(signal.SIGTERM))
    assert exited.value.code == 143
    expected = [
        f"tlunet error: 3 of 3 jobs of the sweep in '{tmp_path}' did not complete (the sweep "
        "was stopped by SIGTERM):",
        f"  #0 seed=1: {line} ({job0})",
        "  #1 seed=2: never started: the sweep was stopped by SIGTERM",
        "  #2 seed=3: never started: the sweep was stopped by SIGTERM",
    ]
    assert capsys.readouterr().err.splitlines() == expected
    assert (tmp_path / "failed_jobs.txt").read_text().splitlines() == expected


def test_requeue_overrides(tmp_path: Path) -> None:
    run = tmp_path / "sweep" / "3_unet_resnet18"
    (run / "checkpoints").mkdir(parents=True)
    overrides = ["cluster=slurm", "encoder=resnet18", "data.root=/d", "resume=/old"]
    assert requeue_overrides(overrides, run) == overrides  # no checkpoint: start again
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeue_overrides(overrides, run) == [
        "cluster=slurm",
        f"resume={run}",
        "hydra.sweep.subdir=3_unet_resnet18",
    ]
    odd = tmp_path / "a run, of mine"
    (odd / "checkpoints").mkdir(parents=True)
    (odd / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert requeue_overrides([], odd) == [f"resume='{odd}'", "hydra.sweep.subdir='a run, of mine'"]
    (run / "metrics.json").write_text("{}")
    assert requeue_overrides(overrides, run) is None  # complete: nothing to requeue


@pytest.fixture()
def slurm(tmp_path: Path):
    """The composed cluster=slurm config, and its launcher (tlunet's SlurmLauncher)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="[cluster] extra")
    from hydra.utils import instantiate

    cfg = compose_config(
        ["cluster=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config, launcher.hydra_context, launcher.task_function = cfg, None, None
    return cfg, launcher


def test_a_requeued_slurm_job_continues_its_run(slurm, tmp_path: Path) -> None:
    """submitit calls the launcher's ``checkpoint`` in the job's process on the requeue
    signal: the submission it returns continues the run with resume=."""
    cfg, launcher = slurm
    run = tmp_path / "sweep" / "0_unet_densenet121"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config.yaml").write_text("{}")
    job_cfg = copy.deepcopy(cfg)
    with read_write(job_cfg.hydra), open_dict(job_cfg.hydra):
        job_cfg.hydra.runtime.output_dir = str(run)
        job_cfg.hydra.job.num = 0
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job_cfg)  # what run_job sets while the job runs
    try:
        args = (["cluster=slurm", "encoder=vgg16"], "hydra.sweep.dir", 0, "job_id_for_0", {})
        submission = launcher.checkpoint(*args)
    finally:
        HydraConfig.instance().cfg = previous
    assert submission.function is launcher
    assert submission.args == (
        ["cluster=slurm", f"resume={run}", "hydra.sweep.subdir=0_unet_densenet121"],
        *args[1:],
    )


def test_the_requeue_settings_reach_submitit(slurm, monkeypatch) -> None:
    import submitit

    cfg, launcher = slurm
    assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.signal_delay_s == 120
    seen: dict = {}

    class Executor:
        def __init__(self, cluster: str, **kwargs) -> None:
            seen["init"] = {"cluster": cluster, **kwargs}

        def update_parameters(self, **kwargs) -> None:
            seen["parameters"] = kwargs

        def map_array(self, fn, *args):
            done = JobReturn(overrides=[], status=JobStatus.COMPLETED)
            return [type("Job", (), {"results": lambda self: [done]})() for _ in args[0]]

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    (ret,) = launcher.launch([["encoder=vgg16"]], initial_job_idx=0)
    assert ret.status == JobStatus.COMPLETED
    assert seen["init"]["cluster"] == "slurm" and seen["init"]["slurm_max_num_timeout"] == 3
    assert seen["parameters"]["slurm_signal_delay_s"] == 120


class SigtermWhileTesting:
    """A Lightning callback that sends SIGTERM to this process as the test ends, after its last batch
    (what a cluster's time limit does at any moment)."""

    def __new__(cls):  # a pl.Callback, built lazily so that the module imports no Lightning
        import pytorch_lightning as pl

        class _Callback(pl.Callback):
            def on_test_end(self, *args, **kwargs) -> None:
                os.kill(os.getpid(), signal.SIGTERM)

        return _Callback()


def test_sigterm_while_the_run_tests_is_no_success(
    synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    """SIGTERM during the test after training: exit 143 with the stop line, no metrics.json
    (the test's metrics are of part of the test set)."""
    from tlunet import run

    out = tmp_path / "run"
    cfg = compose_config(
        [
            *TINY_RUN,
            f"data.root={synthetic_root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={out}",
            "+callbacks.sigterm._target_=tests.unit.test_stops.SigtermWhileTesting",
        ]
    )
    with pytest.raises(SystemExit) as exited:
        user_errors_exit(run.train)(cfg)
    err = capsys.readouterr().err
    assert exited.value.code == 128 + signal.SIGTERM, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("tlunet error")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0], err[-3000:]
    assert f"resume={out}" in lines[0]
    assert not (out / "metrics.json").exists()


def test_argparse_commands_fail_the_one_way(capsys) -> None:
    """tlunet.cli.returns_status (report, compare, study, overview): a user error, running out
    of memory and SIGTERM give the Hydra commands' one line, returned as the status."""
    from tlunet.cli import returns_status
    from tlunet.errors import DataError

    def failing(error: BaseException):
        @returns_status
        def main(argv: list[str] | None = None) -> int:
            raise error

        return main

    assert failing(DataError("No patient folder under '/d'."))([]) == 1
    assert capsys.readouterr().err == "tlunet error: No patient folder under '/d'.\n"
    assert failing(RuntimeError(CPU_OOM))([]) == 1
    assert capsys.readouterr().err.startswith("tlunet error: ran out of CPU RAM (")

    @returns_status
    def terminated(argv: list[str] | None = None) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    assert terminated([]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("tlunet error: stopped by SIGTERM")
    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        failing(ValueError("a bug"))([])
