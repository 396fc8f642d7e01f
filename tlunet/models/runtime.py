"""Running a segmentation network: its memory format and compilation, its outputs as
probabilities, and the numeric precision of a forward pass: one definition shared by the
training module (:class:`tlunet.module.SegmentationModule`) and the inference layer
(:mod:`tlunet.inference`), which must give the same probabilities bit for bit. Torch only: no
Lightning."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tlunet.models.aux_head import split_outputs


def prepare_network(net: nn.Module, channels_last: bool, compile: Any) -> nn.Module:
    """``net`` as tlunet runs it, in place: channels-last weights when asked, and
    ``torch.compile``d (parameter names unchanged) when ``compile`` is true or a dict of its
    options."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        if isinstance(compile, DictConfig):
            compile = OmegaConf.to_container(compile, resolve=True)
        options = dict(compile) if isinstance(compile, dict) else {}
        net.compile(**options)  # in place: parameter names unchanged
    return net


def network_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the memory format the network's weights are in."""
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def probabilities(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tumour probabilities (N, 1, S, S) and the aux head's slice probability (N,) (``None``
    without a head) from a network's outputs, in fp32."""
    logits, aux_logits = split_outputs(outputs)
    detect = None
    if aux_logits is not None:
        detect = torch.softmax(aux_logits.float(), dim=1)[:, 1]
    return torch.sigmoid(logits.float()), detect


@dataclass(frozen=True)
class ForwardPrecision:
    """What Lightning's precision plugin does to a module run outside a Trainer
    (:func:`tlunet.precision.precision_plugin`), for ``precision`` on ``device`` (``cpu``,
    ``cuda``), without Lightning: ``*-mixed`` runs the forward pass under ``torch.autocast``
    (bf16 or fp16, no cache); ``bf16-true``, ``16-true`` and ``64-true`` convert the module
    and the floating inputs and set the default dtype during the pass; ``32-true`` changes
    nothing. ``tests/unit/test_inference.py`` checks it against Lightning's plugins."""

    precision: str
    device: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        if self.precision.startswith("bf16"):
            return torch.bfloat16
        if self.precision.startswith("16"):
            return torch.float16
        return torch.float64 if self.precision.startswith("64") else torch.float32

    @property
    def converts(self) -> bool:
        """Whether the module and the inputs change dtype."""
        return self.precision in ("bf16-true", "16-true", "64-true")

    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self.dtype) if self.converts else module

    def convert_input(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.dtype) if self.converts and batch.is_floating_point() else batch

    @contextmanager
    def forward_context(self) -> Iterator[None]:
        if self.precision in ("bf16-mixed", "16-mixed"):
            device = "cpu" if self.device == "cpu" else "cuda"
            with torch.autocast(device, dtype=self.dtype, cache_enabled=False):
                yield
        elif self.converts:
            default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                yield
            finally:
                torch.set_default_dtype(default)
        else:
            yield
