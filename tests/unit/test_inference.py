"""The inference layer runs a checkpoint's network as the training module does, without
Lightning: same probabilities bit for bit, same precision handling, and a light import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tlunet.inference import ForwardPrecision, network_from_checkpoint
from tlunet.precision import PRECISIONS, precision_plugin

#: What a command that only runs a model must not load when it starts.
HEAVY = ("matplotlib", "pytorch_lightning", "torchmetrics", "tlunet.callbacks", "tlunet.module")


def _checkpoint(*overrides: str) -> tuple[dict, torch.nn.Module]:
    """A checkpoint as Lightning writes one (the module's state dict and the stored run
    config) of a freshly built module with randomised BatchNorm statistics."""
    cfg = compose_config(["encoder=resnet18", "encoder.weights=null", *overrides])
    cfg.paths.output_dir = "run"  # Hydra's run folder: no Hydra run here
    module = instantiate(cfg.module)
    module.set_run_config(OmegaConf.to_container(cfg, resolve=True))
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    state = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    return state, module.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.channels_last=false",),
        ("model.channels_last=true", "model.aux_head=true", "model.aux_hidden=16"),
    ],
)
def test_the_network_gives_the_modules_probabilities(overrides: tuple[str, ...]) -> None:
    checkpoint, module = _checkpoint(*overrides)
    network = network_from_checkpoint(checkpoint)
    assert network.has_aux == module.has_aux and network.threshold == module.threshold
    assert network.channels_last == module.channels_last
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected, expected_detect = module.predict_probs(images)
    got, detect = network.probabilities(images)
    assert torch.equal(got, expected)
    if module.has_aux:
        assert torch.equal(detect, expected_detect)
    else:
        assert detect is None and expected_detect is None


def test_weights_of_another_network_are_one_line() -> None:
    checkpoint, _ = _checkpoint()
    checkpoint["state_dict"] = {
        k: v for k, v in checkpoint["state_dict"].items() if "decoder" not in k
    }
    with pytest.raises(Exception, match="do not match its own config"):
        network_from_checkpoint(checkpoint)


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "16-mixed"])
def test_forward_precision_equals_lightnings_plugin(precision: str) -> None:
    """Module, inputs and forward pass converted as Lightning's plugin does (on the CPU)."""
    torch.manual_seed(0)
    mine = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1)
    )
    theirs.load_state_dict(mine.state_dict())
    images = torch.randn(2, 3, 12, 12)
    light, plugin = ForwardPrecision(precision, "cpu"), precision_plugin(precision, "cpu")
    mine, theirs = light.convert_module(mine), plugin.convert_module(theirs)
    with light.forward_context():
        a = mine(light.convert_input(images))
        default_a = torch.get_default_dtype()
    with plugin.forward_context():
        b = theirs(plugin.convert_input(images))
        default_b = torch.get_default_dtype()
    assert a.dtype == b.dtype and default_a == default_b and torch.equal(a, b)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("command", ["tlunet.predict", "tlunet.inference"])
def test_a_command_that_only_runs_a_model_imports_no_training_code(command: str) -> None:
    code = f"import sys, {command}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
