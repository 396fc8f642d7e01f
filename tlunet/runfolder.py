"""One folder, one writer: the lock a command holds on the folder it writes its results into
(a run folder for ``tlunet.train``, an evaluation folder for ``tlunet.evaluate``), what marks a
folder as holding another command's results, and the temporaries a killed writer leaves.

The lock is ``fcntl.flock`` on ``<folder>/.tlunet.lock``, which records who holds it (pid, host,
command, start time) for the message a second writer gets. The kernel releases a flock when
its process dies, however it dies, so a lock file left by a killed process holds no lock: the
next command takes it (a stale lock needs no clean-up). flock works across machines on NFS
(Linux emulates it with NFS byte-range locks) and on local file systems; where the file system
has no locks at all, the command writes without one and says so in a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from functools import wraps
from pathlib import Path, PurePosixPath
from typing import Any

from tlunet.artifacts import EVALUATION_FILE, METRICS_FILE, RUN_CONFIG_FILE, RUN_INFO_FILE
from tlunet.errors import ConfigError
from tlunet.utils import is_atomic_temporary, names_and_more

log = logging.getLogger(__name__)

LOCK_FILE = ".tlunet.lock"
#: A command's results in a folder (beside a training run's checkpoints): a run's summary and
#: test metrics, an evaluation's description and metrics. A folder holding any of them is never
#: written into by another command.
RESULT_FILES = (RUN_INFO_FILE, METRICS_FILE, EVALUATION_FILE)
#: The files a training writes into its run folder (glob patterns relative to it), each through
#: a temporary beside it (:func:`tlunet.utils.atomic_path`).
RUN_FILES = (
    "checkpoints/*.ckpt",
    "csv/*",
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    METRICS_FILE,
    "skipped_files.csv",
    "*.png",
)
#: The files an evaluation writes into its folder.
EVALUATION_FILES = (METRICS_FILE, EVALUATION_FILE, "*.csv", "*.png")


def held_results(folder: Path, runs: bool = False) -> list[str]:
    """The results of another command ``folder`` holds: its checkpoints (``checkpoints/*.ckpt``)
    and :data:`RESULT_FILES`; with ``runs``, a training run's ``config.yaml`` too (a run that
    stopped before its first checkpoint). Empty for a new or empty folder."""
    folder = Path(folder)
    held = [f"checkpoints/{p.name}" for p in sorted((folder / "checkpoints").glob("*.ckpt"))]
    names = (*RESULT_FILES, RUN_CONFIG_FILE) if runs else RESULT_FILES
    return held + [name for name in names if (folder / name).is_file()]


def in_use(folder: Path) -> bool:
    """Whether a live process holds the lock of ``folder`` (a probe: takes and drops it)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the probe's lock
    return False


def refused_here(output_dir: str | Path, command: str) -> bool:
    """Whether ``command`` (``train``, ``resume`` or ``evaluate``) will be refused in the folder
    ``output_dir``: another process writes into it (:func:`in_use`); it holds another
    command's results (:func:`held_results`); for ``resume``, it is no run (no ``config.yaml``)
    or a complete one (``metrics.json``)."""
    folder = Path(output_dir)
    if in_use(folder):
        return True
    if command == "resume":
        return not (folder / RUN_CONFIG_FILE).is_file() or (folder / METRICS_FILE).is_file()
    return bool(held_results(folder, runs=command == "evaluate"))


def hydra_subdir(output_dir: str, subdir: str, command: str) -> str | None:
    """Hydra's ``output_subdir`` for ``command`` (``train``, ``resume`` or ``evaluate``) writing
    into ``output_dir``: ``subdir`` (Hydra writes its ``config.yaml``, ``hydra.yaml`` and
    ``overrides.yaml`` there), or ``None`` (Hydra writes none) where the command will be
    refused (:func:`refused_here`). The other command's Hydra files stay as they were."""
    return None if refused_here(output_dir, command) else subdir


def log_file(output_dir: str, name: str, command: str) -> str:
    """The file Hydra's log handler opens for ``command`` in ``output_dir``: ``<output_dir>/
    <name>``, or the null device where the command will be refused (:func:`refused_here`): a
    refused command starts no log in a folder that is not its own (another run's, a user's)."""
    return os.devnull if refused_here(output_dir, command) else str(Path(output_dir) / name)


#: The folders ``resume=`` named, and whether each existed before Hydra made its run folder
#: (``tlunet.resume_dir``, resolved with ``hydra.run.dir`` before Hydra creates it).
_RESUME_FOLDERS: dict[str, bool] = {}


def resume_dir(resume: Any) -> str:
    """``resume`` as ``hydra.run.dir`` of a resumed run, noting whether that folder existed
    (:func:`made_for_resume`); ``""`` when no run is resumed."""
    if not resume:
        return ""
    path = str(resume)
    _RESUME_FOLDERS.setdefault(str(Path(path).expanduser().resolve()), Path(path).exists())
    return path


def made_for_resume(folder: Path) -> bool:
    """Whether ``folder`` did not exist before this command: Hydra made it for ``resume=``."""
    return _RESUME_FOLDERS.get(str(Path(folder).expanduser().resolve())) is False


class FolderLock:
    """The writer's lock of ``folder`` (:data:`LOCK_FILE`), held from :meth:`acquire` until
    :meth:`release` (or the process's death). ``command`` names the writer in the message of
    the next one."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self, advice: str) -> None:
        """Take the lock, or raise :class:`ConfigError` naming the process that holds it,
        followed by ``advice`` (what to do instead)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tries = 0
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                tries += 1
                if holder is None and tries < 20:
                    # A probe (in_use), or a holder that has not written its name yet.
                    time.sleep(0.05)
                    continue
                raise ConfigError(
                    f"'{self.folder}' is being written by "
                    f"{holder or 'another tlunet command (it is starting)'}: one folder has "
                    f"one writer. {advice}"
                ) from None
            except OSError as exc:  # a file system without locks
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning(
                    "'%s' cannot be locked (%s): nothing stops a second command from writing "
                    "into it at the same time.",
                    self.folder,
                    exc.strerror,
                )
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed the file as we opened it: lock the new one
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while holding it: a waiter re-checks the inode
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _holder(fd: int) -> str | None:
    """Who holds the lock of the open lock file ``fd``, in words; ``None`` when the file does
    not say (yet)."""
    try:
        info: Any = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return None
    return (
        f"{info.get('command', 'another tlunet command')} (pid {info['pid']} on "
        f"{info.get('host', '?')}, since {info.get('started', '?')})"
    )


def detach_log_files(folder: Path, remove_empty: bool = False) -> None:
    """Stop the logging file handlers writing into ``folder`` (Hydra opened them before the
    command ran): a refused command leaves no lines in another command's log. With
    ``remove_empty`` (only while holding the folder's lock: no other writer's log is being
    started), a log file left empty (the one Hydra created for the refused command) goes."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(
            Path(folder).resolve()
        ):
            root.removeHandler(handler)
            handler.close()
            log_file = Path(handler.baseFilename)
            if remove_empty and log_file.is_file() and log_file.stat().st_size == 0:
                log_file.unlink()


def remove_stale_temporaries(folder: Path, own: tuple[str, ...]) -> list[Path]:
    """Remove the temporaries of atomic writes (:func:`tlunet.utils.atomic_path`) of the files
    ``own`` (glob patterns relative to ``folder``: those its writer writes) in ``folder``:
    called with the folder's lock held, so they belong to a writer that died (killed while
    writing a checkpoint). Another command's temporaries there (an export beside the
    checkpoints) are left alone. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    for sub in sorted({str(PurePosixPath(pattern).parent) for pattern in own}):
        where = folder / sub
        if not where.is_dir():
            continue
        for path in sorted(where.iterdir()):
            if not (is_atomic_temporary(path.name) and path.is_file()):
                continue
            target = PurePosixPath(sub) / path.name[1:-13]  # .<name>.<8 characters>.tmp
            if any(fnmatchcase(str(target), pattern) for pattern in own):
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info(
            "Removed %d temporary files a killed writer left in %s: %s",
            len(removed),
            folder,
            ", ".join(str(p.relative_to(folder)) for p in removed),
        )
    return removed


@contextmanager
def writing_folder(
    folder: Path,
    command: str,
    advice: str,
    own: tuple[str, ...],
    refusal: Callable[[Path, list[str]], str] | None = None,
    runs: bool = False,
) -> Iterator[None]:
    """Hold ``folder`` for ``command`` (its :class:`FolderLock`) while the body runs, release it
    however the body ends. Refused with :class:`ConfigError` while another process holds it
    (its pid, host and start time, then ``advice``), and, when ``refusal`` is given, when the
    folder holds another command's results (:func:`held_results` with ``runs``; the message
    is ``refusal(folder, held)``). A refused command writes nothing into the folder,
    not even its log lines. With the lock held, the temporaries a killed writer of the files
    ``own`` left there are removed (:func:`remove_stale_temporaries`)."""
    folder = Path(folder)
    lock = FolderLock(folder, command)
    try:
        lock.acquire(advice)
    except ConfigError:
        detach_log_files(folder)
        raise
    try:
        held = held_results(folder, runs) if refusal else []
        if held:
            detach_log_files(folder, remove_empty=True)
            raise ConfigError(refusal(folder, held))
        remove_stale_temporaries(folder, own)
        yield
    finally:
        lock.release()


def holds_evaluation_folder(evaluate: Callable[..., Any]) -> Callable[..., Any]:
    """``evaluate(cfg)`` holding its output folder (``cfg.paths.output_dir``, Hydra's run
    folder) with :func:`writing_folder`: refused, before anything is loaded, when the folder
    holds a training run (its ``config.yaml``, checkpoints, results) or another evaluation
    (``evaluation.json``, ``metrics.json``), or while another command writes there."""

    @wraps(evaluate)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        folder = Path(str(cfg.paths.output_dir)).expanduser().resolve()

        def refusal(folder: Path, held: list[str]) -> str:
            run = any(
                n.startswith("checkpoints/") or n in (RUN_INFO_FILE, RUN_CONFIG_FILE) for n in held
            )
            return (
                f"'{folder}' holds {'a training run' if run else 'another evaluation'} "
                f"({names_and_more(held, 4)}), whose files an evaluation there would replace: an "
                "evaluation writes into a folder of its own. Leave hydra.run.dir unset "
                "(outputs/evaluations/<date>_<time>_<stage>) or name a new folder."
            )

        advice = "Wait for it to end, or evaluate into another folder (hydra.run.dir)."
        with writing_folder(
            folder, "tlunet.evaluate", advice, EVALUATION_FILES, refusal, runs=True
        ):
            return evaluate(cfg, *args, **kwargs)

    return wrapper
