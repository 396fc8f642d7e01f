"""Loss combinations (the terms themselves come from ``segmentation_models_pytorch.losses``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class WeightedSum(nn.Module):
    """``sum_k weights[k] * losses[k](logits, target)``.

    ``logits``: (N, 1, H, W) raw scores; ``target``: (N, 1, H, W) in {0, 1}. Both are cast to
    float32 first, so a Dice term cannot overflow under fp16 mixed precision.
    """

    def __init__(self, losses: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        self.losses = nn.ModuleDict(dict(losses))
        weights = dict(weights or {})
        unknown = set(weights) - set(self.losses)
        if unknown:
            raise ValueError(f"Weights given for unknown loss terms {sorted(unknown)}.")
        self.weights = {k: float(weights.get(k, 1.0)) for k in self.losses}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        return sum(self.weights[k] * fn(logits, target) for k, fn in self.losses.items())
