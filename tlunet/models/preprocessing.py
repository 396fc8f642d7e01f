"""The input normalisation an encoder's pretrained weights expect (``data.normalization=encoder``).

Pretrained weights were trained on images normalised in one way: most ImageNet ports subtract
the ImageNet mean and divide by its standard deviation, but the TensorFlow ports (Inception,
Inception-ResNet, Xception, the TF EfficientNet-Lite family) map pixels to [-1, 1]
(mean = std = 0.5). Feeding them the other normalisation wastes what they learnt.

``tu-<timm name>`` encoders take timm's ``pretrained_cfg`` (offline: it ships with timm). smp's
own encoders keep their statistics on the Hugging Face hub (``config.json`` beside the weights),
which an offline machine cannot read; their values are listed here, from those files.
Values are per channel on the [0, 1] scale (pixel / 255).
"""

from __future__ import annotations

from typing import Any

import timm

from tlunet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

HALF = (0.5, 0.5, 0.5)

#: smp encoder names (prefix match) whose ImageNet weights expect other statistics than ImageNet's.
_SMP_EXCEPTIONS: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...] = (
    ("inceptionv4", HALF, HALF),
    ("inceptionresnetv2", HALF, HALF),
    ("xception", HALF, HALF),
    ("timm-efficientnet-lite", HALF, HALF),
    ("dpn", (124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3),
)


def encoder_preprocessing(
    encoder_name: str | None, encoder_weights: str | None = None
) -> dict[str, Any]:
    """``{"mean", "std", "source"}`` the pretrained weights of ``encoder_name`` expect.

    ``encoder_weights`` is the weights tag (``imagenet``, ``advprop``...); ``None`` (training
    from scratch) takes the statistics of the encoder's ImageNet weights, so a pretrained and a
    from-scratch run of one network see the same input. smp's ``advprop`` EfficientNet weights
    expect mean = std = 0.5. Encoders without pretrained weights (``none``, the from-scratch
    architectures) get the ImageNet statistics, which keep inputs in a well-scaled range.
    """
    name = (encoder_name or "none").strip()
    if name in ("none", ""):
        return {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "source": "ImageNet statistics (no pretrained encoder)",
        }
    if name.startswith("tu-"):
        timm_name = name[3:]
        cfg = None
        try:
            cfg = timm.models.get_pretrained_cfg(timm_name)
        except Exception:  # an unknown tag: the name check reports it when the model is built
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return {
                "mean": [float(v) for v in cfg.mean],
                "std": [float(v) for v in cfg.std],
                "source": f"timm pretrained_cfg of '{timm_name}'",
            }
        return {
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "source": f"ImageNet statistics (timm has no pretrained_cfg for '{timm_name}')",
        }
    if encoder_weights == "advprop":
        return {"mean": list(HALF), "std": list(HALF), "source": f"smp '{name}' advprop weights"}
    for prefix, mean, std in _SMP_EXCEPTIONS:
        if name.startswith(prefix):
            return {"mean": list(mean), "std": list(std), "source": f"smp '{name}' weights"}
    return {
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "source": f"smp '{name}' weights (ImageNet statistics)",
    }
