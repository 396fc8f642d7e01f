"""From the network's probabilities to masks at the native resolution of the data.

Every score tlunet reports (validation, test, ``tlunet.evaluate``) and every mask
``tlunet.predict`` writes goes through :func:`to_native` then :func:`threshold_masks`: the
network runs at ``data.image_size``, its probabilities are resized bilinearly to the size of
the masks on disk, and only then thresholded. So a Dice, a tumour-pixel count or an HD95 means
the same thing whatever size the network ran at, and ``evaluate`` scores exactly the masks
``predict`` writes. The resize itself is :func:`tlunet.resolution.resize_probs` (OpenCV, no
PyTorch), the one ``tlunet.predict_onnx`` calls too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tlunet.resolution import resize_probs


def to_native(probs: Tensor, size: Sequence[int]) -> Tensor:
    """Probabilities (N, 1, h, w) resized to (N, 1, H, W) = ``size``, float32, on ``probs``'
    device.

    Bilinear interpolation with half-pixel centres (OpenCV's ``INTER_LINEAR``, as
    albumentations' resize and ``F.interpolate(..., align_corners=False)``), through
    :func:`tlunet.resolution.resize_probs` on the CPU: the same arithmetic as
    ``tlunet.predict_onnx``, so both predict commands and every score agree pixel for pixel.
    Unchanged when the sizes already agree. Each slice is resized on its own, so the result
    does not depend on the batch it came in.
    """
    if probs.ndim != 4 or probs.shape[1] != 1:
        raise ValueError(f"probs must have shape (N, 1, h, w), got {tuple(probs.shape)}")
    height, width = (int(s) for s in size)
    probs = probs.float()
    if tuple(probs.shape[-2:]) == (height, width):
        return probs
    resized = resize_probs(probs[:, 0].detach().cpu().numpy(), (height, width))
    return torch.from_numpy(resized)[:, None].to(probs.device)


def threshold_masks(probs: Tensor, threshold: float) -> Tensor:
    """Binary masks: ``probs >= threshold`` (a probability equal to the threshold is tumour)."""
    return probs >= threshold


@torch.no_grad()
def native_mask_tensor(probs: Tensor, size: Sequence[int], threshold: float) -> Tensor:
    """:func:`to_native` then :func:`threshold_masks`: (N, 1, H, W) bool; the tensor twin of
    :func:`tlunet.resolution.native_masks` (numpy, (N, h, w))."""
    return threshold_masks(to_native(probs, size), threshold)


#: The name of :func:`native_mask_tensor` until tlunet 0.3 (CHANGELOG.md); removed in 0.5.
native_masks = native_mask_tensor


def scoring_info(datamodule: Any, module: Any, threshold: float | None = None) -> dict[str, Any]:
    """How a run's (or an evaluation's) numbers were computed, for run.json/evaluation.json;
    ``threshold``: the one used, when not the module's."""
    size = getattr(datamodule, "native_size", None)
    threshold = module.threshold if threshold is None else threshold
    return {
        "resolution": list(size) if size else None,
        "network_input": [datamodule.image_size, datamodule.image_size],
        "how": "probabilities resized bilinearly to the masks' native resolution, then "
        f"thresholded at {threshold} (val, test, evaluate; the masks predict writes)",
        "train_metrics": "network resolution, augmented slices",
        "per_patient_metrics": bool(getattr(module, "per_patient", True)),
        "detect_source": getattr(module, "detect_source", "mask"),
    }
