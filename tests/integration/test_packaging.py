"""tlunet as a package: no import cycles, one console script per command, and a wheel that
works outside the repository (its configuration shipped inside it)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

PACKAGE = REPO / "tlunet"

#: Console script -> the module whose ``python -m`` form it equals.
COMMANDS = {
    "tlunet-train": "tlunet.train",
    "tlunet-evaluate": "tlunet.evaluate",
    "tlunet-predict": "tlunet.predict",
    "tlunet-export": "tlunet.export",
    "tlunet-predict-onnx": "tlunet.predict_onnx",
    "tlunet-report": "tlunet.report",
    "tlunet-compare": "tlunet.compare",
    "tlunet-study": "tlunet.study",
    "tlunet-check": "tlunet.data.check",
    "tlunet-overview": "tlunet.overview",
    "tlunet-bench": "tlunet.cli",  # runs benchmarks/bench.py of a source checkout
    "tlunet-download": "tlunet.models.download",
}


#: The code the import graph covers: the package, its Hydra plugins and the benchmarks.
SOURCES = (PACKAGE, REPO / "hydra_plugins", REPO / "benchmarks")


def _modules() -> dict[str, Path]:
    out = {}
    for path in (p for source in SOURCES for p in source.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tlunet modules ``name`` imports anywhere in its code (functions included), without
    the packages above it (importing a submodule always imports its parents first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_tlunet_modules() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "tlunet.checkpoint" in graph["tlunet.evaluate"]  # the analysis sees imports
    assert "tlunet.sweeps" in graph["hydra_plugins.tlunet_sweeps"]  # and the plugins'
    assert "tlunet.evaluate" in graph["benchmarks.measure"]  # and the benchmarks'
    assert "benchmarks.measure" in graph["benchmarks.bench"]  # the command imports them
    assert _cycles(graph) == []
    # The package never imports the benchmarks (a wheel does not ship them).
    assert not [
        m
        for m, deps in graph.items()
        if m.startswith("tlunet") and any(d.startswith("benchmarks") for d in deps)
    ]


def test_every_command_has_its_console_script() -> None:
    scripts = {
        e.name: e
        for e in metadata.entry_points(group="console_scripts")
        if e.dist is not None and e.dist.name == "tlunet"
    }
    assert sorted(scripts) == sorted(COMMANDS)
    for name, module in COMMANDS.items():
        assert scripts[name].module == module, name
        assert callable(scripts[name].load()), name


def test_configuration_is_read_from_the_package() -> None:
    import importlib.resources

    conf = importlib.resources.files("tlunet.conf")
    assert (conf / "train.yaml").is_file() and (conf / "encoder" / "resnet18.yaml").is_file()
    for module in ("train", "evaluate", "predict", "export"):
        assert 'config_path="pkg://tlunet.conf"' in (PACKAGE / f"{module}.py").read_text()


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_trains_from_another_directory(tmp_path: Path) -> None:
    # Built from a copy of the source files: setuptools writes build/ and *.egg-info beside them.
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    source = tmp_path / "source"
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            source,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = dist.glob("tlunet-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies (torch, Lightning...) come from this environment's site-packages, read
    # as a plain path: its editable tlunet finder is not loaded, so only the wheel is tlunet.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in cli_env(work).items() if k not in ("PYTHONPATH", "TLUNET_OUTPUT_DIR")}
    where = subprocess.run(
        [python, "-c", "import tlunet, tlunet.conf; print(tlunet.__file__, tlunet.conf.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(REPO) not in where and str(venv) in where, where

    script = venv / "bin" / "tlunet-train"
    out = subprocess.run(
        [script, "experiment=demo", "debug=fast", "data.image_size=64"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = (work / "outputs" / "runs").iterdir()
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    for name in COMMANDS:
        assert os.access(venv / "bin" / name, os.X_OK), name
    helped = subprocess.run(
        [venv / "bin" / "tlunet-compare", "--help"], env=env, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "EVAL_A" in helped.stdout.upper()


def test_the_wheel_lists_every_subpackage() -> None:
    """pyproject.toml names the packages a wheel ships one by one: a new subpackage missing
    there works in an editable install and fails only once installed."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in PACKAGE.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - {"tlunet.conf"} <= listed, sorted(found - listed)
