"""tlunet.export: ONNX and TorchScript outputs match PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, train_tiny
from tests.integration.test_predict_onnx import assert_same_predictions, run_without_torch
from tlunet.evaluate import load_checkpoint, module_from_checkpoint


@pytest.mark.parametrize(
    "fmt",
    # the ONNX exporter takes 18 s: slow tier (test_export_carries_the_aux_heads_output too)
    [pytest.param("onnx", marks=pytest.mark.slow), "torchscript"],
)
def test_export_matches_pytorch(tiny_run: Path, tmp_path: Path, fmt: str) -> None:
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    target = tmp_path / f"model.{fmt}"
    out = run_cli(
        ["tlunet.export", f"ckpt_path={ckpt}", f"format={fmt}", f"output={target}"], cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "check (logits): largest |logit difference|" in out.stdout
    sidecar = json.loads(Path(f"{target}.json").read_text())
    assert sidecar["image_size"] == 64 and len(sidecar["mean"]) == 3 and sidecar["threshold"] == 0.5
    assert [o["name"] for o in sidecar["outputs"]] == ["logits"]  # no aux head: one output
    # Independent re-check here, on input of another batch size, to 1e-4.
    net = module_from_checkpoint(load_checkpoint(ckpt)).net
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = net(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        got = ort.InferenceSession(str(target)).run(None, {"image": x.numpy()})[0]
    else:
        got = torch.jit.load(str(target))(x).detach().numpy()
    assert got.shape == (4, 1, 64, 64)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_export_unknown_format(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = run_cli(["tlunet.export", f"ckpt_path={ckpt}", "format=tflite"], cwd=tmp_path)
    assert out.returncode == 1 and "format='tflite' is unknown" in out.stderr


@pytest.mark.slow
def test_export_carries_the_aux_heads_output(synthetic_root_128: Path, tmp_path: Path) -> None:
    """A model trained with the aux head exports both outputs (mask logits, label logits),
    each within 1e-4 of PyTorch; the sidecar names them; predict lists the head's answer, and
    predict_onnx too."""
    run_dir = train_tiny(synthetic_root_128, tmp_path / "train", "model.aux_head=true")
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    target = tmp_path / "aux.onnx"
    out = run_cli(["tlunet.export", f"ckpt_path={ckpt}", f"output={target}"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "check (logits, label_logits)" in out.stdout
    sidecar = json.loads(Path(f"{target}.json").read_text())
    assert [o["name"] for o in sidecar["outputs"]] == ["logits", "label_logits"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(target))
    assert [o.name for o in session.get_outputs()] == ["logits", "label_logits"]
    net = module_from_checkpoint(load_checkpoint(ckpt)).net
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        masks, labels = net(x)
    got_masks, got_labels = session.run(None, {"image": x.numpy()})
    assert got_masks.shape == (5, 1, 64, 64) and got_labels.shape == (5, 2)
    assert np.abs(got_masks - masks.numpy()).max() < 1e-4
    assert np.abs(got_labels - labels.numpy()).max() < 1e-4

    patient = next(p for p in sorted(synthetic_root_128.iterdir()) if p.is_dir())
    pred = tmp_path / "pred"
    out = run_cli(
        ["tlunet.predict", f"ckpt_path={ckpt}", f"input={patient}", f"output={pred}"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    header, *rows = (pred / "tumour_area.csv").read_text().splitlines()
    assert header.endswith("aux_tumour_probability,aux_tumour_detected")
    for row in rows:
        probability, detected = row.split(",")[-2:]
        assert 0.0 <= float(probability) <= 1.0 and int(detected) == (float(probability) >= 0.5)
    # predict_onnx, without PyTorch, on the exported model: the same masks and overlays, the
    # head's columns too (its probability to onnxruntime's precision: 6 decimals are written).
    onnx_pred = tmp_path / "pred_onnx"
    out = run_without_torch(
        [f"model={target}", f"input={patient}", f"output={onnx_pred}"], tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert_same_predictions(pred, onnx_pred, csv_columns_close={"aux_tumour_probability": 1e-5})

    # A checkpoint of tlunet < 0.3 (the head beside the network, the module node without its
    # network): evaluate/predict/export load it into today's network, same outputs.
    checkpoint = torch.load(ckpt, weights_only=True)
    old_state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("net.aux_head."):
            key = key[len("net.") :]
        elif key.startswith("net.segmenter."):
            key = "net." + key[len("net.segmenter.") :]
        old_state[key] = value
    config = checkpoint["hyper_parameters"]["config"]
    config["module"] = {k: config["module"][k] for k in ("_target_", "monitor", "threshold")}
    for key in ("aux_head", "aux_hidden"):
        del config["model"]["net"][key]
    old = tmp_path / "old.ckpt"
    torch.save({**checkpoint, "state_dict": old_state}, old)
    old_net = module_from_checkpoint(load_checkpoint(old)).net
    with torch.no_grad():
        old_masks, old_labels = old_net(x)
    assert torch.equal(old_masks, masks) and torch.equal(old_labels, labels)
