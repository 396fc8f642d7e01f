"""tlunet.export: ONNX and TorchScript outputs match PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tlunet.evaluate import load_checkpoint, module_from_checkpoint

from .conftest import run_cli


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(tiny_run: Path, tmp_path: Path, fmt: str) -> None:
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    target = tmp_path / f"model.{fmt}"
    out = run_cli(
        ["tlunet.export", f"ckpt_path={ckpt}", f"format={fmt}", f"output={target}"], cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "check: largest |logit difference|" in out.stdout
    sidecar = json.loads(Path(f"{target}.json").read_text())
    assert sidecar["image_size"] == 64 and len(sidecar["mean"]) == 3 and sidecar["threshold"] == 0.5
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
