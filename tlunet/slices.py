"""Slice files in, prediction files out: the part of prediction that needs no PyTorch.

``tlunet.predict`` (a checkpoint, PyTorch) and ``tlunet.predict_onnx`` (an exported model,
onnxruntime) differ only in how a batch of slices becomes probabilities; both hand that step
to :func:`run_prediction`, which works out the input's kind (slices, a kaggle_3m folder of
patient folders, a NIfTI case), lists and reads the inputs, resizes the probabilities back to
each slice's size and thresholds them (:func:`tlunet.resolution.native_masks`), and writes
``masks/<name>.tif`` (uint8 0/255), ``overlays/<name>.png`` and ``tumour_area.csv`` (per
patient for a kaggle_3m folder, with ``tumour_volume.csv``), or ``mask.nii.gz`` and
``tumour_volume.json`` for NIfTI, each atomically. Every input problem is reported before the
model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from tlunet.data.cache import read_image
from tlunet.data.index import patient_dirs
from tlunet.errors import ConfigError, DataError
from tlunet.nifti import ROLES, is_nifti, read_case, write_mask
from tlunet.resolution import native_masks
from tlunet.utils import (
    atomic_path,
    csv_text,
    names_and_more,
    not_a_folder,
    progress,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

SUFFIXES = {".tif", ".tiff", ".png"}
#: tumour_area.csv's columns; the aux head's two follow for a model that has one.
CSV_COLUMNS = ["file", "height", "width", "tumour_pixels", "tumour_fraction"]
AUX_COLUMNS = ["aux_tumour_probability", "aux_tumour_detected"]

#: Images (each (H, W, 3) uint8) -> tumour probabilities (N, 1, S, S) float32 and the aux
#: head's slice-level tumour probabilities (N,) (``None`` for a model without the head).
Infer = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray | None]]
#: Loads the model only once the inputs are known to be good: (infer, threshold, has_aux).
Loader = Callable[[], tuple[Infer, float, bool]]


def list_inputs(path: Path) -> list[Path]:
    """The slice files named by ``path`` (a file or a folder), masks excluded, sorted naturally."""
    if not path.exists():
        raise DataError(f"input '{path}' does not exist.")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(f"input '{path}' is not a .tif or .png slice.")
        return [path]
    files = [
        p
        for p in path.iterdir()
        if p.suffix.lower() in SUFFIXES
        and not p.stem.endswith("_mask")
        and not p.name.startswith(".")
    ]
    if not files:
        raise DataError(
            f"input folder '{path}' holds no .tif or .png slices, no patient folders and no "
            "NIfTI volumes."
        )

    def natural(p: Path) -> tuple:
        stem, _, number = p.stem.rpartition("_")
        return (stem, int(number)) if number.isdigit() else (p.stem, -1)

    return sorted(files, key=natural)


def read_slice(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from a .tif (as stored) or .png (converted from OpenCV's BGR)."""
    if path.suffix.lower() == ".png":
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise DataError(f"Cannot read image '{path}'.")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(
                f"Image '{path}' has shape {image.shape} {image.dtype}; expected (H, W, 3) uint8."
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return read_image(path)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """FLAIR channel in grey with the mask's contour in red, (H, W, 3) uint8 RGB."""
    flair = image[..., 1]
    rgb = np.stack([flair, flair, flair], axis=-1).copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, (255, 0, 0), 1)
    return rgb


def prediction_inputs(source: Path, out: Path) -> list[Path]:
    """The slices of ``source`` (:func:`list_inputs`), after checking that ``out`` is not
    their folder (nothing beside the inputs is ever written or overwritten)."""
    files = list_inputs(source)
    input_dirs = {f.parent.resolve() for f in files}
    if {out.resolve(), (out / "masks").resolve(), (out / "overlays").resolve()} & input_dirs:
        raise ConfigError(
            f"output '{out}' is the input's folder: predictions would sit beside (and could "
            "overwrite) the input files. Choose another output folder."
        )
    return files


def segment_images(
    images: Sequence[np.ndarray], infer: Infer, threshold: float, batch_size: int
) -> Iterator[tuple[np.ndarray, float | None]]:
    """For each (H, W, 3) uint8 image: its uint8 0/1 mask at the image's own size (the
    probabilities resized back, then ``>= threshold``: the path every score takes) and the aux
    head's tumour probability (``None`` for a model without the head)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        probs, detect = infer(chunk)
        heads = [None] * len(chunk) if detect is None else [float(d) for d in detect]
        for image, prob, head in zip(chunk, probs, heads, strict=True):
            yield native_masks(prob, image.shape[:2], threshold)[0].astype(np.uint8), head


def segment(
    files: Sequence[Path],
    out: Path,
    infer: Infer,
    threshold: float,
    batch_size: int,
    has_aux: bool,
) -> list[list]:
    """Segment ``files`` ``batch_size`` at a time with ``infer`` and write into ``out``:
    ``masks/<stem>.tif`` (uint8 0/255 at the input's height and width: the probabilities
    resized back, then ``>= threshold``), ``overlays/<stem>.png`` (:func:`overlay`) and
    ``tumour_area.csv`` (one row per file; :data:`AUX_COLUMNS` too when ``has_aux``: the head's
    probability rounded to 6 decimals and its answer at 0.5). Returns the CSV's rows."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    rows = []
    intact = "the input slices are intact and every mask written before it is complete"
    starts = range(0, len(files), batch_size)
    for start in progress(starts, f"Segmenting {len(files)} slices into {out.name}"):
        chunk = files[start : start + batch_size]
        images = [read_slice(f) for f in chunk]
        results = segment_images(images, infer, threshold, batch_size)
        for f, image, (mask, head) in zip(chunk, images, results, strict=True):
            h, w = image.shape[:2]
            with atomic_path(out / "masks" / f"{f.stem}.tif", intact) as tmp:
                tifffile.imwrite(tmp, mask * 255, photometric="minisblack")
            png = cv2.imencode(".png", cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))[1]
            with atomic_path(out / "overlays" / f"{f.stem}.png", intact) as tmp:
                tmp.write_bytes(png.tobytes())
            area = int(mask.sum())
            row = [f.name, h, w, area, area / (h * w)]
            rows.append(row if head is None else [*row, round(head, 6), int(head >= 0.5)])
    header = CSV_COLUMNS + (AUX_COLUMNS if has_aux else [])
    write_text_atomic(out / "tumour_area.csv", csv_text(header, rows), intact)
    return rows


def _refuse_beside_inputs(out: Path, written: set[Path], inputs: set[Path]) -> None:
    if {p.resolve() for p in written} & {p.resolve() for p in inputs}:
        raise ConfigError(
            f"output '{out}' is the input's folder: predictions would sit beside (and could "
            "overwrite) the input files. Choose another output folder."
        )


def check_output_folder(out: Path) -> None:
    """Refuse an output that is not a folder (an existing file, or a path under one), before
    anything is read or loaded: predictions are a folder's files."""
    found = not_a_folder(out)
    if found is not None:
        culprit, kind = found
        the = kind.replace("a ", "the ", 1)
        where = f"is {kind}" if culprit == out else f"lies under {the} '{culprit}'"
        raise ConfigError(
            f"output '{out}' {where}: output names the folder the predictions are written into "
            "(masks/, overlays/, tumour_area.csv; NIfTI: mask.nii.gz, tumour_volume.json)."
        )


def refuse_existing_outputs(out: Path, targets: Iterable[Path]) -> None:
    """Refuse, before the model is loaded, a prediction whose files (``targets``) exist in
    ``out`` already: an earlier prediction's, which this one would replace."""
    existing = [t for t in targets if t.exists()]
    if existing:
        names = [str(t.relative_to(out)) if t.is_relative_to(out) else str(t) for t in existing]
        raise ConfigError(
            f"output '{out}' already holds a prediction ({names_and_more(names, 3)}), which "
            "this one would replace: choose a new output folder, or remove it."
        )


def slice_outputs(out: Path, files: Sequence[Path]) -> list[Path]:
    """The files :func:`segment` writes into ``out`` for ``files``."""
    return [
        out / "tumour_area.csv",
        *(out / "masks" / f"{f.stem}.tif" for f in files),
        *(out / "overlays" / f"{f.stem}.png" for f in files),
    ]


def input_kind(source: Path) -> str:
    """``nifti`` (a NIfTI file, or a folder of NIfTI volumes), ``slices`` (a slice file, a
    folder of slices, a patient folder) or ``root`` (a kaggle_3m folder of patient folders)."""
    if not source.exists():
        raise DataError(f"input '{source}' does not exist.")
    if source.is_file():
        return "nifti" if is_nifti(source) else "slices"
    entries = [p for p in source.iterdir() if not p.name.startswith(".")]
    has_nifti = any(is_nifti(p) for p in entries)
    has_slices = any(p.suffix.lower() in SUFFIXES for p in entries)
    if has_nifti and has_slices:
        raise DataError(
            f"input folder '{source}' holds both NIfTI volumes and .tif/.png slices; "
            "give a folder of one kind."
        )
    if has_nifti:
        return "nifti"
    if not has_slices and patient_dirs(source):
        return "root"
    return "slices"


def run_prediction(
    source: Path, out: Path, load: Loader, batch_size: int, nifti: Mapping[str, Any]
) -> Path:
    """Segment ``source`` (any input kind, :func:`input_kind`) into ``out`` with the model
    ``load`` returns, called once the inputs have been checked and ``out`` is known to be a
    folder (or a new path) holding no earlier prediction's files of the same names."""
    check_output_folder(out)
    kind = input_kind(source)
    if kind == "nifti":
        return _predict_nifti(source, out, load, batch_size, nifti)
    if nifti["channels"] != "all":
        raise ConfigError(
            f"nifti.channels={nifti['channels']} applies to NIfTI input only; input "
            f"'{source}' holds slices."
        )
    if kind == "root":
        return _predict_root(source, out, load, batch_size)
    files = prediction_inputs(source, out)
    refuse_existing_outputs(out, slice_outputs(out, files))
    infer, threshold, has_aux = load()
    segment(files, out, infer, threshold, batch_size, has_aux)
    print(f"{len(files)} slices segmented into {out}: masks/, overlays/, tumour_area.csv")
    return out


def _predict_root(source: Path, out: Path, load: Loader, batch_size: int) -> Path:
    """A kaggle_3m folder: ``out/<patient>/`` as for one patient folder, plus
    ``out/tumour_volume.csv`` (one row per patient: slices, tumour slices and pixels)."""
    patients = {p.name: list_inputs(p) for p in patient_dirs(source)}
    written = {out} | {out / name / sub for name in patients for sub in ("", "masks", "overlays")}
    _refuse_beside_inputs(out, written, {source, *(source / name for name in patients)})
    targets = [out / "tumour_volume.csv"]
    for name, files in patients.items():
        targets += slice_outputs(out / name, files)
    refuse_existing_outputs(out, targets)
    infer, threshold, has_aux = load()
    rows = []
    for name, files in progress(list(patients.items()), f"Segmenting {len(patients)} patients"):
        segmented = segment(files, out / name, infer, threshold, batch_size, has_aux)
        areas = [row[3] for row in segmented]
        rows.append([name, len(files), sum(a > 0 for a in areas), sum(areas)])
    header = ["patient", "slices", "slices_with_tumour", "tumour_pixels"]
    write_text_atomic(out / "tumour_volume.csv", csv_text(header, rows))
    print(
        f"{len(patients)} patients ({sum(r[1] for r in rows)} slices) segmented into {out}: "
        "<patient>/masks, overlays, tumour_area.csv; tumour_volume.csv"
    )
    return out


def _predict_nifti(
    source: Path, out: Path, load: Loader, batch_size: int, nifti: Mapping[str, Any]
) -> Path:
    """One NIfTI case: ``out/mask.nii.gz`` (uint8 0/1, the FLAIR volume's grid and affine) and
    ``out/tumour_volume.json``."""
    case = read_case(
        source,
        {role: nifti[role] for role in ROLES},
        str(nifti["channels"]),
        list(nifti["percentiles"]),
        list(nifti["levels"]),
    )
    _refuse_beside_inputs(out, {out}, {case.folder})
    refuse_existing_outputs(out, [out / "mask.nii.gz", out / "tumour_volume.json"])
    for warning in case.warnings:
        log.warning(warning)
    infer, threshold, has_aux = load()  # only now: every input problem is reported before
    slices = list(case.slices)
    results = []
    for start in progress(range(0, len(slices), batch_size), f"Segmenting {len(slices)} slices"):
        results += segment_images(slices[start : start + batch_size], infer, threshold, batch_size)
    volume = case.mask_volume(np.stack([mask for mask, _ in results]))
    out.mkdir(parents=True, exist_ok=True)
    write_mask(out / "mask.nii.gz", volume, case.reference)
    summary = {
        "inputs": {role: str(path) for role, path in case.files.items()},
        "channels": str(nifti["channels"]),
        "intensity": {"percentiles": list(nifti["percentiles"]), "levels": list(nifti["levels"])},
        "threshold": float(threshold),
        **case.summary(volume),
    }
    if has_aux:
        summary["aux_slices_with_tumour"] = sum(int(h >= 0.5) for _, h in results)
    write_json_atomic(out / "tumour_volume.json", summary)
    print(
        f"{len(case.slices)} axial slices of '{case.files['flair']}' segmented into {out}: "
        f"mask.nii.gz, tumour_volume.json ({summary['tumour_volume_ml']:.2f} mL)"
    )
    return out
