"""User-facing errors.

Every mistake a user can make (a wrong path, a corrupt or mismatched file, an unknown encoder,
an impossible config value) raises :class:`TlunetError` with a message saying what was wrong,
where, and how to fix it. The entry points print that message alone (no traceback) and exit
with status 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TlunetError(Exception):
    """A mistake in the user's input or configuration (not a bug in tlunet)."""


class DataError(TlunetError):
    """The dataset on disk is missing, incomplete or malformed."""


class ConfigError(TlunetError):
    """A configuration value is unknown or impossible."""


class WriteError(TlunetError):
    """A file could not be written: a full disk, a file size limit, a read-only folder or no
    permission. The message names the file and what is intact."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ``" Did you mean: a, b?"`` for the closest ``choices`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def one_line(exc: BaseException, typed: bool = False) -> str:
    """``exc``'s message on one line (whitespace runs joined); with ``typed``, prefixed with
    its type (``ValueError: ...``) unless it is a :class:`JobFailed`, whose message is a
    command's own ``tlunet error`` line. The exception's type name when it has no message."""
    text = " ".join(str(exc).split())
    if typed and text and not isinstance(exc, JobFailed):
        text = f"{type(exc).__name__}: {text}"
    return text or type(exc).__name__


class JobFailed(Exception):
    """A job of a sweep stopped on a user error (its one-line message): raised instead of
    exiting the process, so that Hydra records the failure and the other jobs run."""
