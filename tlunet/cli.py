"""Shared plumbing of the ``python -m tlunet.<command>`` entry points."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from tlunet.errors import TlunetError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("tlunet")


def _user_error(exc: BaseException) -> BaseException | None:
    """The TlunetError (or OmegaConf error) behind ``exc``, looking through Hydra's wrappers."""
    seen = exc
    while seen is not None:
        if isinstance(seen, TlunetError | OmegaConfBaseException):
            return seen
        if not isinstance(seen, InstantiationException):
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def user_errors_exit(fn: F) -> F:
    """Turn a :class:`TlunetError` (or a config interpolation error) into one clear message on
    stderr and exit status 1, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as raised:
            exc = _user_error(raised)
            if exc is None:
                raise
            kind = "configuration error" if isinstance(exc, OmegaConfBaseException) else "error"
            message = f"tlunet {kind}: {exc}"
            record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):  # the run's log file keeps it too
                    handler.handle(record)
            print(message, file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


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
    sys.path.insert(0, str(repo))
    from benchmarks.bench import cli

    cli()
