"""A checkpoint's trained network, run without the training module or Lightning.

The network is built from the checkpoint's stored ``module.net`` node (checked against the
allow-list when :func:`tlunet.checkpoint.load_checkpoint` loaded it) and given the
checkpoint's ``net.*`` weights, the names the training module holds them under; it runs with
the module's memory format and compilation (:func:`tlunet.models.runtime.prepare_network`)
and in the precision its run computed in, so its probabilities equal the module's
``predict_probs`` bit for bit (``tests/unit/test_inference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from tlunet.checkpoint import upgrade_config
from tlunet.errors import ConfigError
from tlunet.models.aux_head import upgrade_state_dict
from tlunet.models.runtime import (
    ForwardPrecision,
    network_input,
    prepare_network,
    probabilities,
)

#: The attribute the training module holds its network in: its weights are ``net.*``.
NET_PREFIX = "net."


@dataclass
class TrainedNetwork:
    """A checkpoint's network in eval mode, with what running it needs: the threshold its run
    uses, whether it has the aux head, whether its inputs go channels-last, and the precision
    it runs in (fp32 until :meth:`to` says otherwise)."""

    net: nn.Module
    threshold: float
    has_aux: bool
    channels_last: bool
    precision: ForwardPrecision = field(default_factory=lambda: ForwardPrecision("32-true"))

    def to(self, device: torch.device, precision: ForwardPrecision) -> TrainedNetwork:
        """Moved to ``device`` and converted for ``precision``, in place; returns itself."""
        self.net = precision.convert_module(self.net.to(device))
        self.precision = precision
        return self

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`tlunet.models.runtime.probabilities` of normalised images (N, 3, S, S), run as
        the training module's ``predict_probs`` runs under Lightning's precision plugin."""
        images = network_input(self.precision.convert_input(images), self.channels_last)
        with self.precision.forward_context():
            return probabilities(self.net(images))


def network_from_checkpoint(checkpoint: dict[str, Any]) -> TrainedNetwork:
    """The trained network of ``checkpoint`` (as :func:`tlunet.checkpoint.load_checkpoint`
    returns it), in eval mode, on the CPU, in fp32. Weights that do not fit the stored
    network: :class:`~tlunet.errors.ConfigError`."""
    node = upgrade_config(OmegaConf.create(checkpoint["hyper_parameters"]["config"])).module
    # The weights come from the checkpoint: never download encoder weights here.
    for key in ("encoder_weights", "encoder_weights_path"):
        if key in node.net:
            node.net[key] = None
    net = instantiate(node.net)
    has_aux = getattr(net, "aux_head", None) is not None
    state = upgrade_state_dict(checkpoint["state_dict"], has_aux)
    weights = {k[len(NET_PREFIX) :]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise ConfigError(f"The checkpoint's weights do not match its own config: {exc}") from exc
    channels_last = bool(node.get("channels_last", False))
    net = prepare_network(net, channels_last, node.get("compile", False))
    return TrainedNetwork(net.eval(), float(node.get("threshold", 0.5)), has_aux, channels_last)
