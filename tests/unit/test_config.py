"""Hydra composition of conf/ and the objects each group builds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from tests.conftest import CONF_DIR, compose_config, run_cli
from tlunet.builders import resolve_precision
from tlunet.errors import ConfigError


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_are_the_paper_recipe() -> None:
    cfg = compose_config()
    assert cfg.encoder.name == "densenet121" and cfg.encoder.weights == "imagenet"
    assert cfg.model.name == "unet"
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 1e-4
    assert cfg.scheduler._target_.endswith("ReduceLROnPlateau")
    assert cfg.data.batch_size == 32 and cfg.data.image_size == 256
    assert cfg.data.split == "patient" and cfg.data.root is None
    assert cfg.module.threshold == 0.5
    assert cfg.trainer.precision == "32-true" and cfg.trainer.accelerator == "cpu"
    assert cfg.callbacks.early_stopping.monitor == cfg.monitor.metric == "val/dice_per_patient"


def test_one_instantiate_builds_the_module() -> None:
    """conf/train.yaml's module node holds everything: network (with the aux head when asked),
    loss, optimiser and scheduler partials, and the model group's options."""
    from tlunet.models.aux_head import SegmentationWithAux

    cfg = compose_config(
        [
            "encoder=resnet18",
            "encoder.weights=null",
            "model.aux_head=true",
            "model.aux_hidden=32",
            "model.aux_loss_weight=0.3",
            "model.channels_last=false",
            "data.split=paper",
            "optimizer.lr=0.01",
            "scheduler=null",
        ]
    )
    module = instantiate(cfg.module)
    assert isinstance(module.net, SegmentationWithAux) and module.has_aux
    assert module.net.aux_head.fc1.out_features == 32 and module.aux_loss_weight == 0.3
    assert not module.channels_last and module.per_patient is False
    assert module.monitor == "val/dice"  # the paper split's default monitor
    optimizer = module.configure_optimizers()  # no scheduler: the optimizer alone
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.01
    plain = instantiate(compose_config(["encoder=resnet18", "encoder.weights=null"]).module)
    assert not plain.has_aux and plain.per_patient is True and plain.detect_source == "mask"


@pytest.mark.parametrize("option", _options("encoder"))
def test_encoder_options_compose(option: str) -> None:
    cfg = compose_config([f"encoder={option}"])
    assert cfg.model.net.encoder_name == cfg.encoder.name
    assert cfg.model.net.encoder_weights == "imagenet"


@pytest.mark.parametrize("option", _options("loss"))
def test_loss_options_build_and_compute(option: str) -> None:
    cfg = compose_config([f"loss={option}"])
    loss = instantiate(cfg.loss)
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1
    good = loss(torch.where(target > 0, 8.0, -8.0), target)
    bad = loss(torch.where(target > 0, -8.0, 8.0), target)
    assert torch.isfinite(good) and good < bad


def test_experiment_demo_uses_synthetic_data_from_scratch() -> None:
    cfg = compose_config(["experiment=demo"])
    assert cfg.data.synthetic is not None and cfg.data.root
    assert cfg.encoder.name == "resnet18" and cfg.encoder.weights is None
    # a test stage that means something: 15 % of 40 patients, tumour-free ones among them
    assert cfg.data.synthetic.num_patients >= 40 and cfg.data.synthetic.tumour_free_patients > 0
    assert cfg.data.image_size == cfg.data.synthetic.image_size  # scored at the trained size


def test_gpu_trainer_asks_for_mixed_precision() -> None:
    cfg = compose_config(["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "mixed"
    assert cfg.trainer.benchmark is True


def test_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import tlunet.builders

    assert resolve_precision("32-true", "cpu") == "32-true"
    # "mixed" on the CPU: bf16 autocast only with bf16 instructions (AMX, AVX512-BF16), else fp32.
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("mixed", "cpu") == "bf16-mixed"
    monkeypatch.setattr(tlunet.builders, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("mixed", "cpu") == "32-true"
    assert compose_config(["trainer=cpu"]).trainer.precision == "mixed"
    if torch.cuda.is_available():
        expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        assert resolve_precision("mixed", "gpu") == expected
    else:
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_precision("mixed", "gpu")


def test_datamodule_config_instantiates() -> None:
    cfg = compose_config(["data.root=/somewhere", "data.image_size=64"])
    dm = instantiate(cfg.data)
    assert dm.root == "/somewhere" and dm.image_size == 64
    assert [type(t).__name__ for t in dm.augment] == [
        "HorizontalFlip",
        "Affine",
        "RandomBrightnessContrast",
    ]


def test_misspelled_key_is_rejected() -> None:
    with pytest.raises(ConfigCompositionException, match="rot"):
        compose_config(["data.rot=/x"])


def test_unknown_group_option_is_rejected() -> None:
    with pytest.raises(ConfigCompositionException, match="encoder/densnet"):
        compose_config(["encoder=densnet"])


def test_config_hash_ignores_seed_fold_and_run_directory() -> None:
    from omegaconf import OmegaConf

    from tlunet.run import config_hash

    def composed(*extra: str) -> str:
        cfg = compose_config(["data.root=/d", "data.num_folds=3", *extra])
        OmegaConf.set_struct(cfg, False)
        cfg.paths.output_dir = f"/runs/{hash(extra)}"  # the Hydra run directory
        cfg.trainer.default_root_dir = cfg.paths.output_dir
        return config_hash(cfg)

    base = composed()
    assert composed("seed=7", "data.fold=2") == base
    assert composed("optimizer.lr=0.001") != base
    assert composed("encoder=vgg16") != base


def test_environment_says_whether_the_tree_differs_from_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run from an edited (or copied) tree records git_dirty: its git_commit alone would name
    code that did not run."""
    import subprocess

    import tlunet
    from tlunet import utils

    repo = tmp_path / "repo"
    package = repo / "tlunet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "x"], check=True)
    monkeypatch.setattr(tlunet, "__file__", str(package / "__init__.py"))
    assert utils.git_dirty() is False and utils.git_commit()
    (package / "__init__.py").write_text("x = 2\n")
    info = utils.environment_info()
    assert info["git_dirty"] is True and info["git_commit"] == utils.git_commit()


@pytest.mark.parametrize("mistake", ["encoderr=densenet121", "encoder=densenet12", "data.rot=/d"])
def test_a_config_mistake_is_reported_before_torch_loads(mistake: str, tmp_path: Path) -> None:
    """A mistyped key, group option or override ends tlunet.train in the time Hydra takes to
    compose the config (0.2-0.5 s here; 8-10 s when torch and Lightning loaded first): with
    torch and Lightning made unimportable, the command still names the mistake."""
    fake = tmp_path / "unimportable"
    for name in ("torch", "pytorch_lightning", "lightning"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
    path = os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH", "")) if p)
    out = run_cli(["tlunet.train", mistake], cwd=tmp_path, env={"PYTHONPATH": path})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "was imported" not in out.stderr, out.stderr[-2000:]
    assert mistake.split("=")[0 if "." in mistake or "rr" in mistake else 1] in out.stderr, (
        out.stderr
    )
