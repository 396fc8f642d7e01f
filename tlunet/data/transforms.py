"""albumentations pipelines: resize, augment (training only), normalise, to tensor.

Images enter as (H, W, 3) uint8 and leave as (3, S, S) float32 normalised per channel;
masks enter as (H, W) uint8 in {0, 1} and leave as (1, S, S) float32 in {0, 1}. Masks are
resized with nearest-neighbour interpolation, so they stay binary after every transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Sequence[A.BasicTransform] = (),
) -> A.Compose:
    """Resize to ``image_size`` square, apply ``augment`` in order, normalise, convert to tensors.

    ``mean``/``std`` are per-channel, on the [0, 1] scale (pixel / 255).
    """
    return A.Compose(
        [
            A.Resize(
                image_size,
                image_size,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            ),
            *augment,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def channel_stats(
    images: np.ndarray, rows: Sequence[int] | None = None, chunk: int = 256
) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of (N, H, W, 3) uint8 images (only ``rows`` when
    given, read ``chunk`` at a time so a memory-mapped array is never copied whole), [0, 1] scale."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    total = np.zeros(3, np.float64)
    total_sq = np.zeros(3, np.float64)
    count = 0
    for start in range(0, len(rows), chunk):
        block = np.asarray(images[rows[start : start + chunk]], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block**2).sum(axis=(0, 1, 2))
        count += block.shape[0] * block.shape[1] * block.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.tolist(), std.tolist()
