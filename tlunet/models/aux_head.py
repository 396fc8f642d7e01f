"""The paper's image-level head: tumour present / absent from the deepest encoder features."""

from __future__ import annotations

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
