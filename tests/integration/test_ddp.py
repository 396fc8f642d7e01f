"""trainer=ddp: the config, and a 2-process CPU (gloo) run whose test metrics equal a 1-process
evaluation of the same checkpoint on the same data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pytorch_lightning.strategies import DDPStrategy

from tests.conftest import TINY_RUN, compose_config, run_cli
from tlunet.builders import build_trainer, resolve_precision
from tlunet.data.index import index_kaggle3m
from tlunet.data.splits import split_by_patient
from tlunet.metrics import METRIC_KEYS

#: Three training patients, one validation, two testing (of the six synthetic ones).
FRACTIONS = (0.5, 0.167, 0.333)
#: On the CPU: two gloo processes (torch's SyncBatchNorm needs CUDA: off on the CPU).
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
CPU_DDP_RUN = [*CPU_DDP, "trainer.precision=32-true"]


def test_ddp_trainer_config(tmp_path: Path) -> None:
    cfg = compose_config(["trainer=ddp"])
    assert cfg.trainer.strategy._target_ == "pytorch_lightning.strategies.DDPStrategy"
    assert cfg.trainer.strategy.find_unused_parameters is False
    assert cfg.trainer.sync_batchnorm is True
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "mixed"
    assert cfg.trainer.devices == -1 and cfg.trainer.num_nodes == 1
    # bf16 only with bf16 instructions (AMX, AVX512-BF16)
    assert resolve_precision("mixed", "cpu") in ("32-true", "bf16-mixed")

    cfg = compose_config([*CPU_DDP, f"paths.output_dir={tmp_path}"])
    trainer = build_trainer(cfg, callbacks=[], loggers=[])  # no process starts before fit
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert trainer.precision == resolve_precision("mixed", "cpu")  # "mixed" on the CPU
    assert trainer.strategy._layer_sync is None  # SyncBatchNorm needs CUDA: off on the CPU


def _data_with_odd_test_split(synthetic_root: Path, dest: Path) -> tuple[Path, int]:
    """A copy of the synthetic set whose test stage (under FRACTIONS) has an odd number of
    slices, so that two processes need DistributedSampler's padding; and that number."""
    shutil.copytree(synthetic_root, dest)
    records = index_kaggle3m(dest)
    test = split_by_patient([r.patient for r in records], FRACTIONS)["test"]
    assert len(test) == 2
    slices = [r for r in records if r.patient in test]
    if len(slices) % 2 == 0:  # drop the last slice of a test patient
        last = slices[-1]
        last.image_path.unlink()
        last.mask_path.unlink()
        slices = slices[:-1]
    return dest, len(slices)


@pytest.mark.slow
def test_two_process_run_equals_one_process_evaluation(
    synthetic_root: Path, tmp_path: Path
) -> None:
    data, num_test_slices = _data_with_odd_test_split(synthetic_root, tmp_path / "kaggle_3m")
    run_dir = tmp_path / "run"
    out = run_cli(
        [
            "tlunet.train",
            # With the progress bar (rank 0 only), as users run it.
            *[o for o in TINY_RUN if o != "callbacks.progress_bar=null"],
            *CPU_DDP_RUN,
            "trainer.limit_test_batches=1.0",  # the whole test stage
            "data.split_fractions=[" + ",".join(map(str, FRACTIONS)) + "]",
            f"data.root={data}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "MEMBER: 2/2" in log  # Lightning did start a second process
    run = json.loads((run_dir / "metrics.json").read_text())

    eval_dir = tmp_path / "eval"
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={eval_dir}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    single = json.loads((eval_dir / "metrics.json").read_text())

    # No padding duplicate counted: every test slice exactly once, on 2 processes as on 1.
    assert run["test/num_slices"] == single["test/num_slices"] == num_test_slices
    assert num_test_slices % 2 == 1
    assert run["test/num_patients"] == single["test/num_patients"] == 2
    for key in METRIC_KEYS:
        name = f"test/{key}"
        assert run[name] == pytest.approx(single[name], abs=1e-6, nan_ok=True), name
    # The loss is averaged over every process's slices, padding repeats included: close only.
    assert run["test/loss"] == pytest.approx(single["test/loss"], rel=0.2)
