"""The numeric precision ``tlunet.evaluate`` and ``tlunet.predict`` run a checkpoint in.

By default the precision its run computed in, so that evaluate reproduces the run's own test
metrics and predict writes the masks evaluate scores: a run tested in bf16 autocast
(``trainer=cpu`` on a CPU with bf16 instructions, ``trainer=gpu``) differs from an fp32 pass
by up to a few 1e-3 of per-patient Dice. Where that precision comes from, in order: the
checkpoint (``precision`` in its ``tlunet`` section; older checkpoints lack it), the
``run.json`` of the run folder the checkpoint lies in (``<run>/checkpoints/*.ckpt``), the
stored config's ``trainer.precision`` resolved on this machine
(:func:`tlunet.builders.resolve_precision`), else ``32-true``. A ``precision=`` key of the
command replaces it. ``tlunet.export`` always writes an fp32 ONNX graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlunet import builders
from tlunet.artifacts import RUN_INFO_FILE, checkpoint_section
from tlunet.builders import resolve_precision
from tlunet.errors import ConfigError

if TYPE_CHECKING:
    from pytorch_lightning.plugins.precision import Precision

#: Lightning precisions a checkpoint can be run in (plus ``mixed``, resolved for the machine).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
#: Lightning's older spellings.
_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


@dataclass(frozen=True)
class RunPrecision:
    """``precision``: what the command runs in; ``source``: where it comes from, in words;
    ``run``: what the checkpoint's run computed in (``None`` when nothing records it)."""

    precision: str
    source: str
    run: str | None

    def info(self) -> dict[str, Any]:
        """The record for ``evaluation.json``."""
        return {"used": self.precision, "source": self.source, "run": self.run}


def _normalise(value: Any, accelerator: str, what: str) -> str:
    text = str(value).strip()
    text = _ALIASES.get(text, text)
    if text == "mixed":
        text = str(resolve_precision("mixed", accelerator))
    if text not in PRECISIONS:
        raise ConfigError(
            f"{what}={value!r} is not a precision a checkpoint can be run in: choose one of "
            f"{[*PRECISIONS, 'mixed']} (or null: the precision of the checkpoint's run)."
        )
    return text


def _run_json_precision(ckpt_path: Path) -> tuple[str, Path] | None:
    """``precision`` of ``<run>/run.json`` for a checkpoint in ``<run>/checkpoints/``."""
    if ckpt_path.parent.name != "checkpoints":
        return None
    path = ckpt_path.parent.parent / RUN_INFO_FILE
    try:
        value = json.loads(path.read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return (str(value), path) if value else None


def checkpoint_precision(
    checkpoint: dict[str, Any],
    ckpt_path: str | Path,
    accelerator: str,
    requested: Any = None,
    key: str = "precision",
) -> RunPrecision:
    """The precision to run ``checkpoint`` (loaded from ``ckpt_path``) in on ``accelerator``:
    ``requested`` (the command's ``key``; ``mixed`` resolved for this machine) when given,
    else its run's (see the module's docstring for where that is found). A run's ``16-mixed``
    (fp16 autocast, GPU only) runs in ``32-true`` on the CPU, where Lightning has no fp16
    autocast; bf16 on a CPU without bf16 instructions (emulated, slow) is named in
    ``source``. Raises :class:`ConfigError` for a precision Lightning does not know."""
    ckpt_path = Path(str(ckpt_path)).expanduser()
    stored = checkpoint_section(checkpoint).get("precision")
    beside = None if stored else _run_json_precision(ckpt_path)
    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    configured = (config.get("trainer") or {}).get("precision")
    if stored:
        run = _normalise(stored, accelerator, "the checkpoint's precision")
        source = "the checkpoint's (the precision its run computed in)"
    elif beside is not None:
        run = _normalise(beside[0], accelerator, f"precision in {beside[1]}")
        source = f"its run's, from {beside[1]} (the checkpoint records none)"
    elif configured is not None:
        run = _normalise(configured, accelerator, "the checkpoint's trainer.precision")
        source = (
            f"its config's trainer.precision={configured} resolved on this machine (the "
            "checkpoint records no precision and no run.json lies beside it)"
        )
    else:
        run, source = None, "the default (nothing records the run's precision)"
    if requested is not None:
        precision = _normalise(requested, accelerator, key)
        source = f"{key}={requested}"
    else:
        precision = run or "32-true"
    if precision == "16-mixed" and accelerator == "cpu":
        precision = "32-true"
        source += "; 16-mixed (fp16 autocast) has no CPU version in Lightning: fp32 here"
    if precision.startswith("bf16") and accelerator == "cpu" and not builders.cpu_has_fast_bf16():
        source += (
            "; this CPU has no bf16 instructions, so bf16 is emulated: slower than "
            "precision=32-true, whose scores differ from the run's in the last digits"
        )
    return RunPrecision(precision, source, run)


def precision_plugin(precision: str, device: str) -> Precision:
    """Lightning's precision plugin for ``precision`` on ``device`` (``cpu``, ``cuda``), as
    ``pl.Trainer`` builds it: ``convert_module``, ``convert_input`` and ``forward_context``
    run a module outside a Trainer exactly as the Trainer's test loop does."""
    from pytorch_lightning.plugins.precision import (
        DoublePrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )

    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, "cpu" if device == "cpu" else "cuda")
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)
    if precision == "64-true":
        return DoublePrecision()
    return Precision()
