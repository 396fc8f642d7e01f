"""Objects that test configurations instantiate inside a command's process (``_target_``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillProcess(pl.Callback):
    """Kills its own process with SIGKILL when training starts, if ``when`` equals ``value``:
    a job of a sweep dying the way an out-of-memory kill or a scheduler's limit ends it."""

    def __init__(self, when: object, value: object) -> None:
        self.kill = str(when) == str(value)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
