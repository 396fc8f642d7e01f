"""Export a checkpoint's network for deployment: ONNX or TorchScript.

    python -m tlunet.export ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt format=onnx

The exported model maps images (N, 3, S, S) float32, normalised as the checkpoint's
preprocessing says, to logits (N, 1, S, S); the batch size is dynamic. A sidecar
``<output>.json`` records the preprocessing (image size, mean, std) and the threshold. With
``check=true`` (default) the export is run on random input (onnxruntime for ONNX,
``torch.jit.load`` for TorchScript) and its logits must match PyTorch's within ``tolerance``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from tlunet.checkpoint import load_checkpoint, module_from_checkpoint
from tlunet.cli import user_errors_exit
from tlunet.errors import ConfigError, TlunetError
from tlunet.utils import write_json_atomic

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export(cfg: DictConfig) -> Path:
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is not set: python -m tlunet.export ckpt_path=... format=onnx")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format='{cfg.format}' is unknown; choose one of {sorted(FORMATS)}.")
    checkpoint = load_checkpoint(cfg.ckpt_path)
    module = module_from_checkpoint(checkpoint)
    pre = (checkpoint.get("tlunet") or {}).get("preprocessing") or {}
    size = int(pre.get("image_size", 256))
    net = module.net.eval()
    ckpt = Path(str(cfg.ckpt_path))
    output = Path(str(cfg.output)) if cfg.output else ckpt.with_suffix(FORMATS[cfg.format])
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if cfg.format == "onnx":
            torch.onnx.export(
                net,
                (example,),
                str(output),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=int(cfg.opset),
                dynamo=False,
            )
        else:
            torch.jit.trace(net, example).save(str(output))
    write_json_atomic(
        output.with_name(output.name + ".json"),
        {**pre, "threshold": module.threshold, "input": "image (N, 3, S, S)", "output": "logits"},
    )
    if cfg.check:
        diff = check_export(net, output, cfg.format, size)
        if diff > cfg.tolerance:
            raise TlunetError(
                f"The exported model '{output}' differs from PyTorch by {diff:.3g} "
                f"(tolerance {cfg.tolerance})."
            )
        print(f"check: largest |logit difference| {diff:.3g} <= tolerance {cfg.tolerance}")
    print(f"exported: {output}")
    return output


@torch.no_grad()
def check_export(net: torch.nn.Module, path: Path, fmt: str, size: int, batch: int = 3) -> float:
    """Largest absolute difference between PyTorch's and the export's logits on random input
    (batch size differs from the export's example, to exercise the dynamic axis)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = net(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
    else:
        got = torch.jit.load(str(path))(x).numpy()
    return float(np.abs(got - expected).max())


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="export")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
