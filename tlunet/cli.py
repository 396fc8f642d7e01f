"""Shared plumbing of the ``python -m tlunet.<command>`` entry points."""

from __future__ import annotations

import functools
import logging
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from tlunet import stops
from tlunet.errors import JobFailed, TlunetError
from tlunet.utils import DISK_FULL_ERRNOS, write_error

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("tlunet")


def _raised_in_resolver(exc: BaseException) -> TlunetError | None:
    """The :class:`TlunetError` a resolver of tlunet's raised inside the OmegaConf error
    ``exc`` (which wraps it in lines of its own: ``full_key``, ``object_type``), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TlunetError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _user_error(exc: BaseException) -> BaseException | None:
    """The TlunetError (or OmegaConf error) behind ``exc``, looking through Hydra's wrappers.

    A bare ``OSError`` that only a write gives (:data:`DISK_FULL_ERRNOS`: no space, a quota, a
    file size limit, a read-only file system), raised by a library writing for tlunet (a
    logger), is one too: its :class:`WriteError` names the file it names. (A permission error
    may come from a read: it keeps its traceback.)"""
    seen = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return _raised_in_resolver(seen) or seen
        if isinstance(seen, TlunetError):
            return seen
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            where = seen.filename or "a file"
            return write_error(where, seen, "the files written before it are intact")
        if not isinstance(seen, InstantiationException):
            return None
        seen = seen.__cause__ or seen.__context__
    return None


#: Lightning log lines that advertise its cloud products (prefixes), or restate the default
#: ``limit_*_batches=1.0`` ("was configured so 100% of the batches ..."): nothing about the run.
LIGHTNING_NOISE = ("💡 Tip:",)
_LIMIT_DEFAULT = re.compile(r"^`Trainer\(limit_\w+=1\.0\)` was configured so 100%")
#: Deprecation warnings of third-party code that a tlunet user can do nothing about, as
#: ``(category, message regex)``; checked with the versions pinned in pyproject.toml.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # pytorch-lightning 2.6's _pytree.py on torch >= 2.10
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # torch 2.14 deprecates TorchScript, still the format of `tlunet.export format=torchscript`
    (FutureWarning, r"`torch\.jit\.\w+` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.\w+` is deprecated"),
)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(LIGHTNING_NOISE) or _LIMIT_DEFAULT.match(message))


_file_handle_error = logging.FileHandler.handleError


def _quiet_file_handle_error(self: logging.FileHandler, record: logging.LogRecord) -> None:
    """A log file that cannot be written (a full disk) prints no traceback per log line: the
    failed write of a result file says what happened, in one line. Other logging errors (a
    bad format string) still show."""
    exc = sys.exc_info()[1]
    if isinstance(exc, OSError):
        return
    _file_handle_error(self, record)


_NOISE_FILTER = _DropLightningNoise()


def quiet_third_party() -> None:
    """Silence :data:`LIGHTNING_NOISE` and :data:`KNOWN_WARNINGS` in a command's output (every
    other warning still shows), and the traceback per line of a log file on a full disk.
    Idempotent."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _NOISE_FILTER not in logger.filters:
            logger.addFilter(_NOISE_FILTER)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.FileHandler.handleError = _quiet_file_handle_error  # type: ignore[method-assign]


def user_errors_exit(fn: F) -> F:
    """Turn a :class:`TlunetError` (or a config interpolation error) into one clear message on
    stderr and exit status 1, instead of a traceback; so too running out of memory. SIGTERM
    and Ctrl-C end the command with one line and exit status 128 + the signal's number
    (:mod:`tlunet.stops`). The command's output is kept free of third-party noise
    (:func:`quiet_third_party`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_third_party()
        try:
            with stops.handled():  # SIGTERM, Ctrl-C: one line, exit 128 + the signal
                return fn(*args, **kwargs)
        except (stops.Stopped, SystemExit, KeyboardInterrupt) as raised:
            stop = stops.as_stop(raised)
            if stop is None:
                raise
            _report(f"tlunet error: {stop}", stop.exit_code)
        except Exception as raised:
            exc = _user_error(raised)
            from tlunet.sweeps import in_multirun

            memory = stops.out_of_memory(raised) if exc is None else None
            if memory is not None:  # training names its sizes itself (stops.reports_stops)
                _report(f"tlunet error: {stops.command_memory_message(*memory, args)}", 1)
            if exc is None:
                if in_multirun():  # the traceback goes to the job's log; the sweep goes on
                    log.exception("The job failed")
                raise
            kind = "configuration error" if isinstance(exc, OmegaConfBaseException) else "error"
            _report(f"tlunet {kind}: {exc}", 1)

    return wrapper  # type: ignore[return-value]


def returns_status(fn: Callable[..., int]) -> Callable[..., int]:
    """The argparse commands' form of :func:`user_errors_exit` (``main(argv) -> int``, whose
    tests call them in-process): the same failures give the same one line on stderr, and the
    status is returned instead of exiting. A user error: 1; out of memory: 1, its line naming
    the batch; SIGTERM or Ctrl-C: 128 + the signal. argparse's own usage errors exit as
    argparse does (2)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        quiet_third_party()
        try:
            with stops.handled():
                return fn(*args, **kwargs)
        except (stops.Stopped, KeyboardInterrupt) as raised:
            stop = stops.as_stop(raised)
            if stop is None:
                raise
            print(f"tlunet error: {stop}", file=sys.stderr)
            return stop.exit_code
        except Exception as raised:
            exc = _user_error(raised)
            if exc is None:
                memory = stops.out_of_memory(raised)
                if memory is None:
                    raise
                exc = stops.command_memory_message(*memory, args)
            print(f"tlunet error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _report(message: str, status: int) -> None:
    """Print ``message`` (also into the run's log file) and exit with ``status``; in a job of a
    sweep, raise :class:`JobFailed` instead: Hydra records it, and the sweep goes on (or, when
    the process was told to stop, :func:`tlunet.stops.stop_sweep` ends it)."""
    from tlunet.sweeps import in_multirun

    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the run's log file keeps it too
            handler.handle(record)
    print(message, file=sys.stderr)
    if in_multirun():
        raise JobFailed(message) from None
    sys.exit(status)


def register_sweep_plugins() -> None:
    """Make tlunet's sweeper and launchers known to Hydra (``Plugins.register``, Hydra's API
    for it): Hydra finds plugins by listing the ``hydra_plugins`` folders on ``sys.path``,
    which misses them in an editable install (``pip install -e .``: an import hook, no
    folder). Idempotent."""
    from hydra.core.plugins import Plugins

    # The scan first: it executes Hydra's core plugin modules again, and the classes below must
    # subclass the BasicSweeper it leaves (else super() fails).
    registry = Plugins.instance()
    import hydra_plugins.tlunet_sweeps as plugins

    for name in ("AccountingSweeper", "LocalLauncher", "SlurmLauncher"):
        if hasattr(plugins, name):
            registry.register(getattr(plugins, name))


def bench() -> None:
    """Console script ``tlunet-bench``: the benchmarks of a source checkout
    (``benchmarks/bench.py``, outside the package like timm's ``benchmark.py``), found from the
    current folder upwards or beside an editable install. A wheel does not ship them."""
    from pathlib import Path

    import tlunet

    starts = [Path.cwd(), *Path.cwd().parents, Path(tlunet.__file__).resolve().parents[1]]
    repo = next(
        (
            p
            for p in starts
            if (p / "benchmarks" / "bench.py").is_file() and (p / "tlunet" / "cli.py").is_file()
        ),
        None,
    )
    if repo is None:
        print(
            "tlunet error: tlunet-bench runs the benchmarks of a tlunet source checkout "
            "(benchmarks/bench.py), which an installed wheel does not hold: run it inside a "
            "clone of the repository (or `make bench` there).",
            file=sys.stderr,
        )
        sys.exit(1)
    # Run as a script of the checkout (python -m benchmarks.bench), not imported as a library:
    # the package never depends on a folder its wheel does not ship.
    import runpy

    sys.path.insert(0, str(repo))
    runpy.run_module("benchmarks.bench", run_name="__main__", alter_sys=True)
