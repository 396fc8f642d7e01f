"""Segment new slices, kaggle_3m folders and NIfTI volumes with a trained checkpoint.

    python -m tlunet.predict ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt input=PATH output=DIR

PATH is a .tif/.png slice (H, W, 3 uint8: pre-contrast, FLAIR, post-contrast), a folder of
slices, or a kaggle_3m patient folder (its ``*_mask.tif`` files are ignored). For every slice
``<name>.<ext>``, DIR receives ``masks/<name>.tif`` (the input's name; uint8 0/255, the
input's height and width) and ``overlays/<name>.png`` (the prediction's contour in red on the
FLAIR channel), and ``tumour_area.csv`` lists the tumour area per slice (and, for a model
trained with the aux head, the head's slice-level tumour probability,
``aux_tumour_probability``, and its answer at 0.5). Resizing and normalisation come from the
checkpoint; the probabilities are resized back to each input's size and then thresholded
(:mod:`tlunet.resolution`), exactly as ``tlunet.evaluate`` scores them, in the same precision
(``precision=``, by default that of the checkpoint's run: :mod:`tlunet.precision`).

PATH may also be a kaggle_3m folder (of patient folders): ``DIR/<patient>/`` as above for each
patient, and ``DIR/tumour_volume.csv`` with one row per patient (slices, slices with tumour,
tumour pixels: the slices carry no voxel size, so no mm or mL). Or a folder holding one
patient's NIfTI volumes (:mod:`tlunet.nifti`, keys ``nifti.*``): its axial slices are segmented
the same way and DIR receives ``mask.nii.gz`` (uint8 0/1 on the FLAIR volume's grid, its
affine) and ``tumour_volume.json`` (voxels and mL). Every input problem is reported before the
checkpoint is loaded, and so is every output problem: the output folder must differ from the
input's (nothing is ever overwritten there), must be a folder, and must not hold an earlier
prediction's files of the same names (they are never replaced). Everything but the network is :func:`tlunet.slices.run_prediction`, shared
with ``tlunet.predict_onnx``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from tlunet.artifacts import checkpoint_section
from tlunet.checkpoint import load_checkpoint
from tlunet.cli import user_errors_exit
from tlunet.data.transforms import build_transform
from tlunet.errors import ConfigError
from tlunet.inference import ForwardPrecision, network_from_checkpoint
from tlunet.precision import checkpoint_precision
from tlunet.slices import Infer, run_prediction

log = logging.getLogger(__name__)


def checkpoint_loader(cfg: DictConfig) -> tuple[Infer, float, bool]:
    """The checkpoint's network as an :data:`tlunet.slices.Infer`, its threshold (or
    ``cfg.threshold``) and whether it has the aux head. Runs through :mod:`tlunet.inference`:
    the network alone, without the training module or Lightning."""
    checkpoint = load_checkpoint(cfg.ckpt_path)
    pre = checkpoint_section(checkpoint).get("preprocessing")
    if not pre:
        raise ConfigError(f"Checkpoint '{cfg.ckpt_path}' records no preprocessing.")
    network = network_from_checkpoint(checkpoint)
    device = torch.device("cuda" if cfg.accelerator == "gpu" else "cpu")
    # The precision tlunet.evaluate runs the checkpoint in (by default its run's): the masks
    # written here are the ones it scores.
    precision = checkpoint_precision(
        checkpoint, cfg.ckpt_path, cfg.accelerator, cfg.get("precision"), "precision"
    )
    log.info("Running the model in %s: %s", precision.precision, precision.source)
    network.to(device, ForwardPrecision(precision.precision, device.type))
    threshold = cfg.threshold if cfg.threshold is not None else network.threshold
    transform = build_transform(pre["image_size"], pre["mean"], pre["std"])

    def infer(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        batch = torch.stack([transform(image=im, mask=im[..., 0])["image"] for im in images])
        probs, detect = network.probabilities(batch.to(device))
        return probs.float().cpu().numpy(), None if detect is None else detect.float().cpu().numpy()

    return infer, float(threshold), network.has_aux


def predict(cfg: DictConfig) -> Path:
    if not cfg.ckpt_path or not cfg.input or not cfg.output:
        raise ConfigError(
            "ckpt_path, input and output must all be given: "
            "python -m tlunet.predict ckpt_path=... input=PATH output=DIR"
        )
    return run_prediction(
        Path(str(cfg.input)).expanduser(),
        Path(str(cfg.output)).expanduser(),
        lambda: checkpoint_loader(cfg),
        int(cfg.batch_size),
        cfg.nifti,
    )


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="predict")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
