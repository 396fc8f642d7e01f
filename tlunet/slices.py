"""Slice files in, prediction files out: the part of prediction that needs no PyTorch.

``tlunet.predict`` (a checkpoint, PyTorch) and ``tlunet.predict_onnx`` (an exported model,
onnxruntime) differ only in how a batch of slices becomes probabilities; both hand that step
to :func:`segment`, which lists and reads the inputs, resizes the probabilities back to each
slice's size and thresholds them (:func:`tlunet.resolution.native_masks`), and writes
``masks/<name>.tif`` (uint8 0/255), ``overlays/<name>.png`` and ``tumour_area.csv``, each
atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import tifffile

from tlunet.data.cache import read_image
from tlunet.errors import ConfigError, DataError
from tlunet.resolution import native_masks
from tlunet.utils import atomic_path, csv_text, write_text_atomic

SUFFIXES = {".tif", ".tiff", ".png"}
#: tumour_area.csv's columns; the aux head's two follow for a model that has one.
CSV_COLUMNS = ["file", "height", "width", "tumour_pixels", "tumour_fraction"]
AUX_COLUMNS = ["aux_tumour_probability", "aux_tumour_detected"]

#: Images (each (H, W, 3) uint8) -> tumour probabilities (N, 1, S, S) float32 and the aux
#: head's slice-level tumour probabilities (N,) (``None`` for a model without the head).
Infer = Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray | None]]


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
        raise DataError(f"input folder '{path}' holds no .tif or .png slices.")

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


def segment(
    files: Sequence[Path],
    out: Path,
    infer: Infer,
    threshold: float,
    batch_size: int,
    has_aux: bool,
) -> Path:
    """Segment ``files`` ``batch_size`` at a time with ``infer`` and write into ``out``:
    ``masks/<stem>.tif`` (uint8 0/255 at the input's height and width: the probabilities
    resized back, then ``>= threshold``), ``overlays/<stem>.png`` (:func:`overlay`) and
    ``tumour_area.csv`` (one row per file; :data:`AUX_COLUMNS` too when ``has_aux``: the head's
    probability rounded to 6 decimals and its answer at 0.5)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [read_slice(f) for f in chunk]
        probs, detect = infer(images)
        heads = [None] * len(chunk) if detect is None else [float(d) for d in detect]
        for f, image, prob, head in zip(chunk, images, probs, heads, strict=True):
            h, w = image.shape[:2]
            mask = native_masks(prob, (h, w), threshold)[0].astype(np.uint8)
            with atomic_path(out / "masks" / f"{f.stem}.tif") as tmp:
                tifffile.imwrite(tmp, mask * 255, photometric="minisblack")
            png = cv2.imencode(".png", cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR))[1]
            with atomic_path(out / "overlays" / f"{f.stem}.png") as tmp:
                tmp.write_bytes(png.tobytes())
            area = int(mask.sum())
            row = [f.name, h, w, area, area / (h * w)]
            rows.append(row if head is None else [*row, round(head, 6), int(head >= 0.5)])
    header = CSV_COLUMNS + (AUX_COLUMNS if has_aux else [])
    write_text_atomic(out / "tumour_area.csv", csv_text(header, rows))
    print(f"{len(files)} slices segmented into {out}: masks/, overlays/, tumour_area.csv")
    return out
