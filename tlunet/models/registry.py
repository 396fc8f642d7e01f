"""Registry of segmentation architectures (``model.net.arch``).

An architecture is a function ``(encoder_name, encoder_weights, in_channels, classes, **kw)
-> nn.Module`` returning raw logits (N, classes, H, W) for input (N, in_channels, H, W).
Register your own without editing tlunet::

    from tlunet.models import register_model

    @register_model("my_unet")
    def my_unet(encoder_name, encoder_weights, in_channels, classes, **kw): ...
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tlunet.errors import ConfigError, suggest

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


def register_model(
    name: str, pretrained_encoder: bool = True
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding an architecture builder under ``name``.

    ``pretrained_encoder=False`` marks a network trained from scratch: its builder is called
    with ``in_channels``, ``classes`` and its own options only (no encoder name or weights).
    """

    def wrap(fn: ModelBuilder) -> ModelBuilder:
        if name in MODELS and MODELS[name] is not fn:
            raise ValueError(f"An architecture named '{name}' is already registered.")
        fn.pretrained_encoder = pretrained_encoder  # type: ignore[attr-defined]
        MODELS[name] = fn
        return fn

    return wrap


def get_model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``, or a :class:`ConfigError` listing valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown architecture '{name}'.{suggest(name, MODELS)} "
            f"Registered: {', '.join(sorted(MODELS))}."
        ) from None
