"""Validate a kaggle_3m folder before training: ``python -m tlunet.data.check data.root=DIR``.

Unlike a run, which stops at the first unusable file, the check reads every slice and reports
every problem, one line each (``path: reason``: unreadable or mismatched files, patient folders
that are empty or hold no slice TIFF), a ``warning:`` line for every file it ignores (anything
that is not a slice TIFF), then a summary: patients, slices, slices with
tumour, image size, and the slices and patients of each stage of the configured split
(``data.split``, ``data.split_fractions``, ``data.num_folds``/``data.fold``...). Exit status 0
when a run would start, 1 otherwise. With ``data.on_error=skip`` the problem slices are listed
as skipped and only what cannot be skipped (nothing usable left, an empty stage) fails.
Nothing is written: no run directory and no decoded-slice cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from tlunet.cli import user_errors_exit
from tlunet.data.cache import scan_slices
from tlunet.data.datamodule import LGGDataModule
from tlunet.data.index import check_root, problem, scan_kaggle3m, stray_entries
from tlunet.data.splits import STAGES
from tlunet.errors import DataError, TlunetError


@dataclass
class CheckReport:
    """What :func:`check_dataset` found: problems (``{"path", "reason"}``) and a summary."""

    root: Path
    on_error: str
    problems: list[dict[str, str]] = field(default_factory=list)
    #: Files that are ignored (not a slice TIFF): a warning each, never a failure.
    warnings: list[dict[str, str]] = field(default_factory=list)
    patients: int = 0
    slices: int = 0
    tumour_slices: int = 0
    image_size: tuple[int, int] | None = None
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (slices, patients)
    #: Problems no setting can skip (nothing usable, an empty stage): a run cannot start.
    fatal: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether a run with these settings would start."""
        return not self.fatal and (self.on_error == "skip" or not self.problems)

    def lines(self) -> list[str]:
        """The report as printed: one line per problem, then the summary."""
        skipped = " (skipped with data.on_error=skip)" if self.on_error == "skip" else ""
        out = [f"warning: {w['reason']}" for w in self.warnings]
        out += [
            p["reason"] if p["path"] in p["reason"] else f"{p['path']}: {p['reason']}"
            for p in self.problems + self.fatal
        ]
        if self.problems:
            out.append(f"{_count(len(self.problems), 'problem')}{skipped}.")
        size = f"{self.image_size[0]}x{self.image_size[1]}" if self.image_size else "-"
        out.append(
            f"{self.root}: {self.patients} patients, {self.slices} usable slices "
            f"({self.tumour_slices} with tumour), image size {size}"
        )
        for stage, (slices, patients) in self.stages.items():
            out.append(f"  {stage:<5} {slices:>6} slices  {patients:>4} patients")
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_dataset(datamodule: LGGDataModule) -> CheckReport:
    """Read every slice under ``datamodule.root`` and split the usable ones as configured.

    ``datamodule`` is an :class:`~tlunet.data.datamodule.LGGDataModule` (its settings choose the
    split); it is not set up, and nothing is written. Raises :class:`DataError` only when the
    root is missing or holds no patient folder.
    """
    root = check_root(datamodule.root)
    report = CheckReport(root=root, on_error=datamodule.on_error)
    records, problems = scan_kaggle3m(root, strict=False)
    report.warnings = stray_entries(root)
    scan = scan_slices(records)
    report.problems = sorted(problems + scan.problems, key=lambda p: p["path"])
    kept = [records[i] for i in scan.kept]
    report.patients = len({r.patient for r in kept})
    report.slices = len(kept)
    report.tumour_slices = sum(scan.has_tumour)
    report.image_size = scan.shape
    if not kept:
        report.fatal.append(problem(root, f"No usable slice under '{root}'."))
        return report
    try:
        rows = datamodule.split_rows(kept)
    except TlunetError as exc:
        report.fatal.append(problem(root, str(exc)))
        return report
    for stage in STAGES:
        report.stages[stage] = (
            len(rows[stage]),
            len({kept[i].patient for i in rows[stage]}),
        )
    if not len(rows["test"]):
        report.fatal.append(problem(root, datamodule.empty_stage_message("test")))
    return report


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="check")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data)  # validates the data settings
    datamodule.prepare_data()  # data=synthetic: writes the phantoms first
    report = check_dataset(datamodule)
    print("\n".join(report.lines()))
    if not report.ok:
        count = len(report.fatal) + (0 if report.on_error == "skip" else len(report.problems))
        raise DataError(f"{_count(count, 'problem')} in '{report.root}' (listed above).")


if __name__ == "__main__":
    main()
