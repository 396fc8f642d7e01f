"""Segment new slices with a trained checkpoint.

    python -m tlunet.predict ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt input=PATH output=DIR

PATH is a .tif/.png slice (H, W, 3 uint8: pre-contrast, FLAIR, post-contrast), a folder of
slices, or a kaggle_3m patient folder (its ``*_mask.tif`` files are ignored). For every slice
``<name>.<ext>``, DIR receives ``masks/<name>.tif`` (the input's name; uint8 0/255, the
input's height and width) and ``overlays/<name>.png`` (the prediction's contour in red on the
FLAIR channel), and ``tumour_area.csv`` lists the tumour area per slice (and, for a model
trained with the aux head, the head's slice-level tumour probability,
``aux_tumour_probability``, and its answer at 0.5). Resizing and
normalisation come from the checkpoint; the probabilities are resized back to each input's size
and then thresholded (:mod:`tlunet.scoring`), exactly as ``tlunet.evaluate`` scores them. The output folder must differ from the input's:
nothing is ever overwritten there.
"""

from __future__ import annotations

import logging
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
from tlunet.data.transforms import build_transform
from tlunet.errors import ConfigError, DataError
from tlunet.scoring import native_masks
from tlunet.utils import csv_text, write_text_atomic

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


@torch.no_grad()
def predict(cfg: DictConfig) -> Path:
    if not cfg.ckpt_path or not cfg.input or not cfg.output:
        raise ConfigError(
            "ckpt_path, input and output must all be given: "
            "python -m tlunet.predict ckpt_path=... input=PATH output=DIR"
        )
    source = Path(str(cfg.input)).expanduser()
    out = Path(str(cfg.output)).expanduser()
    files = list_inputs(source)
    input_dirs = {f.parent.resolve() for f in files}
    if {out.resolve(), (out / "masks").resolve(), (out / "overlays").resolve()} & input_dirs:
        raise ConfigError(
            f"output '{out}' is the input's folder: predictions would sit beside (and could "
            "overwrite) the input files. Choose another output folder."
        )
    checkpoint = load_checkpoint(cfg.ckpt_path)
    pre = (checkpoint.get("tlunet") or {}).get("preprocessing")
    if not pre:
        raise ConfigError(f"Checkpoint '{cfg.ckpt_path}' records no preprocessing.")
    module = module_from_checkpoint(checkpoint)
    device = torch.device("cuda" if cfg.accelerator == "gpu" else "cpu")
    module.to(device)
    threshold = cfg.threshold if cfg.threshold is not None else module.threshold
    transform = build_transform(pre["image_size"], pre["mean"], pre["std"])
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    rows = []
    for start in range(0, len(files), cfg.batch_size):
        chunk = files[start : start + cfg.batch_size]
        images = [read_slice(f) for f in chunk]
        batch = torch.stack([transform(image=im, mask=im[..., 0])["image"] for im in images])
        probs, detect = module.predict_probs(batch.to(device))
        probs = probs.cpu()
        detect = [None] * len(chunk) if detect is None else detect.float().cpu().tolist()
        for f, image, prob, head in zip(chunk, images, probs, detect, strict=True):
            h, w = image.shape[:2]
            # The input's own size, through the path every score takes (tlunet.scoring).
            mask = native_masks(prob[None], (h, w), threshold)[0, 0].numpy().astype(np.uint8)
            tifffile.imwrite(out / "masks" / f"{f.stem}.tif", mask * 255, photometric="minisblack")
            cv2.imwrite(
                str(out / "overlays" / f"{f.stem}.png"),
                cv2.cvtColor(overlay(image, mask), cv2.COLOR_RGB2BGR),
            )
            area = int(mask.sum())
            row = [f.name, h, w, area, area / (h * w)]
            rows.append(row if head is None else [*row, round(head, 6), int(head >= 0.5)])
    header = ["file", "height", "width", "tumour_pixels", "tumour_fraction"]
    if module.has_aux:
        header += ["aux_tumour_probability", "aux_tumour_detected"]
    write_text_atomic(out / "tumour_area.csv", csv_text(header, rows))
    print(f"{len(files)} slices segmented into {out}: masks/, overlays/, tumour_area.csv")
    return out


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="predict")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
