"""The paper's decoder, the from-scratch baselines, the auxiliary head and encoder freezing."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from tests.conftest import compose_config
from tlunet.losses import WeightedSum
from tlunet.models import build_model
from tlunet.models.aux_head import SegmentationWithAux
from tlunet.module import SegmentationModule

SMALL = [16, 32, 64, 128, 256]


@pytest.mark.parametrize("arch", ["unet_scratch", "resunet"])
def test_scratch_baselines_shape(arch: str) -> None:
    net = build_model(arch, "none", None, channels=SMALL)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    assert [f.shape[1] for f in net.encoder(torch.randn(1, 3, 32, 32))] == SMALL


def test_resunet_blocks_are_residual() -> None:
    net = build_model("resunet", "none", None, channels=SMALL)
    block = net.encoder.blocks[1]
    assert hasattr(block, "shortcut") and hasattr(block, "body")
    net.eval()
    x = torch.randn(1, 16, 8, 8)
    torch.nn.init.zeros_(block.body[-2].weight)  # kill the body: output = relu(shortcut(x))
    torch.nn.init.zeros_(block.body[-2].bias) if block.body[-2].bias is not None else None
    with torch.no_grad():
        expected = torch.relu(block.shortcut(x) + block.body(x))
        assert torch.allclose(block(x), expected)


@pytest.mark.parametrize("arch", ["unet_scratch", "resunet"])
def test_scratch_baseline_learns_a_trivial_mask(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(arch, "none", None, channels=[8, 16, 32])
    x = torch.zeros(4, 3, 32, 32)
    y = torch.zeros(4, 1, 32, 32)
    x[:, 1, 8:20, 10:24] = 1.0  # the mask is where the FLAIR channel is bright
    y[:, :, 8:20, 10:24] = 1.0
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(x) > 0
    dice = 2 * (pred & (y > 0)).sum() / (pred.sum() + (y > 0).sum())
    assert dice > 0.9


@pytest.mark.parametrize(
    ("encoder", "bottleneck"), [("vgg16", 512), ("densenet121", None), ("tu-resnet18", None)]
)
def test_paper_decoder(encoder: str, bottleneck: int | None) -> None:
    net = build_model("unet_transposed", encoder, None, bottleneck_channels=bottleneck)
    x = torch.randn(1, 3, 64, 64)
    y = net(x)
    assert y.shape == (1, 1, 64, 64)
    ups = net.decoder.ups
    assert all(isinstance(u, torch.nn.ConvTranspose2d) and u.kernel_size == (2, 2) for u in ups)
    assert all(u.out_channels == u.in_channels // 2 for u in ups)
    if bottleneck:
        convs = [m for m in net.decoder.bottleneck if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [512, 512, 512]
    y.mean().backward()


@pytest.mark.parametrize("model", ["unet", "unet_transposed", "unet_scratch", "resunet"])
def test_model_configs_build(model: str) -> None:
    from hydra.utils import instantiate

    overrides = [f"model={model}", "encoder=resnet18", "encoder.weights=null"]
    cfg = compose_config(overrides)
    if model in ("unet_scratch", "resunet"):
        assert cfg.encoder.name == "none" and cfg.encoder.weights is None
        cfg.model.net.channels = SMALL
    net = instantiate(cfg.model.net)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def _module(net: torch.nn.Module, **kw) -> SegmentationModule:
    loss = WeightedSum({"bce": torch.nn.BCEWithLogitsLoss()})
    return SegmentationModule(net, loss, partial(torch.optim.SGD, lr=0.1), **kw)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.zeros(4, 1, 64, 64)
    mask[:2, :, 20:30, 20:30] = 1  # two slices with tumour, two without
    return {"image": torch.randn(4, 3, 64, 64), "mask": mask, "patient": torch.tensor([0, 0, 1, 1])}


def test_aux_head_loss_reaches_the_total_loss() -> None:
    net = build_model("unet", "resnet18", None, aux_head=True)
    assert isinstance(net, SegmentationWithAux)
    head = net.aux_head
    module = _module(net, aux_loss_weight=0.5)
    module.eval()  # no dropout: the recomputation below is exact
    batch = _batch()
    total, logits, terms, detect = module.compute_loss(batch)
    assert torch.allclose(total, terms["loss_seg"] + 0.5 * terms["loss_aux"])
    with torch.no_grad():
        deepest = net.encoder(batch["image"])[-1]
        expected = torch.nn.functional.cross_entropy(head(deepest), torch.tensor([1, 1, 0, 0]))
    assert torch.allclose(terms["loss_aux"], expected)
    assert detect.shape == (4,) and ((detect >= 0) & (detect <= 1)).all()
    total.backward()
    assert head.fc1.weight.grad is not None and head.fc1.weight.grad.abs().sum() > 0


def test_aux_head_drives_detection_metrics() -> None:
    module = _module(build_model("unet", "resnet18", None, aux_head=True))
    module.eval()
    batch = _batch()
    with torch.no_grad():
        head_probs = module.compute_loss(batch)[3]
        module._step(batch, "val")  # val steps log nothing themselves: no Trainer needed
    metric = module.metrics["val_metrics"]
    detected = torch.cat(metric.detect) if isinstance(metric.detect, list) else metric.detect
    assert detected.tolist() == (head_probs >= 0.5).long().tolist()


def _encoder_state(module: SegmentationModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.net.encoder.state_dict().items()}


def _sgd_step(module: SegmentationModule, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    module.compute_loss(_batch())[0].backward()
    optimizer.step()


def test_frozen_encoder_does_not_change_until_unfrozen() -> None:
    module = _module(
        build_model("unet", "resnet18", None), freeze_encoder=True, unfreeze_at_epoch=2
    )
    optimizer = module.configure_optimizers()
    module.train()
    module.apply_freeze_schedule(0)
    before = _encoder_state(module)
    decoder_before = module.net.decoder.state_dict()["blocks.0.conv1.0.weight"].clone()
    _sgd_step(module, optimizer)
    after = _encoder_state(module)
    # Weights and BatchNorm running statistics of the frozen encoder are unchanged...
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not module.net.encoder.training and module.net.decoder.training
    # ...while the decoder learned.
    assert not torch.equal(
        decoder_before, module.net.decoder.state_dict()["blocks.0.conv1.0.weight"]
    )
    module.apply_freeze_schedule(1)
    _sgd_step(module, optimizer)
    assert all(torch.equal(before[k], v) for k, v in _encoder_state(module).items())
    module.apply_freeze_schedule(2)  # unfreeze
    assert module.net.encoder.training
    _sgd_step(module, optimizer)
    changed = _encoder_state(module)
    assert not torch.equal(before["conv1.weight"], changed["conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], changed["bn1.running_mean"])


def test_freeze_for_the_whole_run_survives_train_mode_switches() -> None:
    module = _module(build_model("unet", "resnet18", None), freeze_encoder=True)
    module.apply_freeze_schedule(50)
    module.eval()
    module.train()  # as Lightning does after each validation
    assert not module.net.encoder.training
    assert all(not p.requires_grad for p in module.net.encoder.parameters())


def test_scratch_baseline_rejects_unknown_options() -> None:
    from tlunet.errors import ConfigError

    with pytest.raises(ConfigError, match="Bad option for architecture 'resunet'.*chanels"):
        build_model("resunet", "none", None, chanels=SMALL)


@pytest.mark.parametrize(("arch", "encoder"), [("unet", "resnet18"), ("resunet", "none")])
def test_aux_network_returns_masks_and_labels(arch: str, encoder: str) -> None:
    """smp's aux_params style: one forward gives the mask logits of the plain network (same
    weights) and the head's label logits computed from the deepest encoder features."""
    torch.manual_seed(0)
    kwargs = {"channels": SMALL} if arch == "resunet" else {}
    net = build_model(arch, encoder, None, aux_head=True, aux_hidden=16, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        masks, labels = net(x)
        assert torch.equal(masks, net.segmenter(x))
        assert torch.equal(labels, net.aux_head(net.encoder(x)[-1]))
    assert masks.shape == (2, 1, 64, 64) and labels.shape == (2, 2)
    assert net.aux_head.fc1.out_features == 16
    # Nothing is left registered on the encoder between calls.
    assert not net.segmenter.encoder._forward_hooks


def test_old_checkpoints_with_the_module_level_head_load() -> None:
    """tlunet < 0.3 kept the head beside the network (keys net.* and aux_head.*)."""
    from tlunet.models.aux_head import upgrade_state_dict

    net = build_model("unet", "resnet18", None, aux_head=True)
    module = _module(net)
    state = module.state_dict()
    old = {}
    for key, value in state.items():
        if key.startswith("net.aux_head."):
            key = key[len("net.") :]
        elif key.startswith("net.segmenter."):
            key = "net." + key[len("net.segmenter.") :]
        old[key] = value
    assert upgrade_state_dict(old, with_aux=True).keys() == state.keys()
    assert upgrade_state_dict(state, with_aux=True).keys() == state.keys()  # already current
    plain = _module(build_model("unet", "resnet18", None)).state_dict()
    assert upgrade_state_dict(plain, with_aux=False).keys() == plain.keys()
