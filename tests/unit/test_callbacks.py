"""The prediction figure picks informative slices and writes a PNG; last.ckpt follows every
epoch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from tlunet.callbacks import ModelCheckpoint, PredictionFigure
from tlunet.scoring import native_mask_tensor


def test_prediction_figure_rows(tmp_path: Path, monkeypatch) -> None:
    drawn = {}

    def fake_plot(images, truths, preds, titles, path):
        drawn.update(images=images, truths=truths, titles=list(titles), path=path)

    monkeypatch.setattr("tlunet.callbacks.plot_predictions", fake_plot)
    fig = PredictionFigure(str(tmp_path / "p.png"), per_class=2)
    trainer = SimpleNamespace(
        is_global_zero=True,
        datamodule=SimpleNamespace(
            patients=["A", "B", "C"], preprocessing={"mean": (0, 0, 0), "std": (1, 1, 1)}
        ),
    )
    module = SimpleNamespace(threshold=0.5)
    fig.on_test_epoch_start(trainer, module)
    masks = torch.zeros(6, 1, 8, 8)
    masks[0, :, :2, :2] = 1  # patient A slice 1: area 4
    masks[1, :, :4, :4] = 1  # patient A slice 2: area 16 (the largest of A)
    masks[3, :, :1, :1] = 1  # patient B slice 2: area 1
    images = torch.zeros(6, 3, 8, 8)
    images[4] = 0.2  # patient C, tumour-free, dark
    images[5] = 0.8  # patient C, tumour-free, bright: chosen
    batch = {
        "image": images,
        "mask": masks,
        "patient": torch.tensor([0, 0, 1, 1, 2, 2]),
        "slice": torch.tensor([1, 2, 1, 2, 1, 2]),
    }
    fig.on_test_batch_end(trainer, module, {"probs": masks.clone()}, batch, 0)
    fig.on_test_epoch_end(trainer, module)
    assert drawn["titles"] == ["A slice 2", "B slice 2", "B slice 1", "C slice 2"]
    assert [int(t.sum()) for t in drawn["truths"]] == [16, 1, 0, 0]
    assert drawn["images"].shape == (4, 8, 8, 3) and drawn["images"].dtype.name == "uint8"
    assert drawn["images"][3].max() == round(0.8 * 255)


def test_prediction_figure_draws_the_slices_as_scored(tmp_path: Path) -> None:
    """With native masks and decoded slices: the slice as on disk, the native mask, and the
    probabilities resized to it then thresholded (what the scores count), in three colours."""
    decoded = np.zeros((2, 16, 16, 3), np.uint8)
    decoded[1, :, :, 1] = 77  # the FLAIR channel of row 1
    trainer = SimpleNamespace(
        is_global_zero=True,
        datamodule=SimpleNamespace(
            patients=["A"],
            preprocessing={"mean": (0, 0, 0), "std": (1, 1, 1)},
            decoded=SimpleNamespace(images=decoded),
        ),
    )
    fig = PredictionFigure(str(tmp_path / "predictions.png"))
    fig.on_test_epoch_start(trainer, SimpleNamespace(threshold=0.5))
    native = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    native[0, 0, :8, :8] = 1  # 64 tumour pixels at 16 px
    probs = torch.zeros(1, 1, 8, 8)
    probs[0, 0, :4, :2] = 1.0  # at 16 px: 8 rows, about 3 columns
    batch = {
        "image": torch.zeros(1, 3, 8, 8),
        "mask": torch.zeros(1, 1, 8, 8),
        "mask_native": native,
        "patient": torch.tensor([0]),
        "slice": torch.tensor([4]),
        "row": torch.tensor([1]),
    }
    fig.on_test_batch_end(trainer, SimpleNamespace(threshold=0.5), {"probs": probs}, batch, 0)
    ((image, truth, pred, *_),) = [row for _, row in fig._tumour.values()]
    assert image.shape == (16, 16, 3) and image[..., 1].max() == 77
    assert truth.shape == pred.shape == (16, 16) and truth.sum() == 64
    expected = native_mask_tensor(probs, (16, 16), 0.5)[0, 0].numpy()
    np.testing.assert_array_equal(pred, expected)
    assert 0 < pred.sum() < 64  # resized then thresholded: some found, some missed
    fig.on_test_epoch_end(trainer, SimpleNamespace(threshold=0.5))
    assert (tmp_path / "predictions.png").stat().st_size > 5000


def test_prediction_figure_failure_is_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("tlunet.callbacks.plot_predictions", broken)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(patients=["A"]))
    fig = PredictionFigure(str(tmp_path / "p.png"))
    batch = {
        "image": torch.zeros(1, 3, 8, 8),
        "mask": torch.ones(1, 1, 8, 8),
        "patient": torch.tensor([0]),
        "slice": torch.tensor([1]),
    }
    module = SimpleNamespace(threshold=0.5)
    fig.on_test_batch_end(trainer, module, {"probs": torch.ones(1, 1, 8, 8)}, batch, 0)
    fig.on_test_epoch_end(trainer, module)  # does not raise
    assert "Could not draw the prediction figure" in caplog.text and "no fonts" in caplog.text
    assert not (tmp_path / "p.png").exists()


class _WorseEveryEpoch(BoringModel):
    """Logs a validation score that only falls: no epoch after the first improves."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/score", -float(self.current_epoch))


@pytest.mark.parametrize("on_train_epoch_end", [False, True])
def test_last_checkpoint_is_the_last_epoch_not_the_last_improvement(
    tmp_path: Path, on_train_epoch_end: bool
) -> None:
    """Lightning 2.6 writes last.ckpt only when a top-k checkpoint is saved at that step: a
    killed run would resume from its last improvement and lose the epochs after it."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path,
        filename="best",
        monitor="val/score",
        mode="max",
        save_top_k=1,
        save_last=True,
        save_on_train_epoch_end=on_train_epoch_end,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_WorseEveryEpoch())
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 0  # the only improvement
    assert last["epoch"] == 2 and last["global_step"] == 6
