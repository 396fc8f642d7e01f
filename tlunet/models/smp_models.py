"""segmentation-models-pytorch architectures."""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
from torch import nn

from tlunet.models.registry import register_model


@register_model("unet")
def smp_unet(
    encoder_name: str,
    encoder_weights: str | bool | None,
    in_channels: int = 3,
    classes: int = 1,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_attention_type: str | None = None,
) -> nn.Module:
    """smp's U-Net: bilinear-upsampling decoder with skip concatenation and 3x3 conv blocks."""
    return smp.Unet(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        encoder_depth=encoder_depth,
        in_channels=in_channels,
        classes=classes,
        decoder_channels=list(decoder_channels),
        decoder_attention_type=decoder_attention_type,
    )
