"""Encoder names and weights: smp/timm's own download mechanism, or a local file.

``weights="imagenet"`` (or another tag smp knows for the encoder) downloads through smp/timm
into the Hugging Face cache (``$HF_HOME``, default ``~/.cache/huggingface``); with the files
already cached this works offline (set ``HF_HUB_OFFLINE=1`` to skip the network). A local
weights file (``.safetensors``, ``.pt``/``.pth``/``.ckpt`` state dict) is loaded safely
(``weights_only=True``) into the encoder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from tlunet.errors import ConfigError, suggest
from tlunet.utils import load_tensors_safely


@functools.cache
def smp_encoder_names() -> tuple[str, ...]:
    return tuple(smp.encoders.get_encoder_names())


def check_encoder_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is an smp encoder or ``tu-<timm model>``."""
    if name in smp_encoder_names():
        return
    if name.startswith("tu-"):
        timm_name = name[3:].split(".")[0]
        if timm.is_model(timm_name):
            return
        raise ConfigError(
            f"Unknown timm encoder '{name}': timm has no model '{timm_name}'."
            f"{suggest(timm_name, timm.list_models())} List them with "
            "python -c \"import timm; print(timm.list_models('*resnet*'))\"."
        )
    raise ConfigError(
        f"Unknown encoder '{name}' (encoder.name).{suggest(name, smp_encoder_names())} "
        f"smp encoders: {', '.join(smp_encoder_names())}; any timm model as 'tu-<timm name>'."
    )


def smp_weights_argument(name: str, weights: str | None) -> str | bool | None:
    """Translate ``encoder.weights`` into what smp expects for ``name``."""
    if weights is None:
        return None
    if name.startswith("tu-"):
        # timm picks the pretrained tag from the model name ("tu-resnet18.a1_in1k").
        return True
    tags = smp.encoders.encoders[name]["pretrained_settings"]
    if weights not in tags:
        raise ConfigError(
            f"encoder.weights='{weights}' is not available for encoder '{name}'; choose one of "
            f"{sorted(tags)} or null (train from scratch)."
        )
    return weights


def offline_weights_message(name: str, weights: str, exc: BaseException) -> str:
    return (
        f"Could not load the '{weights}' weights of encoder '{name}': {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
        "The weights come from the Hugging Face hub and are not in the local cache "
        "(is this machine offline?). Either:\n"
        f"  1. pre-populate the cache on a machine with internet: python -m tlunet.models.download "
        f"{name}\n"
        "     then copy its Hugging Face cache (~/.cache/huggingface, or $HF_HOME) here, and set "
        "HF_HUB_OFFLINE=1;\n"
        "  2. pass a local weights file: encoder.weights_path=/path/to/encoder.safetensors;\n"
        "  3. or train from scratch: encoder.weights=null."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"encoder.weights_path '{path}' does not exist or is not a file.")
    # Expected: a .safetensors file or a PyTorch state dict of tensors (no pickled objects).
    state = load_tensors_safely(path, "weights file ")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"Weights file '{path}' does not hold a state dict of tensors.")
    return state


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``encoder`` (:func:`load_encoder_state`)."""
    path = Path(path).expanduser()
    load_encoder_state(encoder, _read_state_dict(path), f"Weights file '{path}'")


def load_encoder_state(encoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``encoder``; ``origin`` names it in errors.

    Accepted key layouts: the encoder's own keys; a whole smp model (``encoder.`` prefix);
    a tlunet checkpoint (``net.encoder.`` prefix); a plain timm model for ``tu-`` encoders
    (keys without the ``model.`` prefix). Keys the encoder lacks (a classifier head) are
    ignored; every encoder parameter must be present with the right shape.
    """
    own = encoder.state_dict()
    candidates = [state]
    for prefix in ("net.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            candidates.append(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
    candidates.append({f"model.{k}": v for k, v in state.items()})
    best = max(candidates, key=lambda c: len(own.keys() & c.keys()))
    missing = sorted(own.keys() - best.keys())
    if missing:
        raise ConfigError(
            f"{origin} does not match the encoder: {len(missing)} of {len(own)} "
            f"encoder tensors are missing (first: {missing[:3]})."
        )
    for k, v in own.items():
        if best[k].shape != v.shape:
            raise ConfigError(
                f"{origin} does not match the encoder: '{k}' has shape "
                f"{tuple(best[k].shape)} in the file but {tuple(v.shape)} in the model."
            )
    encoder.load_state_dict({k: best[k] for k in own}, strict=True)
