"""The two baselines trained from scratch: the classic U-Net and a residual U-Net (ResU-Net).

Both take images (N, in_channels, H, W) with H, W multiples of ``2 ** (len(channels) - 1)``
and return logits (N, classes, H, W). ``.encoder`` returns the list of feature maps from full
resolution down to the deepest (the auxiliary head hooks its last element).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tlunet.models.registry import register_model


def conv3x3(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (BatchNorm and) ReLU."""

    def __init__(self, cin: int, cout: int, batch_norm: bool = True) -> None:
        super().__init__(*conv3x3(cin, cout, batch_norm), *conv3x3(cout, cout, batch_norm))


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1-projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, batch_norm: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else nn.Identity
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm),
            norm(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=not batch_norm),
            norm(cout),
        )
        self.shortcut = (
            nn.Identity()
            if cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=not batch_norm), norm(cout))
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ScratchEncoder(nn.Module):
    """``block`` at each scale, 2x2 max-pooling between scales."""

    def __init__(self, block: type[nn.Module], in_channels: int, channels: Sequence[int], bn: bool):
        super().__init__()
        cins = [in_channels, *channels[:-1]]
        self.blocks = nn.ModuleList(block(a, b, bn) for a, b in zip(cins, channels, strict=True))
        self.pool = nn.MaxPool2d(2)
        self.out_channels = list(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            features.append(x)
        return features


class ScratchUNet(nn.Module):
    """U-Net: encoder blocks, then per scale a 2x2 transposed convolution halving the channels,
    concatenation with the encoder features of that scale, and a block."""

    def __init__(
        self,
        block: type[nn.Module],
        in_channels: int = 3,
        classes: int = 1,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = ScratchEncoder(block, in_channels, channels, batch_norm)
        rev = list(channels)[::-1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in rev[:-1])
        self.decoder = nn.ModuleList(
            block(c // 2 + skip, skip, batch_norm)
            for c, skip in zip(rev[:-1], rev[1:], strict=True)
        )
        self.segmentation_head = nn.Conv2d(channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = features[-1]
        for up, block, skip in zip(self.ups, self.decoder, features[-2::-1], strict=True):
            y = block(torch.cat([up(y), skip], dim=1))
        return self.segmentation_head(y)


@register_model("unet_scratch", pretrained_encoder=False)
def unet_scratch(
    in_channels: int = 3,
    classes: int = 1,
    channels: Sequence[int] = (64, 128, 256, 512, 1024),
    batch_norm: bool = True,
) -> nn.Module:
    """The classic U-Net (Ronneberger et al. 2015), double 3x3 conv + ReLU blocks."""
    return ScratchUNet(DoubleConv, in_channels, classes, channels, batch_norm)


@register_model("resunet", pretrained_encoder=False)
def resunet(
    in_channels: int = 3,
    classes: int = 1,
    channels: Sequence[int] = (64, 128, 256, 512, 1024),
    batch_norm: bool = True,
) -> nn.Module:
    """ResU-Net: the U-Net with residual blocks in encoder and decoder."""
    return ScratchUNet(ResidualBlock, in_channels, classes, channels, batch_norm)
