"""The paper's image-level head (tumour present / absent from the deepest encoder features),
and the network that carries it: :class:`SegmentationWithAux` returns mask logits and label
logits from one ``forward``, the way segmentation_models_pytorch's ``aux_params`` models do,
so training, ``tlunet.predict`` and ``tlunet.export`` all see both outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tlunet.errors import ConfigError


class AuxHead(nn.Module):
    """GlobalAveragePooling -> Dense(hidden) + ReLU -> Dropout -> Dense(classes).

    Input: features (N, C, h, w); output: logits (N, classes). Softmax and cross-entropy are
    applied by the loss (``torch.nn.functional.cross_entropy`` on the logits).
    """

    def __init__(
        self, in_channels: int, hidden: int = 256, dropout: float = 0.2, classes: int = 2
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(features).flatten(1)
        return self.fc2(self.dropout(self.relu(self.fc1(x))))


def deepest_channels(net: nn.Module) -> int:
    """Channels of the deepest feature map of ``net.encoder`` (smp, timm and tlunet encoders)."""
    encoder = getattr(net, "encoder", None)
    channels = getattr(encoder, "out_channels", None)
    if not channels:
        raise ConfigError(
            f"model.aux_head=true needs a network with an .encoder exposing out_channels; "
            f"{type(net).__name__} has none."
        )
    return int(channels[-1])


class SegmentationWithAux(nn.Module):
    """A segmentation network plus :class:`AuxHead` on its encoder's deepest features.

    ``forward(images)`` returns ``(mask_logits (N, classes, H, W), label_logits (N, 2))``;
    ``softmax(label_logits)[:, 1]`` is the slice's tumour probability. ``encoder`` is the
    wrapped network's (freezing and channels-last act on it). Parameters are named
    ``segmenter.*`` and ``aux_head.*``.
    """

    def __init__(self, segmenter: nn.Module, hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.aux_head = AuxHead(deepest_channels(segmenter), hidden=hidden, dropout=dropout)

    @property
    def encoder(self) -> nn.Module:
        return self.segmenter.encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deepest: list[torch.Tensor] = []
        # The encoder's output as the wrapped network computes it: no copy of its forward
        # (smp's decoder signatures differ between versions), nothing kept between calls.
        handle = self.segmenter.encoder.register_forward_hook(
            lambda module, inputs, output: deepest.append(output[-1])
        )
        try:
            masks = self.segmenter(images)
        finally:
            handle.remove()
        return masks, self.aux_head(deepest[-1])


def split_outputs(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask logits, label logits or ``None``) of a network's ``forward`` output."""
    if isinstance(output, tuple | list):
        return output[0], output[1]
    return output, None


def upgrade_state_dict(state_dict: Mapping[str, Any], with_aux: bool) -> dict[str, Any]:
    """A module state dict of tlunet < 0.3 (the aux head beside the network: ``net.*`` and
    ``aux_head.*``) in today's names (``net.segmenter.*``, ``net.aux_head.*``); unchanged
    without an aux head or when already current."""
    state = dict(state_dict)
    if not with_aux or any(k.startswith("net.segmenter.") for k in state):
        return state
    upgraded: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("aux_head."):
            key = "net." + key
        elif key.startswith("net."):
            key = "net.segmenter." + key[len("net.") :]
        upgraded[key] = value
    return upgraded
