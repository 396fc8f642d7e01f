"""Commands that stop before they end: told to by a signal (SIGTERM, Ctrl-C), or out of memory.

SIGTERM is what SLURM (time limit, preemption, ``scancel``), ``docker stop``, Kubernetes and
systemd send; Ctrl-C sends SIGINT. Within :func:`handled` (every command, through
:func:`tlunet.cli.user_errors_exit`; a whole ``-m`` sweep run in one process, through
``hydra_plugins.tlunet_sweeps.AccountingSweeper``) either one ends the command with one line
saying what is intact, and exit status 128 + the signal's number (143 for SIGTERM, 130 for
Ctrl-C), instead of a traceback or, as Lightning's ``SIGTERMException`` (a ``SystemExit(None)``)
gave, status 0:

- While Lightning fits or tests, its own SIGTERM handler is in place and calls the one it found
  (ours): Lightning's loops then stop at the end of the batch or epoch running, never in the
  middle of a checkpoint write, and raise ``SIGTERMException``. Anywhere else, and for Ctrl-C,
  :class:`Stopped` is raised at once (as ``KeyboardInterrupt`` was); files are written through
  :func:`tlunet.utils.atomic_path`, so they are whole or absent either way.
- :func:`reports_stops` (around :func:`tlunet.run.train`) turns either into a :class:`Stopped`
  whose line names the epochs ``last.ckpt`` holds and ``resume=<run>``, or says that the run
  must start again when no epoch ended. It also turns running out of memory (CPU RAM or GPU
  memory) into one ``tlunet error`` line naming the batch and image size and how to lower them.
- In a sweep, the job stopped is recorded as failed with that line, no further job starts
  (:func:`stop_sweep`), and the sweep lists every job and exits with 128 + the signal's number.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tlunet.artifacts import METRICS_FILE, RUN_CONFIG_FILE
from tlunet.errors import TlunetError

F = TypeVar("F", bound=Callable[..., Any])

#: The signals that stop a command with one line.
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

_received: int | None = None  # the first stop signal received within handled()
_depth = 0  # nesting of handled()
_owner: int | None = None  # the process that installed the handlers (not a forked worker)
_previous: dict[int, Any] = {}
_sweeps = 0  # handled(sweep=True) levels: a sweep runs its jobs in this process


def signal_name(signum: int) -> str:
    """``SIGTERM``, ``Ctrl-C (SIGINT)``, or the signal's own name."""
    return _NAMES.get(signum) or signal.Signals(signum).name


class Stopped(BaseException):  # noqa: N818  (named for what happened, like KeyboardInterrupt)
    """The command was told to stop by signal ``signum``. ``str()`` is its one-line message
    (without the ``tlunet error:`` prefix), ``exit_code`` is 128 + ``signum``.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on its way takes
    it for a failure of the work it interrupts (and carries on)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(
            message
            or f"stopped by {signal_name(signum)} before it ended: run the command again for "
            "its results"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its signal (a submitit result)
        return (Stopped, (self.signum, str(self)))


def received() -> int | None:
    """The first stop signal received within :func:`handled` (``None`` if none was)."""
    return _received


def _handle(signum: int, frame: Any) -> None:
    global _received
    if os.getpid() != _owner:  # a forked child (a DataLoader worker): its parent stops
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # torch's workers end quietly on it
        if signal.getsignal(signum) is _handle:  # nobody else handles it here: the default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    if _received is None:
        _received = signum
    if signal.getsignal(signum) is not _handle:
        # Lightning's handler called this one (it calls the handler it found): its loops stop
        # at the end of the batch or epoch running and raise SIGTERMException.
        return
    raise Stopped(signum)


@contextmanager
def handled(sweep: bool = False) -> Iterator[None]:
    """Within it, SIGTERM and SIGINT stop this process with one line (the module's doc says
    how). Nested uses share the outermost one's handlers, which it restores when it ends.
    ``sweep``: a sweep runs its jobs in this process; :func:`stop_sweep` stops it. Outside the
    main thread (where Python sets no signal handlers) it changes nothing."""
    global _depth, _owner, _previous, _received, _sweeps
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received = None
        _previous = {s: signal.getsignal(s) for s in SIGNALS}
        _owner = os.getpid()
        for s in SIGNALS:
            signal.signal(s, _handle)
    _depth += 1
    _sweeps += sweep
    try:
        yield
    finally:
        _sweeps -= sweep
        _depth -= 1
        if _depth == 0:
            for s, previous in _previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)


def _stopping() -> int | None:
    """The stop signal received within the :func:`handled` running now, if any."""
    return _received if _depth else None


def check() -> None:
    """Raise :class:`Stopped` if a stop signal was received (one Lightning noted, and returned
    without acting on it)."""
    if _stopping() is not None:
        raise Stopped(_stopping())


def stop_sweep() -> None:
    """Raise :class:`Stopped` if a stop signal was received while a sweep runs its jobs in this
    process: called as each job ends (:class:`tlunet.sweeps.JobStatusCallback`), so that no
    other job starts. A job in a process of its own (submitit) just ends."""
    if _sweeps and _received is not None:
        raise Stopped(_received, f"the sweep was stopped by {signal_name(_received)}")


def as_stop(exc: BaseException) -> Stopped | None:
    """``exc`` as the :class:`Stopped` it stands for: itself, or what Lightning raised for a
    signal received within :func:`handled` (``SIGTERMException``, a ``SystemExit``); else
    ``None``. For the caller of the outermost :func:`handled`, once it ended: the signal
    received is kept until the next one starts."""
    if isinstance(exc, Stopped):
        return exc
    if _received is not None and isinstance(exc, SystemExit | KeyboardInterrupt):
        return Stopped(_received)
    return None


# --- what a training run has kept ------------------------------------------------------------


def _run_dir(cfg: Any) -> Path | None:
    try:
        if cfg.get("resume"):
            return Path(str(cfg.resume)).expanduser().resolve()
        return Path(str(cfg.paths.output_dir))
    except Exception:  # no paths (a test's config), or an interpolation without Hydra
        return None


def _epochs_held(ckpt: Path) -> int | None:
    """How many epochs the checkpoint ``ckpt`` holds (its ``epoch`` is the last one's index),
    read without loading its tensors (``mmap``); ``None`` if it cannot be read."""
    try:
        import torch

        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["epoch"]) + 1
    except Exception:
        return None


def _last_checkpoint(run_dir: Path | None) -> tuple[Path | None, int | None]:
    if run_dir is None:
        return None, None
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None, None
    return last, _epochs_held(last)


def stop_message(signum: int, run_dir: Path | None) -> str:
    """The one line of a training run in ``run_dir`` stopped by ``signum``: the epoch reached,
    ``last.ckpt`` and ``resume=<run>``; or, before the first epoch ended, that the run must
    start again."""
    name = signal_name(signum)
    if run_dir is not None and (run_dir / METRICS_FILE).is_file():
        return f"stopped by {name} after the run in '{run_dir}' was complete (metrics.json)"
    last, epochs = _last_checkpoint(run_dir)
    if last is None:
        where = f": '{run_dir}' holds no checkpoint" if run_dir is not None else ""
        return (
            f"stopped by {name} before the first epoch of the run ended{where}; start the run again"
        )
    after = f" after epoch {epochs}" if epochs else ""
    return (
        f"stopped by {name}{after}; '{last}' is intact; continue with: "
        f"python -m tlunet.train resume={run_dir}"
    )


# --- out of memory ---------------------------------------------------------------------------

#: Messages of allocation failures that torch raises as a plain RuntimeError.
#: A DataLoader worker killed with SIGKILL: the kernel's (or a cgroup's) out-of-memory killer,
#: in practice (``scancel`` and time limits send SIGTERM first).
_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "is killed by signal: Killed")
_GPU_OOM = ("CUDA out of memory", "MPS backend out of memory", "HIP out of memory")


def out_of_memory(exc: BaseException) -> tuple[str, BaseException] | None:
    """``("CPU RAM" | "GPU memory", the error)`` when ``exc`` (or an exception it was raised
    from) is an allocation failure: ``MemoryError``, torch's ``OutOfMemoryError``, or torch's
    RuntimeError "DefaultCPUAllocator: can't allocate memory"; else ``None``."""
    import torch

    gpu_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, gpu_oom) or (
            isinstance(current, RuntimeError) and any(m in text for m in _GPU_OOM)
        ):
            return "GPU memory", current
        if isinstance(current, MemoryError) or (
            isinstance(current, RuntimeError) and any(m in text for m in _CPU_OOM)
        ):
            return "CPU RAM", current
        current = current.__cause__ or current.__context__
    return None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # a DataLoader worker's error: "Caught RuntimeError in DataLoader worker ..." then the cause
    text = next((line for line in lines if any(m in line for m in _CPU_OOM + _GPU_OOM)), None)
    text = text or (lines[0] if lines else type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_config(cfg: Any, run_dir: Path | None) -> Any:
    """The config the run used: a resumed run's own (its ``config.yaml``)."""
    if cfg.get("resume") and run_dir is not None:
        try:
            from omegaconf import OmegaConf

            return OmegaConf.load(run_dir / RUN_CONFIG_FILE)
        except Exception:
            pass
    return cfg


def memory_message(cfg: Any, kind: str, exc: BaseException, run_dir: Path | None) -> str:
    """The one line of a training run that ran out of ``kind`` memory: the batch and image
    size in use, how to lower them keeping the effective batch, and what is intact."""
    run_cfg = _run_config(cfg, run_dir)
    data = run_cfg.get("data") or {}
    trainer = run_cfg.get("trainer") or {}
    batch, size = data.get("batch_size"), data.get("image_size")
    accumulate = trainer.get("accumulate_grad_batches") or 1
    sizes = f" with data.batch_size={batch} at data.image_size={size}" if batch else ""
    how = "lower data.batch_size or data.image_size"
    if isinstance(batch, int) and batch > 1:
        key = "trainer.accumulate_grad_batches"
        key = key if "accumulate_grad_batches" in trainer else f"+{key}"
        how = (
            f"lower data.batch_size (e.g. data.batch_size={batch // 2} {key}={accumulate * 2} "
            f"keeps the effective batch of {batch * accumulate})"
        )
        if isinstance(size, int) and size >= 64:
            how += f" or data.image_size (e.g. data.image_size={max(32, size // 2 // 32 * 32)})"
    if kind == "CPU RAM":
        how += ", or use fewer data.num_workers"
    last, epochs = _last_checkpoint(run_dir)
    if last is not None:
        held = f" (after epoch {epochs})" if epochs else ""
        intact = (
            f"'{last}'{held} is intact (python -m tlunet.train resume={run_dir} continues it "
            "with the same sizes)"
        )
    else:
        intact = "no checkpoint of this run was written yet (its inputs are intact)"
    return f"ran out of {kind}{sizes} ({_first_line(exc)}): {how}; {intact}."


def command_memory_message(kind: str, exc: BaseException, args: tuple[Any, ...]) -> str:
    """The one line of a command other than training that ran out of ``kind`` memory: its
    ``batch_size`` when its config (``args[0]``) has one."""
    cfg = args[0] if args else None
    how = "use a smaller batch"
    for key in ("batch_size", "data.batch_size"):
        try:
            from omegaconf import OmegaConf

            batch = OmegaConf.select(cfg, key)
        except Exception:  # not a config
            break
        if batch:
            how = f"lower {key}= (now {batch})"
            break
    if kind == "CPU RAM":
        how += ", or use fewer workers"
    return f"ran out of {kind} ({_first_line(exc)}): {how}; the files it read are intact."


def reports_stops(train: F) -> F:
    """Decorate :func:`tlunet.run.train` (``train(cfg)``): a run stopped by a signal raises
    :class:`Stopped` with :func:`stop_message`; one that ran out of memory raises
    :class:`TlunetError` with :func:`memory_message`. Other errors pass unchanged."""

    @functools.wraps(train)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(cfg, *args, **kwargs)
        except TlunetError:
            raise  # says what is intact itself (a write that failed, a config mistake)
        except BaseException as exc:
            signum = _stopping()
            if signum is not None:  # whatever broke once told to stop is the stop
                raise Stopped(signum, stop_message(signum, _run_dir(cfg))) from exc
            memory = out_of_memory(exc)
            if memory is None:
                raise
            kind, error = memory
            raise TlunetError(memory_message(cfg, kind, error, _run_dir(cfg))) from exc

    return wrapper  # type: ignore[return-value]
