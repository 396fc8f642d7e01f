"""The prediction figure picks informative slices and writes a PNG."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from tlunet.callbacks import PredictionFigure


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
