"""Between the slices' native resolution and the network's, in numpy and OpenCV (no PyTorch).

:func:`network_input` is the eval transform (:func:`tlunet.data.transforms.build_transform`:
albumentations' ``Resize`` then ``Normalize``) value for value; :func:`resize_probs` is the one
resize back to native resolution: :func:`tlunet.scoring.to_native` (every score, the masks
``tlunet.predict`` writes) and ``tlunet.predict_onnx`` both call it, so the two predict commands
threshold identical probabilities the same way whenever their networks agree. Both directions
use OpenCV's ``INTER_LINEAR`` (bilinear, half-pixel centres, as ``F.interpolate(...,
mode="bilinear", align_corners=False)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def network_input(
    image: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """(H, W, 3) uint8 slice -> (3, S, S) float32 network input, S = ``image_size``.

    Bilinear resize (``cv2.INTER_LINEAR``, skipped at size S, as albumentations' ``Resize``),
    then ``(pixel - 255 mean) / (255 std)`` per channel (``mean``/``std`` on the [0, 1] scale),
    computed in float32 through a per-channel lookup table exactly as albumentations'
    ``Normalize`` does for uint8 images, so the result equals ``build_transform``'s bit for bit.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    size = int(image_size)
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    mean_255 = np.asarray(mean, dtype=np.float32) * np.float32(255.0)
    inverse_std = np.reciprocal(np.asarray(std, dtype=np.float32) * np.float32(255.0))
    levels = np.arange(256, dtype=np.float32)
    tables = (levels[None, :] - mean_255[:, None]) * inverse_std[:, None]  # (3, 256) float32
    return np.stack([tables[c][image[..., c]] for c in range(3)])


def resize_probs(probs: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Probabilities (N, h, w) resized to (N, H, W) = ``size``, float32.

    Bilinear with half-pixel centres (``cv2.INTER_LINEAR``), each slice on its own (the result
    does not depend on the batch); a float32 copy when the sizes already agree.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (N, h, w), got {probs.shape}")
    height, width = (int(s) for s in size)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape[1:] == (height, width):
        return probs.copy()
    out = np.empty((len(probs), height, width), np.float32)
    for i, prob in enumerate(probs):
        out[i] = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def native_masks(probs: np.ndarray, size: Sequence[int], threshold: float) -> np.ndarray:
    """:func:`resize_probs` then ``>= threshold`` (a probability equal to the threshold is
    tumour): (N, H, W) bool."""
    return resize_probs(probs, size) >= threshold


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities of logits, float32 (computed in float64, then rounded)."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax of logits along ``axis``, float32 (computed in float64, then rounded)."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
