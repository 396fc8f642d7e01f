"""Checkpoints and weights files never run pickled code: a tampered or foreign file is refused
with one clear message, and what it carries is never executed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tlunet.errors import ConfigError
from tlunet.evaluate import load_checkpoint
from tlunet.models import build_model


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
