"""tlunet's Hydra plugins (Hydra finds sweepers and launchers only in ``hydra_plugins``):
sweeps that account for every job. The logic lives in :mod:`tlunet.sweeps`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class AccountingSweeper(BasicSweeper):
    """Hydra's basic sweeper, except that a failed job neither stops the sweep nor hides the
    others: every job runs, then the failed ones are listed (one line each, on stderr and in
    ``<sweep dir>/failed_jobs.txt``) and the process exits with status 1. SIGTERM or Ctrl-C
    stops the sweep (no other job starts: :mod:`tlunet.stops`); every job is listed all the
    same, and the process exits with 128 + the signal's number."""

    def sweep(self, arguments: list[str]) -> Any:
        from tlunet.errors import one_line
        from tlunet.stops import Stopped, handled
        from tlunet.sweeps import report_failures

        assert self.config is not None
        assert self.launcher is not None
        assert self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        self.overrides = self.split_arguments(
            parser.parse_overrides(params_conf), self.max_batch_size
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns: list[Sequence[JobReturn]] = []
        jobs: list[tuple[int, Sequence[str], JobReturn | None]] = []
        initial_job_idx = 0
        stopped: Stopped | None = None
        with handled(sweep=True):
            while not self.is_done():
                batch = self.get_job_batch()
                self.validate_batch_is_legal(batch)
                results: Sequence[JobReturn | None] = [None] * len(batch)
                try:
                    if stopped is None:  # once stopped, the other batches are only listed
                        results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
                except Stopped as exc:  # the job statuses tell what ended, and how
                    stopped = exc
                except Exception as exc:  # a launcher that gave up on the whole batch
                    log.error("The launcher stopped: %s", one_line(exc, typed=True))
                for i, overrides in enumerate(batch):
                    jobs.append((initial_job_idx + i, overrides, results[i]))
                initial_job_idx += len(batch)
                returns.append([r for r in results if r is not None])

        report_failures(sweep_dir, jobs, stopped)
        return returns


try:  # the submitit launchers exist with the [cluster] extra only
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _upstream
except ImportError:  # pragma: no cover - without hydra-submitit-launcher
    _upstream = None

if _upstream is not None:

    class LocalLauncher(_upstream.LocalLauncher):
        """``cluster=local``: hydra-submitit-launcher's, every job accounted for."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from tlunet.sweeps import submitit_launch

            return submitit_launch(self, job_overrides, initial_job_idx)

        def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            """Requeued (preempted, time limit): the job continues its run with resume=."""
            from tlunet.sweeps import requeue_submission

            return requeue_submission(self, *args, **kwargs)

    class SlurmLauncher(_upstream.SlurmLauncher):
        """``cluster=slurm``: hydra-submitit-launcher's, every job accounted for."""

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from tlunet.sweeps import submitit_launch

            return submitit_launch(self, job_overrides, initial_job_idx)

        def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            """Requeued (preempted, time limit): the job continues its run with resume=."""
            from tlunet.sweeps import requeue_submission

            return requeue_submission(self, *args, **kwargs)
