"""Performance options give the same results, and the benchmark command measures what it says."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from benchmarks.bench import FULL_SET_SLICES, evaluate_targets, load_targets
from tests.conftest import cli_env, compose_config, run_cli
from tlunet.builders import build_module
from tlunet.data.index import index_kaggle3m
from tlunet.data.synthetic import plan_patients, seed_for_total_slices
from tlunet.losses import WeightedSum
from tlunet.models import build_model
from tlunet.module import SegmentationModule


def _module(**kwargs) -> SegmentationModule:
    torch.manual_seed(0)
    net = build_model(
        "unet",
        "resnet18",
        encoder_weights=None,
        decoder_channels=[32, 16, 8, 8, 8],
        aux_head=True,
        aux_hidden=8,
    )
    return SegmentationModule(
        net,
        WeightedSum({"bce": torch.nn.BCEWithLogitsLoss()}),
        partial(torch.optim.Adam, lr=1e-3),
        **kwargs,
    )


def _two_steps(module: SegmentationModule) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The losses of two optimiser steps, and the gradients of the first."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    batch = {"image": images, "mask": (images[:, :1] > 1).float()}
    optimizer = module.configure_optimizers()
    module.train()
    losses, grads = [], {}
    for _ in range(2):
        optimizer.zero_grad()
        loss, _, terms, _ = module.compute_loss(batch)
        assert "loss_aux" in terms  # the aux head still sees the encoder
        loss.backward()
        grads = grads or {n: p.grad.clone() for n, p in module.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return losses, grads


def test_channels_last_trains_like_the_default_layout() -> None:
    plain_losses, plain_grads = _two_steps(_module())
    module = _module(channels_last=True)
    conv = module.net.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    losses, grads = _two_steps(module)
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    assert grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-3, atol=1e-5)


@pytest.mark.slow  # torch.compile's first call: 7 s
def test_compiled_network_keeps_its_parameter_names_and_results() -> None:
    plain = _module()
    plain_losses, _ = _two_steps(plain)
    # The eager backend traces with TorchDynamo without generating code: fast and compiler-free.
    compiled = _module(compile={"backend": "eager"})
    assert compiled.net._compiled_call_impl is not None  # it really is compiled
    losses, _ = _two_steps(compiled)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    assert losses == pytest.approx(plain_losses, rel=1e-5)


def test_model_options_reach_the_module(tmp_path: Path) -> None:
    base = ["encoder=resnet18", "encoder.weights=null", f"paths.output_dir={tmp_path}"]
    cfg = compose_config(base)  # channels-last by default
    module = build_module(cfg)
    assert module.channels_last
    assert module.net.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert cfg.model.compile is False
    cfg = compose_config([*base, "model.channels_last=false"])
    module = build_module(cfg)
    assert not module.channels_last and module.net.encoder.conv1.weight.is_contiguous()


def test_synthetic_set_of_an_exact_size() -> None:
    seed = seed_for_total_slices(110, (20, 52), FULL_SET_SLICES)
    assert int(plan_patients(110, (20, 52), 0.2, seed)[1].sum()) == FULL_SET_SLICES
    with pytest.raises(ValueError, match="No seed below 10"):
        seed_for_total_slices(3, (3, 4), 100, max_seed=10)


def test_targets_are_judged_from_the_figures() -> None:
    results = {
        "real_data": True,
        "train_pairs": [
            {"encoder": "resnet18", "image_size": 128, "batch_size": 16, "ratio": 0.93},
            {"encoder": "resnet18", "image_size": 64, "batch_size": 16, "ratio": 0.5},
        ],
        "data": [{"pipeline": "tlunet", "workers": 2, "image_size": 128, "samples_per_s": 100}],
        "train": [
            {"loop": "lightning", "image_size": 128, "images_per_s": 30.0},
            {"loop": "lightning", "image_size": 128, "images_per_s": 40.0},
            {"loop": "bare", "image_size": 128, "images_per_s": 90.0},
        ],
        "start": [{"start": "warm", "slices": FULL_SET_SLICES, "total_s": 0.4}],
        "inference": [{"command": "tlunet.evaluate stage=all", "seconds": 61.0}],
    }
    met = {t["target"].split(" ")[0]: t["met"] for t in evaluate_targets(results)}
    assert len(evaluate_targets(results)) == 4  # the 64 px pair is not a target
    assert met == {"Lightning": False, "data,": False, "warm": True, "evaluation": False}
    results["data"][0]["samples_per_s"] = 120  # 3 x the fastest (40), not the first (30)
    assert any(t["met"] for t in evaluate_targets(results) if t["target"].startswith("data"))


@pytest.mark.slow
def test_evaluate_every_slice(tiny_run: Path, tmp_path: Path, synthetic_root_128: Path) -> None:
    out = run_cli(
        [
            "tlunet.evaluate",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            "stage=all",
            "eval.allow_seen_patients=true",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "eval" / "per_slice.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(index_kaggle3m(synthetic_root_128))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["all/dice_per_patient"] <= 1


@pytest.mark.slow
def test_bench_command_end_to_end(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, root)
    out_dir = tmp_path / "bench"
    args = [
        f"--data-root={root}",
        f"--out={out_dir}",
        "--image-size=64",
        "--small-size=0",
        "--precisions=bf16-mixed",  # one precision: each case is two processes (bare, Lightning)
        "--batch-size=4",
        "--encoders=resnet18",
        "--workers=2",  # the worker processes' memory is measured too
        "--batches=4",
        "--warmup=1",
        "--steps=2",
        "--repeats=1",
        "--full-size=60",
        "--predict-patients=1",
    ]
    # The console script, from outside the clone: it finds benchmarks/ beside the editable install.
    script = Path(sys.executable).with_name("tlunet-bench")
    result = subprocess.run(
        [str(script), *args],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bench = json.loads((out_dir / "bench.json").read_text())
    assert bench["machine"]["cpu_count"] >= 1 and bench["machine"]["torch"] == torch.__version__
    data = {(r["pipeline"], r["workers"]): r for r in bench["data"]}
    assert set(data) == {("tlunet", 2), ("naive PIL", 2)}
    assert all(r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in data.values())
    assert data[("tlunet", 2)]["workers_peak_rss_mb"] > 0  # the workers' memory is measured
    starts = {(r["slices"], r["start"]) for r in bench["start"]}
    slices = len(index_kaggle3m(root))
    assert starts == {(slices, "cold"), (slices, "warm"), (60, "cold"), (60, "warm")}
    assert [(r["loop"], r["precision"]) for r in bench["train"]] == [
        ("bare", "bf16-mixed"),
        ("lightning", "bf16-mixed"),
    ]
    flags = bench["machine"]["cpu_bf16_flags"]  # which bf16 instructions the CPU has
    assert isinstance(flags, list) and set(flags) <= {"amx_bf16", "avx512_bf16"}
    assert all(p["ratio"] > 0 for p in bench["train_pairs"])
    evaluate, predict = bench["inference"]
    assert evaluate["slices"] == slices and evaluate["slices_per_s"] > 0
    first_patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    assert predict["slices"] == len(list(first_patient.glob("*_mask.tif")))
    assert {t["target"].split(" ")[0] for t in bench["targets"]} >= {"data,", "evaluation"}
    text = (out_dir / "bench.md").read_text()
    assert "Lightning / bare ratio" in text and "python -m benchmarks.bench" in text
    # Only the figures stay: the runs made to measure are removed.
    assert sorted(p.name for p in out_dir.iterdir()) == ["bench.json", "bench.md"]


def test_targets_come_from_the_data_file() -> None:
    targets = load_targets()
    assert targets["lightning_vs_bare"]["min_ratio"] == 0.95
    results = {"train_pairs": [{"batch_size": 16, "image_size": 128, "encoder": "x", "ratio": 0.9}]}
    assert [t["met"] for t in evaluate_targets(results, targets)] == [False]
    looser = {**targets, "lightning_vs_bare": {**targets["lightning_vs_bare"], "min_ratio": 0.8}}
    (row,) = evaluate_targets(results, looser)
    assert row["met"] and "0.8x" in row["target"]


def test_bench_outside_a_source_checkout_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import tlunet
    from tlunet.cli import bench

    fake = tmp_path / "site-packages" / "tlunet"
    fake.mkdir(parents=True)
    monkeypatch.setattr(tlunet, "__file__", str(fake / "__init__.py"))  # as from a wheel
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench()
    assert exc.value.code == 1
    assert "benchmarks/bench.py" in capsys.readouterr().err
