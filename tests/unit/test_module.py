"""The LightningModule learns, logs the metric vocabulary and keeps checkpoints self-describing."""

from __future__ import annotations

from functools import partial

import torch

from tlunet.losses import WeightedSum
from tlunet.module import SegmentationModule


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(4, 3, 16, 16)
    mask = (image[:, 1:2] > 0.5).float()  # the mask is a threshold of channel 1: learnable
    return {"image": image, "mask": mask, "patient": torch.tensor([0, 0, 1, 1])}


def test_optimiser_steps_reduce_the_loss() -> None:
    loss = WeightedSum({"bce": torch.nn.BCEWithLogitsLoss()})
    module = SegmentationModule(_TinyNet(), loss, partial(torch.optim.Adam, lr=0.05))
    optimizer = module.configure_optimizers()
    batch = _batch()
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        value = module.loss(module(batch["image"]), batch["mask"])
        value.backward()
        optimizer.step()
        first = first if first is not None else value.item()
    assert value.item() < 0.5 * first


def test_scheduler_follows_the_monitored_metric() -> None:
    module = SegmentationModule(
        _TinyNet(),
        WeightedSum({"bce": torch.nn.BCEWithLogitsLoss()}),
        partial(torch.optim.Adam, lr=1e-4),
        partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max"),
        monitor="val/dice",
    )
    conf = module.configure_optimizers()
    assert conf["lr_scheduler"]["monitor"] == "val/dice"
    assert conf["optimizer"].param_groups[0]["lr"] == 1e-4


def test_bce_dice_loss_is_float32_under_half_inputs() -> None:
    import segmentation_models_pytorch as smp

    loss = WeightedSum(
        {
            "bce": smp.losses.SoftBCEWithLogitsLoss(),
            "dice": smp.losses.DiceLoss("binary", from_logits=True),
        }
    )
    logits = torch.full((2, 1, 64, 64), 3.0, dtype=torch.float16)
    target = torch.ones(2, 1, 64, 64, dtype=torch.float16)
    value = loss(logits, target)
    assert value.dtype == torch.float32 and torch.isfinite(value)
