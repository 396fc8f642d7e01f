"""Index a kaggle_3m-style folder.

Layout (the Kaggle "lgg-mri-segmentation" set, ``kaggle_3m/``)::

    <root>/<patient>/<patient>_<n>.tif        3-channel uint8 image, (H, W, 3)
    <root>/<patient>/<patient>_<n>_mask.tif   uint8 mask, (H, W), values {0, 255}

Slice numbers ``n`` start at 1 and are not zero-padded: they are sorted numerically.
Hidden entries and the files the Kaggle set keeps beside the patient folders (``README.md``,
``data.csv``) are ignored. Nothing else is dropped silently, so that a half-copied dataset is
never read as a smaller clean one: a patient folder that is empty or holds no slice TIFF is a
problem (:func:`scan_kaggle3m`: a run stops, or skips and lists it with
``data.on_error=skip``), and every other file (a ``.png`` in a patient folder, a slice copied
beside the folders, a sub-folder) is a warning (:func:`stray_entries`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tlunet.errors import DataError

_SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<num>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
_TIF_SUFFIXES = {".tif", ".tiff"}
#: Files the Kaggle set (and tlunet's phantoms) keep beside the patient folders.
_ROOT_FILES = re.compile(r"^(data\.csv|readme(\.\w+)?)$", re.IGNORECASE)
_LAYOUT = "<patient>_<n>.tif and <patient>_<n>_mask.tif"


@dataclass(frozen=True)
class SliceRecord:
    """One slice of one patient: where its image and mask live."""

    patient: str
    slice: int
    image_path: Path
    mask_path: Path


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_tif(path: Path) -> bool:
    return path.suffix.lower() in _TIF_SUFFIXES and path.is_file()


def patient_dirs(root: Path) -> list[Path]:
    """The patient folders of a kaggle_3m folder: visible sub-folders holding .tif files."""
    return [p for p in _visible(root) if p.is_dir() and any(map(_is_tif, _visible(p)))]


def unusable_folders(root: Path) -> list[dict[str, str]]:
    """A problem for every visible sub-folder of ``root`` that holds no slice TIFF (empty, or
    only other files), when ``root`` has patient folders at all."""
    found = []
    for folder in _visible(root):
        if not folder.is_dir() or any(map(_is_tif, _visible(folder))):
            continue
        entries = _visible(folder)
        if not entries:
            what = "is empty"
        else:
            what = (
                f"holds no slice TIFF, only {len(entries)} other "
                f"{'entry' if len(entries) == 1 else 'entries'} such as '{entries[0].name}'"
            )
        found.append(
            problem(
                folder,
                f"Patient folder '{folder}' {what} (a half-copied dataset?): expected {_LAYOUT}.",
            )
        )
    return found


def stray_entries(root: str | Path) -> list[dict[str, str]]:
    """The files tlunet ignores under a kaggle_3m ``root``, one ``{"path", "reason"}`` each: in
    a patient folder anything but a ``.tif``/``.tiff`` file (a ``.png``, a sub-folder), beside
    the patient folders any file but ``data.csv`` and ``README*``. Hidden entries are left out,
    and so is a ``.tif`` name that is not a file (a broken link): :func:`scan_kaggle3m` makes
    it a problem, not a warning.
    They are warnings: a run goes on without them, but the user hears of each one."""
    root = Path(root).expanduser()
    found = []
    patients = set(patient_dirs(root))
    for entry in _visible(root):
        if entry.is_dir():
            if entry in patients:
                found.extend(
                    problem(f, f"'{f}' is not a slice or mask TIFF ({_LAYOUT}): ignored.")
                    for f in _visible(entry)
                    if f.suffix.lower() not in _TIF_SUFFIXES  # a .tif that is no file: a problem
                )
        elif not _ROOT_FILES.match(entry.name):
            found.append(
                problem(
                    entry,
                    f"'{entry}' lies beside the patient folders, outside any of them: ignored "
                    "(slices belong in <root>/<patient>/).",
                )
            )
    return found


def check_root(root: str | Path | None) -> Path:
    """Return ``root`` as a Path, or raise :class:`DataError` if it is not a dataset folder."""
    if root is None or str(root).strip() in ("", "???"):
        raise DataError(
            "data.root is not set. Pass data.root=/path/to/kaggle_3m (the folder holding one "
            "folder per patient), or use data=synthetic for generated phantoms."
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root '{path}' does not exist.")
    if not path.is_dir():
        raise DataError(f"data.root '{path}' is not a folder.")
    return path


def problem(path: str | Path, reason: str) -> dict[str, str]:
    """One problem of a dataset: the offending file (or folder) and what is wrong with it."""
    return {"path": str(path), "reason": reason}


def _not_a_file(path: Path) -> str:
    """Why a slice name that is no regular file cannot be read."""
    if path.is_symlink() and not path.exists():
        return (
            f"Slice file '{path}' is a broken symbolic link (to '{os.readlink(path)}', which "
            "does not exist)."
        )
    return f"Slice file '{path}' is not a file (a folder?)."


def index_kaggle3m(root: str | Path) -> list[SliceRecord]:
    """Scan ``root`` and return its slices sorted by (patient, slice number).

    Raises :class:`DataError` naming the offending path when the folder holds no patient
    folders, a file name does not follow ``<patient>_<n>[_mask].tif``, a slice has no mask
    (or a mask no slice), a slice number appears twice, or a patient folder is empty or holds
    no slice TIFF.
    """
    return scan_kaggle3m(root, strict=True)[0]


def scan_kaggle3m(
    root: str | Path, strict: bool = True
) -> tuple[list[SliceRecord], list[dict[str, str]]]:
    """Scan ``root`` like :func:`index_kaggle3m`, returning ``(records, problems)``.

    ``strict=True`` raises :class:`DataError` at the first problem (``problems`` is then always
    empty). ``strict=False`` drops each problematic slice and records one problem
    (``{"path", "reason"}``) per offending file: a file name without a numeric slice number
    (the file is ignored), a slice name that is not a readable file (a broken symbolic link, a
    folder: the slice is dropped), a slice number given twice (every file of that slice number
    is dropped: which one is right cannot be told), an image without a mask or a mask without an
    image, a patient folder without slices (empty, or holding other files only: the folder is
    the problem's path). A missing root or a root without patient folders always raises.
    Files that are not TIFFs are not problems but warnings: :func:`stray_entries`.
    """
    root = check_root(root)
    patients = patient_dirs(root)
    if not patients:
        hint = ""
        if (root / "kaggle_3m").is_dir():
            hint = f" Did you mean data.root={root / 'kaggle_3m'}?"
        raise DataError(
            f"No patient folders with .tif slices found in data.root '{root}'. Expected "
            f"<root>/<patient>/<patient>_<n>.tif and <patient>_<n>_mask.tif.{hint}"
        )
    records: list[SliceRecord] = []
    problems: list[dict[str, str]] = []

    def report(path: Path, reason: str) -> None:
        if strict:
            raise DataError(reason)
        problems.append(problem(path, reason))

    for unusable in unusable_folders(root):
        if strict:
            raise DataError(
                f"{unusable['reason']} Remove it, or run with data.on_error=skip to leave it "
                "out (listed in the run's skipped_files.csv)."
            )
        problems.append(unusable)

    for pdir in patients:
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        dropped: set[int] = set()
        for f in sorted(pdir.iterdir()):
            if f.suffix.lower() not in _TIF_SUFFIXES or f.name.startswith("."):
                continue
            m = _SLICE_RE.match(f.name)
            if not f.is_file():
                report(f, _not_a_file(f))
                if m is not None:  # the slice goes whole: its other file is not listed
                    dropped.add(int(m.group("num")))
                continue
            if m is None:
                report(
                    f,
                    f"Cannot read a slice number from '{f}': expected "
                    f"<patient>_<n>.tif or <patient>_<n>_mask.tif with a numeric <n>.",
                )
                continue
            num = int(m.group("num"))
            target = masks if m.group("mask") else images
            if num in target:
                report(f, f"Slice {num} appears twice in '{pdir}': '{target[num]}' and '{f}'.")
                dropped.add(num)
                continue
            target[num] = f
        for num in sorted(images.keys() - masks.keys() - dropped):
            report(
                images[num],
                f"Missing mask for image '{images[num]}': expected "
                f"'{images[num].with_name(images[num].stem + '_mask' + images[num].suffix)}'.",
            )
        for num in sorted(masks.keys() - images.keys() - dropped):
            report(masks[num], f"Mask '{masks[num]}' has no matching image in '{pdir}'.")
        records.extend(
            SliceRecord(pdir.name, num, images[num], masks[num])
            for num in sorted((images.keys() & masks.keys()) - dropped)
        )
    return records, problems
