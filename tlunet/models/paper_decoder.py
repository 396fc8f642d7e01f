"""The TL-U-Net paper's decoder on any smp/timm encoder (``model=unet_transposed``).

Per stage: a 2x2 transposed convolution (stride 2) halving the channels, concatenation with the
encoder feature map of the same scale, two 3x3 convolutions each followed by ReLU. Optionally a
bottleneck of three 3x3 convolutions with 512 channels between encoder and decoder (the paper's
choice for VGG16, whose fully connected layers it drops). Output: a 1x1 convolution (logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn

from tlunet.models.registry import register_model
from tlunet.models.scratch import DoubleConv, conv3x3


class TransposedUNetDecoder(nn.Module):
    """Decoder over encoder features ``[f0 (full res), f1 (1/2), ..., fD (1/2**D)]``."""

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_channels: Sequence[int],
        bottleneck_channels: int | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        depth = len(encoder_channels) - 1
        if len(decoder_channels) != depth:
            raise ValueError(
                f"decoder_channels needs {depth} entries (one per encoder stage), "
                f"got {list(decoder_channels)}"
            )
        deepest = encoder_channels[-1]
        if bottleneck_channels:
            self.bottleneck = nn.Sequential(
                *conv3x3(deepest, bottleneck_channels, batch_norm),
                *conv3x3(bottleneck_channels, bottleneck_channels, batch_norm),
                *conv3x3(bottleneck_channels, bottleneck_channels, batch_norm),
            )
            deepest = bottleneck_channels
        else:
            self.bottleneck = nn.Identity()
        skips = list(encoder_channels[:-1])[::-1]
        cins = [deepest, *decoder_channels[:-1]]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in cins)
        self.blocks = nn.ModuleList(
            DoubleConv(c // 2 + s, out, batch_norm)
            for c, s, out in zip(cins, skips, decoder_channels, strict=True)
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        y = self.bottleneck(features[-1])
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1], strict=True):
            y = block(torch.cat([up(y), skip], dim=1))
        return y


@register_model("unet_transposed")
class TransposedUNet(nn.Module):
    """The paper's decoder (transposed convolutions) on an smp/timm encoder:
    smp/timm encoder + :class:`TransposedUNetDecoder` + 1x1 convolution."""

    def __init__(
        self,
        encoder_name: str,
        encoder_weights: str | bool | None,
        in_channels: int = 3,
        classes: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        bottleneck_channels: int | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = smp.encoders.get_encoder(
            encoder_name,
            in_channels=in_channels,
            depth=len(decoder_channels),
            weights=encoder_weights,
        )
        self.decoder = TransposedUNetDecoder(
            self.encoder.out_channels, decoder_channels, bottleneck_channels, batch_norm
        )
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))
