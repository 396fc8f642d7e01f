"""Segment new slices with an exported model: onnxruntime and numpy, no PyTorch.

    python -m tlunet.predict_onnx model=best.onnx input=PATH output=DIR

The same inputs and outputs as ``tlunet.predict`` (a .tif/.png slice, a folder of slices or a
kaggle_3m patient folder; ``masks/<name>.tif``, ``overlays/<name>.png``, ``tumour_area.csv``,
with the aux head's columns for a model exported with its ``label_logits`` output), through the
same code (:func:`tlunet.slices.segment`) but for the network: the ``.onnx`` file written by
``python -m tlunet.export`` runs in onnxruntime. The preprocessing (``image_size``, ``mean``,
``std``) and the ``threshold`` come from the sidecar ``<model>.json`` the export writes beside
it. Inputs are resized and normalised in numpy exactly as the checkpoint's transform does
(:func:`tlunet.resolution.network_input`), and the probabilities resized back by the very
function PyTorch's path uses, so both commands write the same masks wherever onnxruntime's
logits agree with PyTorch's (they differ by about 1e-6: a pixel whose probability lies that
close to the threshold can differ).

This module and everything it imports (``tlunet.slices``, ``tlunet.resolution``,
``tlunet.data.cache``, ``tlunet.cli``, ``tlunet.utils``) need no PyTorch: a deployment machine
needs numpy, opencv-python-headless, tifffile, hydra-core and onnxruntime.

The configuration is ``conf/predict_onnx.yaml``, composed on its own (from Hydra's config
store) rather than from the ``pkg://tlunet.conf`` search path of the other commands: there,
``model`` is a config group, and Hydra would read ``model=best.onnx`` as a choice of that group.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tlunet.cli import user_errors_exit
from tlunet.errors import ConfigError
from tlunet.resolution import network_input, sigmoid, softmax
from tlunet.slices import Infer, run_prediction

CONFIG_NAME = "predict_onnx"
#: What the sidecar must hold (``tlunet.export`` writes them all).
SIDECAR_KEYS = ("image_size", "mean", "std", "threshold", "outputs")
EXPORT_HINT = "export the checkpoint again: python -m tlunet.export ckpt_path=... format=onnx"

ConfigStore.instance().store(
    name=CONFIG_NAME,
    node=OmegaConf.create(
        package_files("tlunet.conf").joinpath(f"{CONFIG_NAME}.yaml").read_text(encoding="utf-8")
    ),
)


def sidecar_path(model: Path) -> Path:
    """Where ``tlunet.export`` writes the sidecar of ``model``: ``<model>.json``."""
    return model.with_name(model.name + ".json")


def read_sidecar(model: Path) -> dict[str, Any]:
    """The sidecar of ``model``, checked: ``image_size`` (int), ``mean``/``std`` (3 numbers
    each, std > 0), ``threshold`` (a number in [0, 1]) and ``outputs`` (names, ``logits``
    first). Raises :class:`ConfigError` naming the file and the key otherwise."""
    path = sidecar_path(model)
    if not path.is_file():
        raise ConfigError(
            f"sidecar '{path}' is missing: tlunet.export writes it beside the model (the "
            f"preprocessing and the threshold); copy it beside '{model.name}' or {EXPORT_HINT}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"sidecar '{path}' is not readable JSON ({exc}); {EXPORT_HINT}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"sidecar '{path}' is not a JSON object; {EXPORT_HINT}")
    missing = [key for key in SIDECAR_KEYS if key not in data]
    if missing:
        raise ConfigError(f"sidecar '{path}' lacks {', '.join(map(repr, missing))}; {EXPORT_HINT}")

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"sidecar '{path}': {key}={data[key]!r}, expected {expected}")

    def numbers(value: Any) -> bool:
        return isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)

    if not isinstance(data["image_size"], int) or isinstance(data["image_size"], bool):
        raise bad("image_size", "a whole number of pixels")
    if data["image_size"] < 1:
        raise bad("image_size", "a whole number of pixels")
    if not numbers(data["mean"]):
        raise bad("mean", "3 numbers (one per channel, [0, 1] scale)")
    if not numbers(data["std"]) or min(data["std"]) <= 0:
        raise bad("std", "3 positive numbers (one per channel, [0, 1] scale)")
    if not _is_number(data["threshold"]) or not 0 <= data["threshold"] <= 1:
        raise bad("threshold", "a probability in [0, 1]")
    outputs = data["outputs"] if isinstance(data["outputs"], list) else []
    names = [o.get("name") if isinstance(o, dict) else None for o in outputs]
    if not names or names[0] != "logits":
        raise bad("outputs", "a list of {name, meaning} with 'logits' first")
    return {**data, "output_names": names}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_session(model: Path, sidecar: dict[str, Any]) -> Any:
    """An onnxruntime CPU session of ``model``, checked against its sidecar: one input
    ``image`` (N, 3, S, S) with S = ``image_size``, the outputs the sidecar names."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(
            "tlunet.predict_onnx needs onnxruntime: pip install onnxruntime "
            "(or pip install 'tlunet[export]')"
        ) from exc
    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"Cannot load ONNX model '{model}': {first_line}") from exc
    inputs = session.get_inputs()
    size = sidecar["image_size"]
    if (
        len(inputs) != 1
        or inputs[0].name != "image"
        or list(inputs[0].shape[1:]) != [3, size, size]
    ):
        got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise ConfigError(
            f"ONNX model '{model}' takes {got}; its sidecar says image (N, 3, {size}, {size}): "
            f"the sidecar '{sidecar_path(model)}' belongs to another model"
        )
    names = [o.name for o in session.get_outputs()]
    if names != sidecar["output_names"]:
        raise ConfigError(
            f"ONNX model '{model}' has outputs {names}; its sidecar '{sidecar_path(model)}' "
            f"names {sidecar['output_names']}: the sidecar belongs to another model"
        )
    return session


def predict_onnx(cfg: DictConfig) -> Path:
    if not cfg.model or not cfg.input or not cfg.output:
        raise ConfigError(
            "model, input and output must all be given: "
            "python -m tlunet.predict_onnx model=best.onnx input=PATH output=DIR"
        )
    model = Path(str(cfg.model)).expanduser()
    if not model.is_file():
        raise ConfigError(f"model '{model}' does not exist (an .onnx file from tlunet.export).")
    sidecar = read_sidecar(model)

    def load() -> tuple[Infer, float, bool]:
        session = load_session(model, sidecar)
        threshold = float(cfg.threshold if cfg.threshold is not None else sidecar["threshold"])
        size, mean, std = sidecar["image_size"], sidecar["mean"], sidecar["std"]
        names = sidecar["output_names"]
        has_aux = "label_logits" in names

        def infer(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
            batch = np.stack([network_input(image, size, mean, std) for image in images])
            outputs = dict(zip(names, session.run(names, {"image": batch}), strict=True))
            detect = softmax(outputs["label_logits"])[:, 1] if has_aux else None
            return sigmoid(outputs["logits"]), detect

        return infer, threshold, has_aux

    return run_prediction(
        Path(str(cfg.input)).expanduser(),
        Path(str(cfg.output)).expanduser(),
        load,
        int(cfg.batch_size),
        cfg.nifti,
    )


@hydra.main(version_base="1.3", config_path=None, config_name=CONFIG_NAME)
@user_errors_exit
def main(cfg: DictConfig) -> None:
    predict_onnx(cfg)


if __name__ == "__main__":
    main()
