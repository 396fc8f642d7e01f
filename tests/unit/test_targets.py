"""The allow-list of ``_target_``s a stored config may make tlunet build (tlunet.targets)."""

from __future__ import annotations

import copy
import glob
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR
from tlunet.errors import ConfigError
from tlunet.targets import (
    ENV_VAR,
    UntrustedTarget,
    check_checkpoint,
    check_stored_config,
    check_targets,
    check_write_paths,
    is_trusted,
)


def payloads(marker: Path) -> dict[str, dict]:
    """Config nodes that create ``marker`` when instantiated (the issue's five)."""
    return {
        "builtins.open": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "write_text_atomic": {
            "_target_": "tlunet.utils.write_text_atomic",
            "path": str(marker),
            "text": "attacker text",
        },
        "os.system": {"_target_": "os.system", "_args_": [f"touch '{marker}'"]},
        "subprocess.run": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
        "importlib.import_module": {
            "_target_": "importlib.import_module",
            "name": "tlunet_test_payload",
        },
    }


def evil_module(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module ``tlunet_test_payload`` on sys.path that creates ``marker`` when imported."""
    (tmp_path / "tlunet_test_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def stored_config(node: dict, where: str = "weight_decay") -> dict:
    """A run config as a checkpoint stores it, with ``node`` in an unused optimiser key."""
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4, where: node}
    return {
        "module": {
            "_target_": "tlunet.module.SegmentationModule",
            "net": {"_target_": "tlunet.models.build_model", "arch": "unet"},
            "loss": {"_target_": "segmentation_models_pytorch.losses.DiceLoss", "mode": "binary"},
            "optimizer": optimizer,
        },
        "data": {
            "_target_": "tlunet.data.datamodule.LGGDataModule",
            "augment": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}],
        },
    }


@pytest.mark.parametrize(
    "name", ["builtins.open", "write_text_atomic", "os.system", "subprocess.run", "importlib."]
)
def test_each_payload_is_refused_naming_file_key_and_target(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    evil_module(tmp_path, marker, monkeypatch)
    node = next(v for k, v in payloads(marker).items() if k.startswith(name))
    with pytest.raises(UntrustedTarget) as raised:
        check_targets(stored_config(node), "some/best.ckpt")
    message = str(raised.value)
    assert "'some/best.ckpt'" in message
    assert "module.optimizer.weight_decay" in message and node["_target_"] in message
    assert "\n" not in message
    assert not marker.exists()


def test_nodes_in_args_and_partials_are_checked(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    inside_args = {"_target_": "torch.nn.Sequential", "_args_": [payloads(marker)["os.system"]]}
    with pytest.raises(UntrustedTarget, match=r"module\.optimizer\.betas\._args_\[0\]"):
        check_targets(stored_config(inside_args, "betas"), "x.ckpt")
    partial = {**payloads(marker)["subprocess.run"], "_partial_": True}
    with pytest.raises(UntrustedTarget, match="subprocess.run"):
        check_targets(stored_config(partial), "x.ckpt")
    in_a_list = {"data": {"augment": [{"_target_": "albumentations.HorizontalFlip"}, partial]}}
    with pytest.raises(UntrustedTarget, match=r"data\.augment\[1\]"):
        check_targets(in_a_list, "x.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "name",
    [
        "albumentations.save",  # a trusted package's function that writes a file
        "torch.save",  # torch outside torch.nn / torch.optim
        "segmentation_models_pytorch.Unet.from_pretrained",  # a method, not a class
        "tlunet.utils.atomic_path",
        "tlunet.data.synthetic.write_synthetic_dataset",
        "tlunet.models.Nonexistent",
        "tlunet",
        # reached through a trusted package, defined outside it
        "torch.nn.modules.module.torch.fx.GraphModule",
        "torch.nn.modules.module.torch.jit.RecursiveScriptModule",
    ],
)
def test_only_classes_of_a_run_and_tlunets_builders_are_trusted(name: str) -> None:
    assert not is_trusted(name, "module")


def test_a_module_outside_the_trusted_packages_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    evil_module(tmp_path, marker, monkeypatch)
    with pytest.raises(UntrustedTarget, match="tlunet_test_payload.Net"):
        check_targets({"model": {"_target_": "tlunet_test_payload.Net"}}, "run/config.yaml")
    assert not marker.exists()


def test_a_user_trusts_their_own_targets_by_name_or_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = {"model": {"_target_": "mylab.nets.MyUNet"}, "loss": {"_target_": "mylab.losses.L"}}
    with pytest.raises(UntrustedTarget, match=rf"{ENV_VAR}=mylab\.nets\.MyUNet"):
        check_targets(config, "c.yaml")
    monkeypatch.setenv(ENV_VAR, "mylab.nets.MyUNet")
    with pytest.raises(UntrustedTarget, match="mylab.losses.L"):
        check_targets(config, "c.yaml")
    monkeypatch.setenv(ENV_VAR, "mylab.nets.MyUNet, mylab.losses.")
    check_targets(config, "c.yaml")
    assert not is_trusted("mylab.nets.MyUNetEvil", "model")
    assert not is_trusted("mylabx.losses.L", "loss")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["logger=[default,mlflow,wandb]", "trainer=ddp", "model=resunet"],
        ["experiment=demo", "model.aux_head=true"],
    ],
)
def test_configs_tlunet_writes_are_trusted(overrides: list[str]) -> None:
    check_targets(_compose(overrides), "config.yaml")  # every node, interpolations unresolved


@pytest.mark.slow
def test_every_group_option_and_experiment_is_trusted() -> None:
    groups = ("experiment", "encoder", "model", "loss", "logger", "trainer", "cluster")
    groups += ("hparams_search", "debug", "data", "table1", "callbacks")
    for group in groups:
        for path in sorted(glob.glob(str(CONF_DIR / group / "*.yaml"))):
            option = Path(path).stem
            override = f"logger=[default,{option}]" if group == "logger" else f"{group}={option}"
            check_targets(_compose([override]), override)


def test_an_installed_package_trusts_its_targets_through_entry_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib.metadata import EntryPoint

    import tlunet.targets as targets

    entry = EntryPoint(name="mylab", value="mylab.", group=targets.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        targets.metadata,
        "entry_points",
        lambda group: [entry] if group == targets.ENTRY_POINT_GROUP else [],
    )
    targets._entry_point_names.cache_clear()
    try:
        assert is_trusted("mylab.nets.MyUNet", "model") and not is_trusted("otherlab.Net", "model")
    finally:
        targets._entry_point_names.cache_clear()


def test_a_resolver_cannot_make_a_node_the_check_never_saw(tmp_path: Path) -> None:
    """``oc.create`` would build a node from a string at instantiate time: a stored config is
    resolved, so any interpolation in it is refused."""
    marker = tmp_path / "pwned"
    node = f"${{oc.create:'{{_target_: builtins.open, _args_: [{marker}, w]}}'}}"
    config = {"module": {"_target_": "torch.nn.Identity", "x": node}}
    check_targets(config, "c.yaml")  # the walk alone sees a string
    with pytest.raises(UntrustedTarget, match=r"interpolation at key module\.x"):
        check_stored_config(config, "c.yaml")
    with pytest.raises(UntrustedTarget, match="interpolation"):
        check_stored_config(OmegaConf.create(config), "c.yaml")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("place", "target"),
    [
        ("module", "tlunet.tracking.mlflow_logger"),  # a logger's builder, where a network goes
        ("module", "pytorch_lightning.callbacks.ModelCheckpoint"),
        ("data", "torch.nn.Identity"),
        ("logger", "tlunet.models.build_model"),
        ("paths", "torch.nn.Identity"),  # nothing is built under paths
    ],
)
def test_a_class_is_trusted_only_where_a_run_builds_its_kind(place: str, target: str) -> None:
    with pytest.raises(UntrustedTarget, match=rf"under '{place}'"):
        check_targets({place: {"x": {"_target_": target}}}, "c.yaml")


def test_a_checkpoint_builds_nothing_outside_its_run_config() -> None:
    config = stored_config({"_target_": "torch.nn.Identity"}, "betas")
    checkpoint = {"state_dict": {}, "hyper_parameters": {"config": config}}
    check_checkpoint(checkpoint, "a.ckpt")
    checkpoint["callbacks"] = {"x": {"_target_": "torch.nn.Identity"}}
    with pytest.raises(UntrustedTarget, match=r"callbacks\.x"):
        check_checkpoint(checkpoint, "a.ckpt")


def test_a_resumed_run_writes_only_into_its_folder_the_outputs_and_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path / "..")  # a relative path is taken from the working directory
    run, outputs, cache = tmp_path / "outputs/runs/r", tmp_path / "outputs", tmp_path / "cache"
    config = {
        "callbacks": {"model_checkpoint": {"dirpath": f"{run}/checkpoints"}},
        "logger": {
            "tensorboard": {"save_dir": str(run)},
            "mlflow": {"log_dir": str(outputs), "run_dir": str(run), "tracking_uri": None},
        },
        "trainer": {"default_root_dir": str(run)},
        "data": {"cache_dir": f"{cache}/slices", "synthetic_cache": None, "root": "/data/k"},
    }
    check_write_paths(config, "config.yaml", [run, outputs], cache)
    bad = [
        ("callbacks", "prediction_figure", "path", str(Path.home() / ".bashrc")),
        ("logger", "mlflow", "tracking_uri", f"sqlite:///{tmp_path}/elsewhere/lab.db"),
        ("trainer", None, "default_root_dir", "/etc"),
        ("data", None, "cache_dir", f"{tmp_path}/elsewhere"),
        ("callbacks", "model_checkpoint", "dirpath", "elsewhere/checkpoints"),
        ("data", None, "synthetic_cache", f"{tmp_path.name}/cache/../elsewhere"),
    ]
    for place, node, key, value in bad:
        tampered = copy.deepcopy(config)
        target = tampered[place] if node is None else tampered[place].setdefault(node, {})
        target[key] = value
        with pytest.raises(ConfigError, match="lies outside") as raised:
            check_write_paths(tampered, "config.yaml", [run, outputs], cache)
        assert key in str(raised.value) and "\n" not in str(raised.value)


def test_a_resumed_run_keeps_its_caches_under_this_commands_cache_folder(tmp_path: Path) -> None:
    """TLUNET_CACHE_DIR may differ when a run is resumed (a cluster job's scratch): the caches
    it kept under its paths.cache_dir, and a phantom data.root under its synthetic cache, move
    below the new folder; a cache kept elsewhere stays, for check_write_paths to judge."""
    from omegaconf import OmegaConf

    from tlunet.run import rebase_caches

    old, new = tmp_path / "old-cache", tmp_path / "new-cache"
    run_cfg = OmegaConf.create(
        {
            "paths": {"cache_dir": str(old)},
            "data": {
                "cache_dir": f"{old}/slices",
                "synthetic_cache": f"{old}/synthetic",
                "root": f"{old}/synthetic/SYN_12_abc",
            },
        }
    )
    rebase_caches(run_cfg, new)
    assert run_cfg.paths.cache_dir == str(new)
    assert run_cfg.data.cache_dir == f"{new}/slices"
    assert run_cfg.data.synthetic_cache == f"{new}/synthetic"
    assert run_cfg.data.root == f"{new}/synthetic/SYN_12_abc"
    check_write_paths(run_cfg, "config.yaml", [tmp_path / "run"], new)

    elsewhere = OmegaConf.create(
        {"paths": {"cache_dir": str(old)}, "data": {"cache_dir": "/scratch/x", "root": "/d/k"}}
    )
    rebase_caches(elsewhere, new)
    assert elsewhere.data.cache_dir == "/scratch/x" and elsewhere.data.root == "/d/k"
    with pytest.raises(ConfigError, match="data.cache_dir=/scratch/x, which lies outside"):
        check_write_paths(elsewhere, "config.yaml", [tmp_path / "run"], new)
