"""Model factory: every encoder file builds; weights through smp's mechanism or a local file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import CONF_DIR
from tlunet.errors import ConfigError
from tlunet.models import MODELS, build_model, register_model

ENCODER_FILES = sorted((CONF_DIR / "encoder").glob("*.yaml"))
PAPER_ENCODERS = {
    "vgg16",
    "vgg19",
    "mobilenet_v2",
    "inception_v4",
    "efficientnet_b7",
    "inception_resnet_v2",
    "densenet201",
    "densenet121",
    "resnet34",
}


def test_every_paper_encoder_has_a_file() -> None:
    assert PAPER_ENCODERS <= {f.stem for f in ENCODER_FILES}


@pytest.mark.parametrize("path", ENCODER_FILES, ids=lambda p: p.stem)
def test_encoder_file_builds_and_runs(path: Path) -> None:
    name = yaml.safe_load(path.read_text())["name"]
    net = build_model("unet", name, encoder_weights=None)
    x = torch.randn(1, 3, 256, 256)  # the data's native size
    y = net(x)
    assert y.shape == (1, 1, 256, 256)
    y.mean().backward()
    grads = [p.grad for p in net.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_encoder_lists_close_names() -> None:
    with pytest.raises(
        ConfigError, match=r"Unknown encoder 'densnet121'.*Did you mean: densenet121"
    ):
        build_model("unet", "densnet121", None)


def test_unknown_timm_encoder() -> None:
    with pytest.raises(ConfigError, match=r"timm has no model 'resnt18'"):
        build_model("unet", "tu-resnt18", None)


def test_unknown_architecture() -> None:
    with pytest.raises(ConfigError, match=r"Unknown architecture 'unte'.*Did you mean: unet"):
        build_model("unte", "resnet18", None)


def test_unknown_weights_tag() -> None:
    with pytest.raises(ConfigError, match=r"encoder.weights='instagram'.*resnet18"):
        build_model("unet", "resnet18", "instagram")


def test_register_model_extends_without_editing() -> None:
    @register_model("tiny_test_net")
    def tiny(encoder_name, encoder_weights, in_channels, classes, **kw):
        return torch.nn.Conv2d(in_channels, classes, 1)

    try:
        net = build_model("tiny_test_net", "resnet18", None)
        assert net(torch.zeros(1, 3, 8, 8)).shape == (1, 1, 8, 8)
    finally:
        MODELS.pop("tiny_test_net")


def test_local_weights_file_is_loaded(tmp_path: Path) -> None:
    source = build_model("unet", "resnet18", None)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, str(path))
    net = build_model("unet", "resnet18", "imagenet", encoder_weights_path=str(path))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k


def test_local_weights_from_whole_model_state_dict(tmp_path: Path) -> None:
    source = build_model("unet", "mobilenet_v2", None)
    path = tmp_path / "model.pth"
    torch.save(source.state_dict(), path)  # keys carry the "encoder." prefix
    net = build_model("unet", "mobilenet_v2", None, encoder_weights_path=str(path))
    key = next(iter(source.encoder.state_dict()))
    assert torch.equal(net.encoder.state_dict()[key], source.encoder.state_dict()[key])


def test_mismatched_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    encoder = build_model("unet", "resnet18", None).encoder
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match=rf"Weights file '{path}' does not match the encoder"):
        build_model("unet", "resnet34", None, encoder_weights_path=str(path))


def test_missing_and_corrupt_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("unet", "resnet18", None, encoder_weights_path=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"Cannot load weights file '{bad}'"):
        build_model("unet", "resnet18", None, encoder_weights_path=str(bad))


def _fake_hub_cache(hf_home: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Lay out smp's resnet18 ImageNet weights as huggingface_hub caches a download."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders["resnet18"]["pretrained_settings"]["imagenet"]
    repo = hf_home / "hub" / ("models--" + settings["repo_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    save_file(tensors, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(settings["revision"])


_LOAD_IMAGENET = """
import torch, sys
from tlunet.models import build_model
from tlunet.errors import ConfigError
try:
    net = build_model("unet", "resnet18", "imagenet")
except ConfigError as exc:
    print(exc); sys.exit(3)
print("conv1_sum", float(net.encoder.conv1.weight.sum()))
"""


@pytest.mark.slow
def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path) -> None:
    """smp's own download mechanism, served from a pre-populated cache, offline."""
    encoder = build_model("unet", "resnet18", None).encoder
    tensors = {k: torch.full_like(v, 0.5) for k, v in encoder.state_dict().items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    _fake_hub_cache(tmp_path / "hf", tensors)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_IMAGENET], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    expected = 0.5 * encoder.conv1.weight.numel()
    assert f"conv1_sum {expected}" in out.stdout


def test_offline_without_cache_gives_instructions(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_IMAGENET], env=env, capture_output=True, text=True
    )
    assert out.returncode == 3, out.stdout + out.stderr
    assert "Could not load the 'imagenet' weights of encoder 'resnet18'" in out.stdout
    assert "python -m tlunet.models.download resnet18" in out.stdout
    assert "encoder.weights_path=" in out.stdout
    assert "encoder.weights=null" in out.stdout


@pytest.mark.parametrize("path", ENCODER_FILES, ids=lambda p: p.stem)
def test_encoder_file_weights_tag_is_known_to_smp(path: Path) -> None:
    """encoder.weights=imagenet resolves to a download smp/timm knows for every encoder file."""
    from tlunet.models.weights import smp_weights_argument

    spec = yaml.safe_load(path.read_text())
    assert spec["weights"] == "imagenet"
    assert smp_weights_argument(spec["name"], spec["weights"]) in ("imagenet", True)
