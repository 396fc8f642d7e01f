"""tlunet.predict_onnx where PyTorch cannot be imported: the masks, overlays and areas of
tlunet.predict, byte for byte, from the exported model; one clear line for a missing sidecar."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import tifffile

from tests.conftest import cli_env, run_cli

#: Made unimportable in the command's process (None in sys.modules: ``import torch`` raises
#: ImportError): PyTorch and every library built on it (albumentations: the torch path's
#: preprocessing, replaced by numpy).
BLOCKED = (
    "torch",
    "torchvision",
    "pytorch_lightning",
    "lightning",
    "segmentation_models_pytorch",
    "timm",
    "torchmetrics",
    "albumentations",
)


def run_without_torch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m tlunet.predict_onnx ARGS`` in a process where importing torch fails."""
    code = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None\n"
        "runpy.run_module('tlunet.predict_onnx', run_name='__main__', alter_sys=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def export_onnx(ckpt: Path, target: Path, cwd: Path) -> Path:
    out = run_cli(["tlunet.export", f"ckpt_path={ckpt}", f"output={target}"], cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return target


def assert_same_predictions(
    torch_out: Path, onnx_out: Path, csv_columns_close: dict[str, float] | None = None
) -> None:
    """Both predict commands wrote the same files, byte for byte; ``csv_columns_close``: the
    tumour_area.csv columns that need only agree within a tolerance."""
    for folder in ("masks", "overlays"):
        names = sorted(p.name for p in (torch_out / folder).iterdir())
        assert names and names == sorted(p.name for p in (onnx_out / folder).iterdir())
        for name in names:
            assert (torch_out / folder / name).read_bytes() == (
                onnx_out / folder / name
            ).read_bytes(), f"{folder}/{name} differs"
    expected = list(csv.DictReader(open(torch_out / "tumour_area.csv")))
    got = list(csv.DictReader(open(onnx_out / "tumour_area.csv")))
    assert expected and [list(r) for r in got] == [list(r) for r in expected]  # same columns
    close = csv_columns_close or {}
    for want, have in zip(expected, got, strict=True):
        for column, value in want.items():
            if column in close:
                assert abs(float(have[column]) - float(value)) <= close[column], (column, want)
            else:
                assert have[column] == value, (column, want, have)


@pytest.mark.slow
def test_predict_onnx_without_torch_writes_what_predict_writes(
    tiny_run: Path, synthetic_root_128: Path, tmp_path: Path
) -> None:
    """The tiny run (network at 64 px) on a patient's 128-px slices and on an 80x96 PNG: both
    directions of resizing are exercised, and every mask equals the torch command's."""
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    model = export_onnx(ckpt, tmp_path / "model" / "best.onnx", tmp_path)
    inputs = tmp_path / "inputs"
    patient = sorted(p for p in synthetic_root_128.iterdir() if p.is_dir())[0]
    shutil.copytree(patient, inputs)
    first = sorted(p for p in inputs.glob("*.tif") if not p.stem.endswith("_mask"))[0]
    png = cv2.resize(tifffile.imread(first), (96, 80))
    cv2.imwrite(str(inputs / "other_1.png"), cv2.cvtColor(png, cv2.COLOR_RGB2BGR))

    torch_out = tmp_path / "torch"
    out = run_cli(
        ["tlunet.predict", f"ckpt_path={ckpt}", f"input={inputs}", f"output={torch_out}"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    onnx_out = tmp_path / "onnx"
    out = run_without_torch([f"model={model}", f"input={inputs}", f"output={onnx_out}"], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "slices segmented into" in out.stdout
    assert tifffile.imread(onnx_out / "masks" / "other_1.tif").shape == (80, 96)
    masks = [tifffile.imread(p) for p in (onnx_out / "masks").iterdir()]
    assert any(m.any() for m in masks) and any(not m.all() for m in masks)  # not trivial
    assert_same_predictions(torch_out, onnx_out)

    # The threshold can be overridden, as in tlunet.predict.
    out = run_without_torch(
        [f"model={model}", f"input={first}", f"output={tmp_path / 'low'}", "threshold=0.0"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert tifffile.imread(tmp_path / "low" / "masks" / f"{first.stem}.tif").min() == 255


@pytest.mark.slow
def test_predict_onnx_missing_sidecar_is_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    model = tmp_path / "best.onnx"
    model.write_bytes(b"an exported model whose sidecar was not copied")
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    out = run_without_torch(
        [f"model={model}", f"input={patient}", f"output={tmp_path / 'pred'}"], tmp_path
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("tlunet error: sidecar") and "best.onnx.json' is missing" in lines[0]
    assert not (tmp_path / "pred").exists()
