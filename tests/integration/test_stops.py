"""A run or a sweep told to stop (SIGTERM: SLURM, ``docker stop``, Kubernetes, systemd; Ctrl-C:
SIGINT) ends with one line saying what is intact and exit status 128 + the signal's number,
never as a success; a sweep lists every job; a job that submitit requeues continues its run
with ``resume=``; running out of memory is one line naming the sizes to lower."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, run_cli

#: A run of many tiny epochs (a 4-channel scratch U-Net: fast epochs, small checkpoints),
#: long enough to be stopped part way.
EPOCHS = 8
RUN = [
    "model=unet_scratch",
    "model.net.channels=[4,8,16,32,64]",
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks.progress_bar=null",
    "logger=csv",
]
REPO = Path(__file__).resolve().parents[2]


def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m <args>`` in the background, its output in ``cwd/out.txt`` and ``err.txt``."""
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=cli_env(cwd, env),
        stdout=(cwd / "out.txt").open("w"),
        stderr=(cwd / "err.txt").open("w"),
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} was not written (exit {process.poll()})"


def _finish(process: subprocess.Popen, cwd: Path) -> tuple[int, str]:
    returncode = process.wait(timeout=300)
    return returncode, (cwd / "err.txt").read_text()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tlunet error")]


def _epochs_held(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] + 1


def _pids(*parts: str) -> list[int]:
    """The processes whose command line holds every one of ``parts`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if all(p in command for p in parts):
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_stopped_run_says_what_is_intact_and_resume_continues(
    signum: int, status: int, synthetic_root: Path, tmp_path: Path
) -> None:
    """Stopped part way (after its first checkpoint): one line naming the epoch reached,
    last.ckpt and resume=, exit 128 + N, no metrics.json; resume= then completes the run."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    process = _start(
        ["tlunet.train", *RUN, f"data.root={synthetic_root}", f"hydra.run.dir={run_dir}"], tmp_path
    )
    _wait_for(last, process)
    process.send_signal(signum)
    returncode, stderr = _finish(process, tmp_path)

    assert returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    epochs = _epochs_held(last)  # loadable, and the epoch the line names
    assert epochs < EPOCHS, "the run was not stopped part way"
    name = "SIGTERM" if signum == signal.SIGTERM else r"Ctrl-C \(SIGINT\)"
    assert re.fullmatch(
        rf"tlunet error: stopped by {name} after epoch {epochs}; '{re.escape(str(last))}' is "
        rf"intact; continue with: python -m tlunet\.train resume={re.escape(str(run_dir))}",
        lines[0],
    ), lines[0]
    assert not (run_dir / "metrics.json").exists()
    assert lines[0] in (run_dir / "train.log").read_text()  # the run's log keeps it too
    if signum != signal.SIGTERM:
        return  # resuming is the same after either

    out = run_cli(["tlunet.train", f"resume={run_dir}"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["test/dice"] >= 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from"] == str(last) and run["epochs"] == EPOCHS


@pytest.mark.slow
def test_a_run_stopped_before_its_first_epoch_ended_must_start_again(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """SIGTERM as soon as the run has written its config (while it indexes the data, builds
    the model or trains its first epoch): one line saying to start again, exit 143, no
    temporary file left behind."""
    run_dir = tmp_path / "run"
    process = _start(
        [
            "tlunet.train",
            *[o for o in RUN if not o.startswith("trainer.limit_train_batches")],
            "trainer.limit_train_batches=8",  # a stop within the first epoch ends it part way
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    _wait_for(run_dir / "config.yaml", process)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = _finish(process, tmp_path)

    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _error_lines(stderr) == [
        "tlunet error: stopped by SIGTERM before the first epoch of the run ended: "
        f"'{run_dir}' holds no checkpoint; start the run again"
    ], stderr[-3000:]
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_sigterm_stops_a_local_sweep_and_every_job_is_accounted_for(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """SIGTERM during job 0 of a three-job sweep run in one process: job 0 is recorded as
    failed with its line (resume=), the other two never start, the sweep lists all three (on
    stderr and in failed_jobs.txt) and exits 143."""
    sweep = tmp_path / "sweep"
    process = _start(
        [
            "tlunet.train",
            "-m",
            "seed=1,2,3",
            *RUN,
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    job0 = sweep / "0_unet_scratch_none"
    last = job0 / "checkpoints" / "last.ckpt"
    _wait_for(last, process)
    process.send_signal(signal.SIGTERM)
    returncode, stderr = _finish(process, tmp_path)

    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert (
        f"tlunet error: 3 of 3 jobs of the sweep in '{sweep}' did not complete (the sweep was "
        "stopped by SIGTERM):"
    ) in stderr, stderr[-3000:]
    listed = (sweep / "failed_jobs.txt").read_text()
    lines = {line.split(":")[0].strip(): line for line in listed.splitlines() if "  #" in line}
    assert set(lines) == {"#0 seed=1", "#1 seed=2", "#2 seed=3"}, listed
    assert (
        f"#0 seed=1: tlunet error: stopped by SIGTERM after epoch {_epochs_held(last)}; "
        f"'{last}' is intact; continue with: python -m tlunet.train resume={job0} ({job0})"
    ) in lines["#0 seed=1"]
    for job in ("#1 seed=2", "#2 seed=3"):
        assert lines[job].endswith(f"{job}: never started: the sweep was stopped by SIGTERM")
    assert json.loads((job0 / "job_status.json").read_text())["status"] == "failed"
    assert not (job0 / "metrics.json").exists()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_unet_scratch_none"]


def _job_process(sweep: Path, job_dir: Path) -> int:
    """The process of the submitit job that writes ``job_dir`` (it holds its train.log open)."""
    for pid in _pids("submitit.core._submit", str(sweep)):
        try:
            files = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if str(job_dir / "train.log") in files:
            return pid
    raise AssertionError(f"no process writes {job_dir}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds job processes in /proc")
def test_local_submitit_jobs_stopped_or_requeued(synthetic_root: Path, tmp_path: Path) -> None:
    """cluster=local, two jobs, each in its own process. Job 0 gets SIGTERM: the sweep lists
    it as failed with its one line (resume=) and exits 1. Job 1 gets submitit's requeue signal
    (USR2: preemption, or its time limit coming): submitit requeues it, and it continues its
    run from last.ckpt with resume= (hydra-submitit-launcher's own requeue started it again)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="[cluster] extra")
    sweep = tmp_path / "sweep"
    process = _start(
        [
            "tlunet.train",
            "-m",
            "cluster=local",
            "seed=1,2",
            *RUN,
            f"data.root={synthetic_root}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    jobs = [sweep / f"{i}_unet_scratch_none" for i in range(2)]
    last = [job / "checkpoints" / "last.ckpt" for job in jobs]
    signals = {0: signal.SIGTERM, 1: signal.SIGUSR2}
    deadline = time.monotonic() + 300
    while signals and process.poll() is None and time.monotonic() < deadline:
        for i in [i for i in signals if last[i].exists()]:  # each once it has a checkpoint
            os.kill(_job_process(sweep, jobs[i]), signals.pop(i))
        time.sleep(0.02)
    assert not signals, f"jobs {list(signals)} wrote no checkpoint (exit {process.poll()})"
    returncode, stderr = _finish(process, tmp_path)

    assert returncode == 1, stderr[-3000:]
    assert f"1 of 2 jobs of the sweep in '{sweep}' did not complete:" in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("  #")]
    assert (
        line.startswith("  #0 seed=1: ")
        and (
            f"tlunet error: stopped by SIGTERM after epoch {_epochs_held(last[0])}; '{last[0]}' is "
            f"intact; continue with: python -m tlunet.train resume={jobs[0]}"
        )
        in line
    ), line
    assert json.loads((jobs[0] / "job_status.json").read_text())["status"] == "failed"

    run = json.loads((jobs[1] / "run.json").read_text())
    assert run["resumed_from"] == str(last[1]) and run["epochs"] == EPOCHS
    assert json.loads((jobs[1] / "metrics.json").read_text())["test/dice"] >= 0
    status = json.loads((jobs[1] / "job_status.json").read_text())
    assert status["status"] == "completed" and f"resume={jobs[1]}" in status["overrides"]


#: Runs tlunet.train with the module's training step raising torch's CPU allocation error at
#: epoch 2 (after two epochs' checkpoints): running out of memory without exhausting it.
TRAIN_OUT_OF_MEMORY = textwrap.dedent(
    """
    import runpy, sys
    from tlunet.module import SegmentationModule

    step = SegmentationModule.training_step

    def training_step(self, *args, **kwargs):
        if self.current_epoch == 2:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 34359738368 bytes. Error code 12 (Cannot "
                "allocate memory)"
            )
        return step(self, *args, **kwargs)

    SegmentationModule.training_step = training_step
    sys.argv[0] = "tlunet.train"
    runpy.run_module("tlunet.train", run_name="__main__", alter_sys=True)
    """
)


@pytest.mark.slow
def test_running_out_of_memory_is_one_line_naming_the_sizes(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "train_oom.py"
    script.write_text(TRAIN_OUT_OF_MEMORY)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            *RUN,
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _error_lines(out.stderr) == [
        "tlunet error: ran out of CPU RAM with data.batch_size=4 at data.image_size=64 "
        "([enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)): "
        "lower data.batch_size (e.g. data.batch_size=2 +trainer.accumulate_grad_batches=2 keeps "
        "the effective batch of 4) or data.image_size (e.g. data.image_size=32), or use fewer "
        f"data.num_workers; '{last}' (after epoch 2) is intact (python -m tlunet.train "
        f"resume={run_dir} continues it with the same sizes)."
    ], out.stderr[-3000:]
