"""The precision evaluate and predict run a checkpoint in: its run's by default (recorded in
the checkpoint; for older ones run.json beside it, else the config resolved here), or the
command's ``precision=``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

import tlunet.builders
from tlunet.errors import ConfigError
from tlunet.precision import checkpoint_precision, precision_plugin


def _checkpoint(stored: str | None = None, configured: str | None = None) -> dict:
    config = {"trainer": {"precision": configured}} if configured else {}
    return {
        "tlunet": {"precision": stored} if stored else {},
        "hyper_parameters": {"config": config},
    }


def test_the_checkpoints_precision_first(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    got = checkpoint_precision(_checkpoint("bf16-mixed", "32-true"), ckpt, "cpu")
    assert (got.precision, got.run) == ("bf16-mixed", "bf16-mixed")
    assert "checkpoint" in got.source
    assert got.info() == {"used": "bf16-mixed", "source": got.source, "run": "bf16-mixed"}
    forced = checkpoint_precision(_checkpoint("bf16-mixed"), ckpt, "cpu", "32-true")
    assert (forced.precision, forced.run, forced.source) == (
        "32-true",
        "bf16-mixed",
        "precision=32-true",
    )


def test_older_checkpoints_fall_back_to_run_json_then_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: False)
    old = _checkpoint(configured="mixed")
    got = checkpoint_precision(old, ckpt, "cpu")  # no run.json: the config, resolved here
    assert got.precision == "32-true" and "trainer.precision=mixed resolved" in got.source
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: True)
    assert checkpoint_precision(old, ckpt, "cpu").precision == "bf16-mixed"
    (run / "run.json").write_text(json.dumps({"precision": "32-true"}))
    got = checkpoint_precision(old, ckpt, "cpu")
    assert got.precision == "32-true" and str(run / "run.json") in got.source
    assert checkpoint_precision(_checkpoint(), tmp_path / "x.ckpt", "cpu").run is None


def test_emulated_bf16_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "best.ckpt"
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: False)
    got = checkpoint_precision(_checkpoint("bf16-mixed"), ckpt, "cpu")
    assert got.precision == "bf16-mixed" and "bf16 is emulated" in got.source
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: True)
    assert "emulated" not in checkpoint_precision(_checkpoint("bf16-mixed"), ckpt, "cpu").source


def test_fp16_on_the_cpu_and_unknown_precisions(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    got = checkpoint_precision(_checkpoint("16-mixed"), ckpt, "cpu")
    assert got.precision == "32-true" and got.run == "16-mixed" and "no CPU" in got.source
    assert checkpoint_precision(_checkpoint("16"), ckpt, "cpu").run == "16-mixed"  # old alias
    with pytest.raises(ConfigError, match=r"precision='fp8' is not a precision"):
        checkpoint_precision(_checkpoint("32-true"), ckpt, "cpu", "fp8")


def test_plugin_runs_a_module_as_the_trainer_does() -> None:
    plugin = precision_plugin("bf16-mixed", "cpu")
    assert isinstance(plugin, MixedPrecision)
    layer = torch.nn.Linear(4, 4)
    with plugin.forward_context():
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with precision_plugin("32-true", "cpu").forward_context():
        assert layer(torch.ones(1, 4)).dtype == torch.float32
