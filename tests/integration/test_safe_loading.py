"""Checkpoints and weights files never run pickled code: a tampered or foreign file is refused
with one clear message, and what it carries is never executed."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import run_cli
from tests.unit.test_targets import evil_module, payloads
from tlunet.checkpoint import load_checkpoint
from tlunet.errors import ConfigError
from tlunet.models import build_model
from tlunet.targets import UntrustedTarget


class _Payload:
    """Creates ``marker`` when unpickled: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _tampered(path: Path, marker: Path, base: dict | None = None) -> Path:
    torch.save({**(base or {}), "payload": _Payload(marker)}, path)
    return path


def test_tampered_weights_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = build_model("unet", "resnet18", encoder_weights=None).encoder.state_dict()
    path = _tampered(tmp_path / "encoder.pt", marker, state)
    with pytest.raises(ConfigError, match=rf"{path.name}"):
        build_model("unet", "resnet18", encoder_weights=None, encoder_weights_path=str(path))
    assert not marker.exists()


def test_tampered_checkpoint_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    path = _tampered(tmp_path / "best.ckpt", marker, good)
    with pytest.raises(ConfigError, match=r"Cannot load checkpoint .* safely \(weights_only\)"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tlunet.evaluate", "tlunet.predict", "tlunet.export"])
def test_commands_refuse_tampered_and_foreign_files(
    command: str, tmp_path: Path, synthetic_root: Path
) -> None:
    marker = tmp_path / "pwned"
    tampered = _tampered(tmp_path / "tampered.ckpt", marker)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)  # loadable, but not tlunet's
    patient = next(p for p in sorted(synthetic_root.iterdir()) if p.is_dir())
    extra = {"tlunet.predict": [f"input={patient}", f"output={tmp_path / 'out'}"]}
    for ckpt, message in ((tampered, "safely"), (foreign, "is not a tlunet checkpoint")):
        out = run_cli(
            [
                command,
                f"ckpt_path={ckpt}",
                f"hydra.run.dir={tmp_path / 'run'}",
                *extra.get(command, []),
            ],
            cwd=tmp_path,
        )
        assert out.returncode == 1, out.stderr[-2000:]
        assert message in out.stderr and str(ckpt) in out.stderr
        assert "Traceback" not in out.stderr
    assert not marker.exists()


def _with_payload(config: dict, node: dict) -> dict:
    """A copy of a stored run config with ``node`` in an unused optimiser key."""
    config = copy.deepcopy(config)
    config["module"]["optimizer"]["weight_decay"] = node
    return config


@pytest.mark.parametrize(
    "name", ["builtins.open", "write_text_atomic", "os.system", "subprocess.run", "importlib"]
)
def test_checkpoint_naming_a_function_is_refused_before_anything_is_built(
    name: str, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    evil_module(tmp_path, marker, monkeypatch)
    node = next(v for k, v in payloads(marker).items() if k.startswith(name))
    good = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    config = _with_payload(good["hyper_parameters"]["config"], node)
    # The stored config is all the check reads: the weights can stay out of this copy.
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": config}}, path)
    with pytest.raises(UntrustedTarget, match=r"module\.optimizer\.weight_decay"):
        load_checkpoint(path)
    assert not marker.exists()


def _resumable_copy(tiny_run: Path, dest: Path) -> Path:
    """A copy of ``tiny_run`` that resume= would continue: no metrics.json, its config naming
    the copy as its folder."""
    shutil.copytree(tiny_run, dest)
    (dest / "metrics.json").unlink()
    config = OmegaConf.load(dest / "config.yaml")
    config.paths.output_dir = str(dest)
    OmegaConf.save(config, dest / "config.yaml")
    return dest


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("tlunet.evaluate", "builtins.open"),
        ("tlunet.predict", "write_text_atomic"),
        ("tlunet.export", "os.system"),
        ("resume checkpoint", "importlib"),
        ("resume config.yaml", "subprocess.run"),
    ],
)
def test_commands_refuse_a_stored_config_that_names_a_function(
    command: str, name: str, tiny_run: Path, tmp_path: Path, synthetic_root_128: Path
) -> None:
    """evaluate, predict, export and resume= on a checkpoint (or a run's config.yaml) holding a
    payload in an unused key: exit 1, one line naming the file, key and target, no marker."""
    marker = tmp_path / "pwned"
    (tmp_path / "tlunet_test_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    node = next(v for k, v in payloads(marker).items() if k.startswith(name))
    if command.startswith("resume"):
        run_dir = _resumable_copy(tiny_run, tmp_path / "run")
        victim = run_dir / ("config.yaml" if "config" in command else "checkpoints/last.ckpt")
        if victim.suffix == ".yaml":
            config = OmegaConf.to_container(OmegaConf.load(victim))
            OmegaConf.save(OmegaConf.create(_with_payload(config, node)), victim)
        else:
            ckpt = torch.load(victim, map_location="cpu", weights_only=True)
            ckpt["hyper_parameters"]["config"] = _with_payload(
                ckpt["hyper_parameters"]["config"], node
            )
            torch.save(ckpt, victim)
        args = ["tlunet.train", f"resume={run_dir}"]
    else:
        victim = tmp_path / "tampered.ckpt"
        ckpt = torch.load(tiny_run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
        ckpt["hyper_parameters"]["config"] = _with_payload(ckpt["hyper_parameters"]["config"], node)
        torch.save(ckpt, victim)
        patient = next(p for p in sorted(synthetic_root_128.iterdir()) if p.is_dir())
        extra = {"tlunet.predict": [f"input={patient}", f"output={tmp_path / 'out'}"]}
        args = [command, f"ckpt_path={victim}", f"hydra.run.dir={tmp_path / 'eval'}"]
        args += extra.get(command, [])
    out = run_cli(args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("tlunet")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(victim) in errors[0] and node["_target_"] in errors[0]
    assert "module.optimizer.weight_decay" in errors[0]
    assert not marker.exists()
