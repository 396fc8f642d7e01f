"""Segment new slices, kaggle_3m folders and NIfTI volumes with a trained checkpoint.

    python -m tlunet.predict ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt input=PATH output=DIR

PATH is a .tif/.png slice (H, W, 3 uint8: pre-contrast, FLAIR, post-contrast), a folder of
slices, or a kaggle_3m patient folder (its ``*_mask.tif`` files are ignored). For every slice
``<name>.<ext>``, DIR receives ``masks/<name>.tif`` (the input's name; uint8 0/255, the
input's height and width) and ``overlays/<name>.png`` (the prediction's contour in red on the
FLAIR channel), and ``tumour_area.csv`` lists the tumour area per slice (and, for a model
trained with the aux head, the head's slice-level tumour probability,
``aux_tumour_probability``, and its answer at 0.5). Resizing and
normalisation come from the checkpoint; the probabilities are resized back to each input's size
and then thresholded (:mod:`tlunet.scoring`), exactly as ``tlunet.evaluate`` scores them.

PATH may also be a kaggle_3m folder (of patient folders): ``DIR/<patient>/`` as above for each
patient, and ``DIR/tumour_volume.csv`` with one row per patient (slices, slices with tumour,
tumour pixels: the slices carry no voxel size, so no mm or mL). Or a folder holding one
patient's NIfTI volumes (:mod:`tlunet.nifti`, keys ``nifti.*``): its axial slices are segmented
the same way and DIR receives ``mask.nii.gz`` (uint8 0/1 on the FLAIR volume's grid, its
affine) and ``tumour_volume.json`` (voxels and mL). Every input problem is reported before the
checkpoint is loaded. The output folder must differ from the input's: nothing is ever
overwritten there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
import tifffile
import torch
from omegaconf import DictConfig

from tlunet.checkpoint import load_checkpoint, module_from_checkpoint
from tlunet.cli import user_errors_exit
from tlunet.data.cache import read_image
from tlunet.data.index import patient_dirs
from tlunet.data.transforms import build_transform
from tlunet.errors import ConfigError, DataError
from tlunet.nifti import ROLES, is_nifti, read_case, write_mask
from tlunet.scoring import native_masks
from tlunet.utils import csv_text, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
SUFFIXES = {".tif", ".tiff", ".png"}


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


@dataclass
class Predictor:
    """A checkpoint's network with its preprocessing: (H, W, 3) uint8 slices in, masks out."""

    module: torch.nn.Module
    transform: Callable
    threshold: float
    device: torch.device
    batch_size: int

    @classmethod
    def load(cls, cfg: DictConfig) -> Predictor:
        checkpoint = load_checkpoint(cfg.ckpt_path)
        pre = (checkpoint.get("tlunet") or {}).get("preprocessing")
        if not pre:
            raise ConfigError(f"Checkpoint '{cfg.ckpt_path}' records no preprocessing.")
        module = module_from_checkpoint(checkpoint)
        device = torch.device("cuda" if cfg.accelerator == "gpu" else "cpu")
        module.to(device)
        threshold = cfg.threshold if cfg.threshold is not None else module.threshold
        transform = build_transform(pre["image_size"], pre["mean"], pre["std"])
        return cls(module, transform, threshold, device, int(cfg.batch_size))

    @property
    def has_aux(self) -> bool:
        return bool(self.module.has_aux)

    @torch.no_grad()
    def masks(self, images: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, float | None]]:
        """For each (H, W, 3) uint8 image: its uint8 0/1 mask (H, W) and the aux head's tumour
        probability (``None`` without a head). The probabilities are resized back to each
        input's size and then thresholded, the path every score takes (tlunet.scoring)."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = torch.stack(
                [self.transform(image=im, mask=im[..., 0])["image"] for im in chunk]
            )
            probs, detect = self.module.predict_probs(batch.to(self.device))
            probs = probs.cpu()
            detect = [None] * len(chunk) if detect is None else detect.float().cpu().tolist()
            for image, prob, head in zip(chunk, probs, detect, strict=True):
                size = image.shape[:2]
                mask = native_masks(prob[None], size, self.threshold)[0, 0].numpy()
                yield mask.astype(np.uint8), head


def segment_files(predictor: Predictor, files: list[Path], out: Path) -> list[list]:
    """Segment slice files into ``out`` (masks/, overlays/, tumour_area.csv); return the rows
    of tumour_area.csv."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    rows = []
    for start in range(0, len(files), predictor.batch_size):
        chunk = files[start : start + predictor.batch_size]
        images = [read_slice(f) for f in chunk]
        for f, image, (mask, head) in zip(chunk, images, predictor.masks(images), strict=True):
            h, w = image.shape[:2]
            tifffile.imwrite(out / "masks" / f"{f.stem}.tif", mask * 255, photometric="minisblack")
            cv2.imwrite(
                str(out / "overlays" / f"{f.stem}.png"),
                cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR),
            )
            area = int(mask.sum())
            row = [f.name, h, w, area, area / (h * w)]
            rows.append(row if head is None else [*row, round(head, 6), int(head >= 0.5)])
    header = ["file", "height", "width", "tumour_pixels", "tumour_fraction"]
    if predictor.has_aux:
        header += ["aux_tumour_probability", "aux_tumour_detected"]
    write_text_atomic(out / "tumour_area.csv", csv_text(header, rows))
    return rows


def _refuse_beside_inputs(out: Path, written: set[Path], inputs: set[Path]) -> None:
    if {p.resolve() for p in written} & {p.resolve() for p in inputs}:
        raise ConfigError(
            f"output '{out}' is the input's folder: predictions would sit beside (and could "
            "overwrite) the input files. Choose another output folder."
        )


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


def predict_nifti(cfg: DictConfig, source: Path, out: Path) -> Path:
    """One NIfTI case: ``out/mask.nii.gz`` (uint8 0/1, the FLAIR volume's grid and affine) and
    ``out/tumour_volume.json``."""
    nifti_cfg = cfg.nifti
    case = read_case(
        source,
        {role: nifti_cfg[role] for role in ROLES},
        str(nifti_cfg.channels),
        list(nifti_cfg.percentiles),
        list(nifti_cfg.levels),
    )
    _refuse_beside_inputs(out, {out}, {case.folder})
    for warning in case.warnings:
        log.warning(warning)
    predictor = Predictor.load(cfg)  # only now: every input problem is reported before
    results = list(predictor.masks(list(case.slices)))
    volume = case.mask_volume(np.stack([mask for mask, _ in results]))
    out.mkdir(parents=True, exist_ok=True)
    write_mask(out / "mask.nii.gz", volume, case.reference)
    summary = {
        "inputs": {role: str(path) for role, path in case.files.items()},
        "channels": str(nifti_cfg.channels),
        "intensity": {
            "percentiles": list(nifti_cfg.percentiles),
            "levels": list(nifti_cfg.levels),
        },
        "checkpoint": str(cfg.ckpt_path),
        "threshold": float(predictor.threshold),
        **case.summary(volume),
    }
    if predictor.has_aux:
        summary["aux_slices_with_tumour"] = sum(int(h >= 0.5) for _, h in results)
    write_json_atomic(out / "tumour_volume.json", summary)
    print(
        f"{len(case.slices)} axial slices of '{case.files['flair']}' segmented into {out}: "
        f"mask.nii.gz, tumour_volume.json ({summary['tumour_volume_ml']:.2f} mL)"
    )
    return out


def predict_root(cfg: DictConfig, source: Path, out: Path) -> Path:
    """A kaggle_3m folder: ``out/<patient>/`` as for one patient folder, plus
    ``out/tumour_volume.csv`` (one row per patient: slices, tumour slices and pixels)."""
    patients = {p.name: list_inputs(p) for p in patient_dirs(source)}
    written = {out} | {out / name / sub for name in patients for sub in ("", "masks", "overlays")}
    _refuse_beside_inputs(out, written, {source, *(source / name for name in patients)})
    predictor = Predictor.load(cfg)
    rows = []
    for name, files in patients.items():
        areas = [row[3] for row in segment_files(predictor, files, out / name)]
        rows.append([name, len(files), sum(a > 0 for a in areas), sum(areas)])
    header = ["patient", "slices", "slices_with_tumour", "tumour_pixels"]
    write_text_atomic(out / "tumour_volume.csv", csv_text(header, rows))
    print(
        f"{len(patients)} patients ({sum(r[1] for r in rows)} slices) segmented into {out}: "
        "<patient>/masks, overlays, tumour_area.csv; tumour_volume.csv"
    )
    return out


def predict(cfg: DictConfig) -> Path:
    if not cfg.ckpt_path or not cfg.input or not cfg.output:
        raise ConfigError(
            "ckpt_path, input and output must all be given: "
            "python -m tlunet.predict ckpt_path=... input=PATH output=DIR"
        )
    source = Path(str(cfg.input)).expanduser()
    out = Path(str(cfg.output)).expanduser()
    kind = input_kind(source)
    if kind == "nifti":
        return predict_nifti(cfg, source, out)
    if cfg.nifti.channels != "all":
        raise ConfigError(
            f"nifti.channels={cfg.nifti.channels} applies to NIfTI input only; input "
            f"'{source}' holds slices."
        )
    if kind == "root":
        return predict_root(cfg, source, out)
    files = list_inputs(source)
    written = {out, out / "masks", out / "overlays"}
    _refuse_beside_inputs(out, written, {f.parent for f in files})
    predictor = Predictor.load(cfg)
    segment_files(predictor, files, out)
    print(f"{len(files)} slices segmented into {out}: masks/, overlays/, tumour_area.csv")
    return out


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="predict")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
