"""Experiment tracking: MLflow, TensorBoard's HPARAMS and figures, W&B offline."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from tests.conftest import train_tiny
from tlunet.errors import ConfigError
from tlunet.tracking import flat_params, mlflow_logger, wandb_logger


def test_config_is_flattened_to_dotted_params() -> None:
    params = flat_params({"model": {"net": {"arch": "unet", "channels": [8, 16]}}, "seed": 3})
    assert params == {"model.net.arch": "unet", "model.net.channels": "[8, 16]", "seed": 3}
    assert len(flat_params({"long": "x" * 10_000})["long"]) == 6000  # MLflow's limit


@pytest.mark.parametrize(
    ("factory", "module"), [(mlflow_logger, "mlflow"), (wandb_logger, "wandb")]
)
def test_missing_tracker_names_the_install(factory, module, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    kwargs = {"log_dir": str(tmp_path)} if module == "mlflow" else {}
    with pytest.raises(
        ConfigError, match=rf"logger={module} needs .*pip install 'tlunet\[tracking\]'"
    ):
        factory(run_dir=str(tmp_path / "run"), **kwargs)


@pytest.mark.slow
def test_mlflow_and_tensorboard_receive_params_metrics_figures_artifacts(
    synthetic_root_128: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    work = tmp_path / "work"
    run_dir = train_tiny(synthetic_root_128, work, "logger=[default,mlflow]")
    metrics = json.loads((run_dir / "metrics.json").read_text())

    # MLflow: the local store under <cwd>/outputs/mlruns, read back with its client.
    client = MlflowClient(f"sqlite:///{work / 'outputs' / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tlunet").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["model.net.encoder_name"] == "resnet18"
    assert run.data.params["data.image_size"] == "64"
    assert run.data.metrics["test/dice_per_patient"] == pytest.approx(
        metrics["test/dice_per_patient"], abs=1e-6
    )
    assert "val/dice_per_patient" in run.data.metrics  # the training curves too
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "run.json", "config.yaml", "figures", "checkpoints"} <= top
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/curves.png", "figures/predictions.png"} <= figures
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.ckpt"
    ]

    # TensorBoard: the config in the HPARAMS tab, hp_metric = test per-patient Dice, figures.
    # Every event file of the folder (the figures come after the test's writer was closed).
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.net.encoder_name"].string_value == "resnet18"
    assert acc.Scalars("hp_metric")[-1].value == pytest.approx(
        metrics["test/dice_per_patient"], abs=1e-6
    )
    assert {"figures/curves", "figures/predictions"} <= set(acc.Tags()["images"])


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-*.wandb``): LevelDB's log format (32 KiB
    blocks, 7-byte chunk headers) after W&B's 7-byte file header, protobuf records inside."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, partial = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk  # full/first, middle/last
        if kind in (1, 4):
            chunks.append(partial)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


@pytest.mark.slow
def test_wandb_runs_offline_without_a_login(
    synthetic_root_128: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    run_dir = train_tiny(synthetic_root_128, tmp_path / "work", "logger=wandb")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline: nothing was sent
    (run_file,) = offline.glob("run-*.wandb")
    records = _wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # the run was finished, its files complete
    config = {
        i.key: json.loads(i.value_json)
        for r in records
        if r.HasField("config")
        for i in r.config.update
    }
    assert config["model.net.encoder_name"] == "resnet18" and config["data.image_size"] == 64
    history = {}  # key (an image's keys are nested: ("figures/curves", "_type")) -> value
    for r in records:
        if r.HasField("history"):
            for item in r.history.item:
                history[item.key or item.nested_key[0]] = item.value_json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads(history["test/dice_per_patient"]) == pytest.approx(
        metrics["test/dice_per_patient"], abs=1e-6
    )
    assert {"figures/curves", "figures/predictions"} <= set(history)
