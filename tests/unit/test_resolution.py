"""tlunet.resolution: the numpy network input equals the checkpoint's transform bit for bit, and
the one resize back to native size is bilinear with half-pixel centres, shared with scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tlunet.data.transforms import build_transform
from tlunet.resolution import network_input, resize_probs, sigmoid, softmax
from tlunet.scoring import to_native


@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (80, 96), (40, 52), (256, 256)])
@pytest.mark.parametrize(
    "mean, std",
    [
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ((0.091, 0.083, 0.087), (0.137, 0.129, 0.134)),
    ],
)
def test_network_input_equals_the_transform(shape: tuple[int, int], mean, std) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = build_transform(64, mean, std)(image=image, mask=image[..., 0])["image"].numpy()
    got = network_input(image, 64, mean, std)
    assert got.dtype == np.float32 and got.shape == (3, 64, 64)
    assert np.array_equal(got, expected)  # bit for bit, not just close


def test_network_input_refuses_other_images() -> None:
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        network_input(np.zeros((8, 8), np.uint8), 8, (0, 0, 0), (1, 1, 1))


def test_resize_probs_is_bilinear_with_half_pixel_centres() -> None:
    probs = np.random.default_rng(0).random((4, 16, 20), dtype=np.float32)
    same = resize_probs(probs, (16, 20))
    assert np.array_equal(same, probs) and same is not probs
    for size in [(32, 40), (48, 33), (8, 10)]:
        got = resize_probs(probs, size)
        expected = F.interpolate(
            torch.from_numpy(probs)[:, None], size=size, mode="bilinear", align_corners=False
        )[:, 0].numpy()
        assert got.shape == (4, *size) and got.dtype == np.float32
        assert np.abs(got - expected).max() < 1e-5
        for i in range(4):  # each slice alone: the batch changes nothing
            assert np.array_equal(resize_probs(probs[i : i + 1], size), got[i : i + 1])
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        resize_probs(probs[0], (8, 8))


def test_scoring_resizes_through_the_same_function() -> None:
    """tlunet.scoring.to_native (every score, tlunet.predict's masks) is resize_probs: the
    masks of tlunet.predict_onnx come out of the very same arithmetic."""
    probs = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    native = to_native(probs, (128, 96))
    assert native.dtype == torch.float32 and native.device == probs.device
    assert np.array_equal(native[:, 0].numpy(), resize_probs(probs[:, 0].numpy(), (128, 96)))


def test_sigmoid_and_softmax_match_torch() -> None:
    logits = np.linspace(-30, 30, 601, dtype=np.float32).reshape(-1, 1)
    assert np.abs(sigmoid(logits) - torch.sigmoid(torch.from_numpy(logits)).numpy()).max() < 1e-7
    assert sigmoid(np.array([-1000.0, 1000.0], np.float32)).tolist() == [0.0, 1.0]
    pairs = np.random.default_rng(2).normal(0, 5, (50, 2)).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(pairs), dim=1).numpy()
    assert np.abs(softmax(pairs) - expected).max() < 1e-7
