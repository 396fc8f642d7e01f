"""Build a segmentation network from ``model`` and ``encoder`` config values."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from tlunet.errors import ConfigError
from tlunet.models.registry import get_model_builder
from tlunet.models.weights import (
    check_encoder_name,
    load_encoder_weights,
    offline_weights_message,
    smp_weights_argument,
)

log = logging.getLogger(__name__)


def build_model(
    arch: str,
    encoder_name: str,
    encoder_weights: str | None = "imagenet",
    encoder_weights_path: str | None = None,
    in_channels: int = 3,
    classes: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Return the network ``arch`` with encoder ``encoder_name``; outputs logits (N, classes, H, W).

    ``encoder_weights``: ``"imagenet"`` (smp/timm download, Hugging Face cache) or ``None``
    (random initialisation). ``encoder_weights_path``: a local file loaded into the encoder
    instead of any download. Extra ``kwargs`` go to the architecture builder.
    """
    builder = get_model_builder(arch)
    if not getattr(builder, "pretrained_encoder", True):
        if encoder_weights_path:
            raise ConfigError(
                f"Architecture '{arch}' is trained from scratch: it takes no encoder weights "
                f"(encoder.weights_path={encoder_weights_path})."
            )
        try:
            return builder(in_channels=in_channels, classes=classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"Bad option for architecture '{arch}': {exc}") from exc
    check_encoder_name(encoder_name)
    if encoder_weights_path:
        weights_arg = None
    else:
        weights_arg = smp_weights_argument(encoder_name, encoder_weights)
    try:
        net = builder(
            encoder_name=encoder_name,
            encoder_weights=weights_arg,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    except ConfigError:
        raise
    except (OSError, ConnectionError, RuntimeError) as exc:
        if weights_arg is None:
            raise
        raise ConfigError(offline_weights_message(encoder_name, str(encoder_weights), exc)) from exc
    except TypeError as exc:
        raise ConfigError(f"Bad option for architecture '{arch}': {exc}") from exc
    if encoder_weights_path:
        encoder = getattr(net, "encoder", None)
        if encoder is None:
            raise ConfigError(
                f"Architecture '{arch}' has no pretrained encoder to load weights into."
            )
        load_encoder_weights(encoder, encoder_weights_path)
        log.info("Loaded encoder weights from %s", encoder_weights_path)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
