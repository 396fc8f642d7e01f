"""Export a checkpoint's network for deployment: ONNX or TorchScript.

    python -m tlunet.export ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt format=onnx

The exported model maps images (N, 3, S, S) float32, normalised as the checkpoint's
preprocessing says, to ``logits`` (N, 1, S, S); a model trained with the aux head
(``model.aux_head=true``) has a second output, ``label_logits`` (N, 2): the slice's tumour
absent/present logits (softmax, tumour at >= 0.5). The batch size is dynamic. A sidecar
``<output>.json`` records the preprocessing (image size, mean, std), the threshold and the
outputs. With ``check=true`` (default) the export is run on random input (onnxruntime for
ONNX, ``torch.jit.load`` for TorchScript) and every output must match PyTorch's within
``tolerance``.

The export never replaces the checkpoint, another ``.ckpt`` or any file but an earlier export
of the same name (a model with its sidecar): such an ``output`` is refused before the
checkpoint is loaded (:func:`check_output`).

ONNX goes through PyTorch's current exporter (``torch.onnx.export(..., dynamo=True)``, built on
``torch.export``; it needs onnxscript, in the ``export`` extra) with a dynamic batch axis and
the weights inside the ``.onnx`` file (written atomically, like the sidecar). Checked with torch 2.14.1 / onnxscript 0.7.2 on smp's
U-Net with the resnet18, efficientnet-lite0 and densenet121 encoders and on the scratch U-Net,
each with and without the aux head: every export matches PyTorch within 3e-5.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from tlunet.artifacts import checkpoint_section
from tlunet.checkpoint import load_checkpoint, module_from_checkpoint
from tlunet.cli import user_errors_exit
from tlunet.errors import ConfigError, TlunetError
from tlunet.predict_onnx import SIDECAR_KEYS
from tlunet.utils import atomic_path, write_json_atomic

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
#: The exported outputs, in order (the second only for a network with the aux head).
OUTPUTS = {
    "logits": "(N, 1, S, S) tumour logits: tumour where sigmoid(logits) >= threshold",
    "label_logits": "(N, 2) slice absent/present logits: tumour where softmax[:, 1] >= 0.5",
}


def export(cfg: DictConfig) -> Path:
    if not cfg.ckpt_path:
        raise ConfigError("ckpt_path is not set: python -m tlunet.export ckpt_path=... format=onnx")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format='{cfg.format}' is unknown; choose one of {sorted(FORMATS)}.")
    if cfg.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"format=onnx needs {' and '.join(missing)} (PyTorch's ONNX exporter uses them): "
                "pip install 'tlunet[export]'"
            )
    ckpt = Path(str(cfg.ckpt_path))
    output = Path(str(cfg.output)) if cfg.output else ckpt.with_suffix(FORMATS[cfg.format])
    check_output(output, ckpt)
    checkpoint = load_checkpoint(cfg.ckpt_path)
    module = module_from_checkpoint(checkpoint)
    pre = checkpoint_section(checkpoint).get("preprocessing") or {}
    size = int(pre.get("image_size", 256))
    net = module.net.eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, size, size)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines on every rewrite pass
        logging.getLogger(name).setLevel(logging.WARNING)
    outputs = list(OUTPUTS)[: 2 if module.has_aux else 1]
    intact = f"the checkpoint '{ckpt}' is intact"
    with torch.no_grad(), atomic_path(output, intact) as tmp:
        if cfg.format == "onnx":
            # torch.export-based exporter (dynamo); one file, the weights inside it (< 2 GB).
            torch.onnx.export(
                net,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=list(outputs),
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=int(cfg.opset),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        else:
            torch.jit.trace(net, example).save(str(tmp))
    write_json_atomic(
        output.with_name(output.name + ".json"),
        {
            **pre,
            "threshold": module.threshold,
            "input": "image (N, 3, S, S)",
            # In the model's order (a list: the JSON's keys are sorted).
            "outputs": [{"name": name, "meaning": OUTPUTS[name]} for name in outputs],
        },
        intact,
    )
    if cfg.check:
        diff = check_export(net, output, cfg.format, size)
        if diff > cfg.tolerance:
            raise TlunetError(
                f"The exported model '{output}' differs from PyTorch by {diff:.3g} "
                f"(tolerance {cfg.tolerance})."
            )
        print(
            f"check ({', '.join(outputs)}): largest |logit difference| {diff:.3g} "
            f"<= tolerance {cfg.tolerance}"
        )
    print(f"exported: {output}")
    return output


def _is_export_sidecar(path: Path) -> bool:
    """Whether ``path`` is a sidecar ``tlunet.export`` wrote (a JSON object with its keys)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in SIDECAR_KEYS)


def check_output(output: Path, ckpt: Path) -> None:
    """Refuse, before the checkpoint is loaded, an ``output`` whose writing would replace
    something that is not an earlier export of that name: the checkpoint itself, any
    ``.ckpt``, a folder, an existing file without an export's sidecar beside it, or a sidecar
    path (``<output>.json``) holding another file (``output=<run>/metrics`` would replace the
    run's ``metrics.json``). An earlier export (model and sidecar) is replaced."""
    sidecar = output.with_name(output.name + ".json")
    instead = "Name another file, or leave output unset (beside the checkpoint, by its name)."
    if output.exists() and ckpt.exists() and output.resolve() == ckpt.resolve():
        raise ConfigError(
            f"output '{output}' is the checkpoint being exported: the export would replace the "
            f"trained model. {instead}"
        )
    if output.suffix == ".ckpt":
        raise ConfigError(f"output '{output}' is named as a checkpoint (.ckpt). {instead}")
    if output.is_dir():
        raise ConfigError(f"output '{output}' is a folder: name the file to write. {instead}")
    earlier = sidecar.is_file() and _is_export_sidecar(sidecar)
    if output.exists() and not earlier:
        raise ConfigError(
            f"output '{output}' exists and is not an earlier export (no sidecar '{sidecar.name}' "
            f"of tlunet.export beside it): the export would replace it. {instead}"
        )
    if sidecar.exists() and not earlier:
        raise ConfigError(
            f"the export's sidecar '{sidecar}' exists and is not one: the export would "
            f"replace it. {instead}"
        )


@torch.no_grad()
def check_export(net: torch.nn.Module, path: Path, fmt: str, size: int, batch: int = 3) -> float:
    """Largest absolute difference between PyTorch's and the export's outputs (every one) on
    random input (batch size differs from the export's example, to exercise the dynamic axis)."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = _as_list(net(x))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})
    else:
        got = _as_list(torch.jit.load(str(path))(x))
    if len(got) != len(expected):
        raise TlunetError(f"'{path}' has {len(got)} outputs; PyTorch's network {len(expected)}.")
    return max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(got, expected, strict=True))


def _as_list(output: torch.Tensor | tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    tensors = output if isinstance(output, tuple | list) else [output]
    return [t.detach().numpy() for t in tensors]


@hydra.main(version_base="1.3", config_path="pkg://tlunet.conf", config_name="export")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
