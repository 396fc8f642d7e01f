"""Sweeps that account for every job: ``python -m tlunet.train -m ...`` (and ``cluster=local``,
``cluster=slurm``).

- Every job of a sweep writes ``job_status.json`` into its directory when it starts
  (``running``) and when it ends (``completed``, or ``failed`` with the reason in one line):
  :class:`JobStatusCallback`, a Hydra callback.
- A job that fails does not stop the sweep: in a multirun, :func:`tlunet.cli.user_errors_exit`
  raises :class:`tlunet.errors.JobFailed` (which Hydra records) instead of exiting the process.
- ``hydra_plugins.tlunet_sweeps.AccountingSweeper`` (Hydra's basic sweeper otherwise) runs
  every job, then prints one line per job that failed, was killed or never started
  (:func:`account`) and exits with status 1 if any did.
- ``hydra_plugins.tlunet_sweeps.LocalLauncher`` and ``SlurmLauncher`` are
  hydra-submitit-launcher's, except that a job whose process died (killed, out of memory, past
  its time limit) is reported as failed instead of raising out of the launcher, which left the
  other jobs unaccounted for (:func:`submitit_launch`); and that a job submitit requeues
  (preempted, or at its time limit: ``hydra.launcher.max_num_timeout``) continues its run with
  ``resume=`` instead of starting it again (:func:`requeue_submission`).
- SIGTERM or Ctrl-C stops a sweep that runs its jobs in this process (:mod:`tlunet.stops`): the
  job running is recorded as failed with its one line (what is intact, ``resume=<run>``), no
  other job starts, every job is listed, and the sweep exits with 128 + the signal's number.

Hydra finds sweepers and launchers only in the ``hydra_plugins`` namespace package, hence the
thin classes there; the logic is here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tlunet.artifacts import FAILED_JOBS_FILE, JOB_STATUS_FILE, METRICS_FILE, RUN_CONFIG_FILE
from tlunet.errors import TlunetError, one_line
from tlunet.stops import Stopped, signal_name, stop_sweep
from tlunet.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_failure(exc: BaseException) -> str:
    """The reason a job failed, in one line: a tlunet error's message, else ``Type: message``."""
    return one_line(exc, typed=True)


class JobStatusCallback(Callback):
    """Writes ``<job dir>/job_status.json`` at the start and the end of each job of a sweep."""

    def _write(self, config: DictConfig, **fields: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        status = {
            "job": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **fields,
        }
        try:
            write_json_atomic(job_dir / JOB_STATUS_FILE, status)
        except Exception as exc:  # never let the bookkeeping cost a job
            log.warning("Could not write %s: %s", job_dir / JOB_STATUS_FILE, exc)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config, status="running")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED:
            self._write(config, status="completed")
        else:
            self._write(config, status="failed", error=job_failure(job_return._return_value))
        stop_sweep()  # told to stop (SIGTERM, Ctrl-C): no other job of this process starts


def read_job_status(job_dir: Path) -> dict[str, Any]:
    """The ``job_status.json`` of ``job_dir``, or ``{}`` when it has none (or an unreadable one)."""
    try:
        status = json.loads((job_dir / JOB_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def read_statuses(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    """``job number -> job_status.json`` (plus ``dir``) of the jobs under ``sweep_dir``."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(sweep_dir.glob(f"*/{JOB_STATUS_FILE}")):
        status = read_job_status(path.parent)
        try:
            found[int(status["job"])] = {**status, "dir": str(path.parent)}
        except (KeyError, TypeError, ValueError):
            continue
    return found


def report_failures(
    sweep_dir: Path, jobs: Sequence[tuple[int, Sequence[str], Any]], stopped: Stopped | None = None
) -> None:
    """After a sweep: exit with status 1 after listing every job that did not complete (one
    line each, on stderr and in ``<sweep dir>/failed_jobs.txt``), else say that all did. A
    sweep ``stopped`` by a signal exits with its status (128 + the signal's number) instead."""
    import sys

    by = signal_name(stopped.signum) if stopped is not None else None
    failed = account(sweep_dir, jobs, by)
    if not failed:
        (sweep_dir / FAILED_JOBS_FILE).unlink(missing_ok=True)  # an earlier sweep's
        print(f"All {len(jobs)} jobs of the sweep in '{sweep_dir}' completed.")
        return
    why = f" (the sweep was stopped by {by})" if by else ""
    report = (
        f"tlunet error: {len(failed)} of {len(jobs)} jobs of the sweep in '{sweep_dir}' "
        f"did not complete{why}:\n" + "\n".join(f"  {line}" for line in failed)
    )
    try:
        write_text_atomic(sweep_dir / FAILED_JOBS_FILE, report + "\n")
    except TlunetError:  # a full disk: the list is printed below all the same
        pass
    sys.stdout.flush()
    print(report, file=sys.stderr)
    sys.exit(stopped.exit_code if stopped is not None else 1)


def account(
    sweep_dir: Path,
    jobs: Sequence[tuple[int, Sequence[str], JobReturn | None]],
    stopped_by: str | None = None,
) -> list[str]:
    """One line for each job of ``jobs`` (number, overrides, what the launcher returned) that did
    not complete: failed (with its reason), killed (started, never ended) or never started.

    What the launcher returned decides; a job's ``job_status.json`` (only when it belongs to this
    job: same number and overrides, not a folder left by an earlier sweep) gives its folder and
    tells a job killed after it started from one that never started. ``stopped_by``: the signal
    that stopped the sweep (its jobs had not ended, or not started, when it came)."""
    statuses = read_statuses(sweep_dir)
    # A job is named by what sets it apart: the overrides not shared by every job of the sweep.
    shared = set.intersection(*(set(filter_overrides(o)) for _, o, _ in jobs)) if jobs else set()
    lines = []
    for num, overrides, returned in jobs:
        status = statuses.get(num, {})
        if status.get("overrides") is not None and list(status["overrides"]) != list(overrides):
            status = {}  # another sweep's job in a reused folder
        where = f" ({status['dir']})" if status.get("dir") else ""
        own = [o for o in filter_overrides(overrides) if o not in shared or len(jobs) == 1]
        label = f"#{num} {' '.join(own) or '(no overrides)'}"
        died = returned is not None and getattr(returned, "process_died", False)
        if returned is not None and not died:
            if returned.status == JobStatus.COMPLETED:
                continue
            reason = job_failure(returned._return_value)
        elif status.get("status") == "completed":
            continue
        elif status.get("status") == "failed":
            reason = status.get("error", "failed")
        elif status.get("status") == "running":
            cause = f" ({job_failure(returned._return_value)})" if died else ""
            reason = f"started but never ended: killed, or its process died{cause}"
            if stopped_by and not died:
                reason = f"had not ended when the sweep was stopped by {stopped_by}"
        else:
            cause = f" ({job_failure(returned._return_value)})" if died else ""
            reason = f"never started{cause}"
            if stopped_by and not died:
                reason = f"never started: the sweep was stopped by {stopped_by}"
        lines.append(f"{label}: {reason}{where}")
    return lines


def _settled(job: Any, overrides: Sequence[str]) -> JobReturn:
    """A submitit job's :class:`JobReturn`, or a failed one when its process died."""
    try:
        return job.results()[0]
    except Exception as exc:  # killed, out of memory, time limit: no JobReturn came back
        ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
        ret.return_value = exc
        ret.process_died = True  # type: ignore[attr-defined]  # read by account()
        return ret


def submitit_launch(
    launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """hydra-submitit-launcher 1.2.0's ``BaseSubmititLauncher.launch``, with :func:`_settled`
    collecting the results."""
    import os

    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    assert launcher.config is not None
    assert len(job_overrides) > 0
    params = launcher.params
    init_params = {"folder": launcher.params["submitit_folder"]}
    specific_init_keys = {"max_num_timeout"}
    init_params.update(
        **{f"{launcher._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys}
    )
    init_keys = specific_init_keys | {"submitit_folder"}
    executor = submitit.AutoExecutor(cluster=launcher._EXECUTOR, **init_params)
    baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        x if x in baseparams else f"{launcher._EXECUTOR}_{x}": y
        for x, y in params.items()
        if x not in init_keys
    }
    executor.update_parameters(**params)
    log.info(
        f"Submitit '{launcher._EXECUTOR}' sweep output dir : {launcher.config.hydra.sweep.dir}"
    )
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    job_params: list[Any] = []
    for idx, overrides in enumerate(job_overrides):
        idx = initial_job_idx + idx
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append(
            (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
        )
    jobs = executor.map_array(launcher, *zip(*job_params, strict=True))
    return [_settled(j, o) for j, o in zip(jobs, job_overrides, strict=True)]


#: The overrides a requeued job keeps: where and how it runs (``resume=`` refuses any other).
_KEPT_ON_RESUME = ("hydra.", "+hydra.", "cluster=", "+cluster=", "hydra/launcher=")


def _override_value(value: str) -> str:
    """``value`` as a Hydra override value: quoted unless it is a plain path or name."""
    import re

    if re.fullmatch(r"[\w/.+:@%-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"  # Hydra: backslashes are literal


def requeue_overrides(overrides: Sequence[str], run_dir: Path) -> list[str] | None:
    """The overrides of a requeued job whose run is in ``run_dir``: ``resume=<run>`` and
    ``hydra.sweep.subdir=<its folder>`` (the job writes into the same folder) with only the
    overrides of where and how it runs; the same ``overrides`` when the run has no
    ``last.ckpt`` yet (it starts again); ``None`` when it is complete (nothing to requeue)."""
    if (run_dir / METRICS_FILE).is_file():
        return None
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return list(overrides)
    kept = [
        o
        for o in overrides
        if o.startswith(_KEPT_ON_RESUME) and not o.lstrip("+").startswith("hydra.sweep.subdir=")
    ]
    return [
        *kept,
        f"resume={_override_value(str(run_dir))}",
        f"hydra.sweep.subdir={_override_value(run_dir.name)}",
    ]


def requeue_submission(
    launcher: Any,
    sweep_overrides: Sequence[str],
    job_dir_key: str,
    job_num: int,
    job_id: str,
    singleton_state: Any,
) -> Any:
    """The submission submitit requeues when a job is preempted or reaches its time limit
    (its ``checkpoint`` protocol, called in the job's process on the requeue signal, USR2):
    the launcher's call with :func:`requeue_overrides`, so the job continues its run from
    ``last.ckpt``. hydra-submitit-launcher's own requeues the same call, which starts the run
    again. ``None`` (no requeue) when the run is complete."""
    from submitit.helpers import DelayedSubmission

    overrides: list[str] | None = list(sweep_overrides)
    run_dir = None
    if HydraConfig.initialized():  # the job's config while it runs (run_job sets it)
        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.job.get("num")) == str(job_num):
            run_dir = Path(str(hydra_cfg.runtime.output_dir))
    if run_dir is not None and (run_dir / RUN_CONFIG_FILE).is_file():
        overrides = requeue_overrides(sweep_overrides, run_dir)
    if overrides is None:
        log.warning("Job #%d is complete: not requeued", job_num)
        return None
    log.warning("Job #%d requeued with: %s", job_num, " ".join(overrides))
    return DelayedSubmission(launcher, overrides, job_dir_key, job_num, job_id, singleton_state)
