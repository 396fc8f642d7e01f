"""tlunet.predict_onnx in-process: the sidecar it needs, checked key by key, and an import graph
without PyTorch (the command itself runs in tests/integration/test_predict_onnx.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tlunet.errors import ConfigError
from tlunet.predict_onnx import SIDECAR_KEYS, read_sidecar

#: Packages a machine without PyTorch lacks (or that would drag PyTorch in).
TORCH_WORLD = {
    "torch",
    "torchvision",
    "pytorch_lightning",
    "lightning",
    "segmentation_models_pytorch",
    "timm",
    "torchmetrics",
    "albumentations",
}

SIDECAR = {
    "image_size": 64,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "threshold": 0.5,
    "input": "image (N, 3, S, S)",
    "outputs": [{"name": "logits", "meaning": "..."}, {"name": "label_logits", "meaning": "..."}],
}


def _model(tmp_path: Path, sidecar: dict | str | None) -> Path:
    model = tmp_path / "best.onnx"
    model.write_bytes(b"not read by read_sidecar")
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (tmp_path / "best.onnx.json").write_text(text)
    return model


def test_read_sidecar(tmp_path: Path) -> None:
    sidecar = read_sidecar(_model(tmp_path, SIDECAR))
    assert sidecar["image_size"] == 64 and sidecar["threshold"] == 0.5
    assert sidecar["output_names"] == ["logits", "label_logits"]


def test_missing_sidecar_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sidecar '.*best\.onnx\.json' is missing") as info:
        read_sidecar(_model(tmp_path, None))
    assert "\n" not in str(info.value) and "tlunet.export" in str(info.value)


@pytest.mark.parametrize("key", SIDECAR_KEYS)
def test_sidecar_without_a_key_is_named(tmp_path: Path, key: str) -> None:
    incomplete = {k: v for k, v in SIDECAR.items() if k != key}
    with pytest.raises(ConfigError, match=rf"best\.onnx\.json' lacks '{key}'"):
        read_sidecar(_model(tmp_path, incomplete))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("image_size", "64", "a whole number"),
        ("image_size", 0, "a whole number"),
        ("mean", [0.5, 0.5], "3 numbers"),
        ("std", [0.2, 0.0, 0.2], "3 positive numbers"),
        ("threshold", 1.5, r"a probability in \[0, 1\]"),
        ("outputs", [{"name": "label_logits"}], "a list .* with 'logits' first"),
        ("outputs", {"logits": "..."}, "a list .* with 'logits' first"),
    ],
)
def test_sidecar_with_a_wrong_value_is_named(tmp_path: Path, key: str, value, expected) -> None:
    with pytest.raises(ConfigError, match=rf"best\.onnx\.json': {key}=.*expected {expected}"):
        read_sidecar(_model(tmp_path, {**SIDECAR, key: value}))


def test_unreadable_sidecar_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"best\.onnx\.json' is not readable JSON"):
        read_sidecar(_model(tmp_path, "{not json"))


def _imported(path: Path) -> set[str]:
    """The modules ``path`` imports when it is imported (not inside its functions)."""
    names = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        todo.extend(ast.iter_child_nodes(node))
    return names


def test_predict_onnx_imports_nothing_of_pytorch() -> None:
    """No tlunet module predict_onnx imports (their packages' __init__ included) imports a
    package of the PyTorch world when imported; the command itself runs where importing torch
    fails in tests/integration/test_predict_onnx.py."""
    seen, todo, outside = set(), ["tlunet.predict_onnx"], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages are imported first
            package = ".".join(parts[:i])
            path = REPO.joinpath(*parts[:i])
            path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            if package in seen or not path.is_file():
                continue
            seen.add(package)
            for imported in _imported(path):
                if imported.startswith("tlunet."):
                    todo.append(imported)
                else:
                    outside.add(imported.split(".")[0])
    assert {"tlunet.slices", "tlunet.resolution", "tlunet.data.cache"} <= seen
    assert not outside & TORCH_WORLD, sorted(outside & TORCH_WORLD)
    assert not seen & {"tlunet.scoring", "tlunet.predict", "tlunet.checkpoint"}
