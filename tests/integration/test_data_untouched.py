"""No command writes into a data folder (issue 21, item 1).

``data=synthetic`` writes its phantoms only under tlunet's cache. A ``data.root`` elsewhere is
read as it is when it holds exactly the phantoms asked for, and refused in one line otherwise;
``tlunet.evaluate`` of a checkpoint trained on phantoms evaluates a ``data.root`` given on its
command line as real data. Either way the folder is byte for byte what it was.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import TINY, TINY_RUN, compose_config, run_cli, tree_snapshot
from tlunet.data.synthetic import MARKER_NAME, phantom_folder_name
from tlunet.errors import ConfigError
from tlunet.evaluate import synthetic_data

REFUSAL = "tlunet error: data=synthetic writes its phantoms only into tlunet's cache"


def real_looking_root(phantoms: Path, dest: Path) -> Path:
    """A kaggle_3m-like folder of TCGA-named patients (the phantoms' slices renamed), with the
    files the Kaggle set keeps beside them and a hidden file."""
    dest.mkdir(parents=True)
    for i, folder in enumerate(sorted(p for p in phantoms.iterdir() if p.is_dir())):
        name = f"TCGA_CS_{4941 + i}_19960909"
        (dest / name).mkdir()
        for tif in folder.glob("*.tif"):
            shutil.copy2(tif, dest / name / tif.name.replace(folder.name, name))
    (dest / "data.csv").write_text("Patient,death01\nTCGA_CS_4941,1\n")
    (dest / "README.md").write_text("# LGG Segmentation Dataset\n")
    (dest / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return dest


def _synthetic(**settings) -> list[str]:
    return ["data=synthetic", *(f"data.synthetic.{k}={v}" for k, v in settings.items())]


def test_evaluate_reads_synthetic_checkpoints_as_it_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = {"root": "/train/machine/cache/synthetic/p6_s64_seed1", "synthetic": {**TINY}}
    data = OmegaConf.create({**stored, "root": "/my/kaggle_3m"})
    with caplog.at_level("WARNING", logger="tlunet.evaluate"):
        synthetic_data(data, True, str(tmp_path / "cache"))
    assert data.synthetic is None and data.root == "/my/kaggle_3m"  # read as real data
    assert "data.root=/my/kaggle_3m is evaluated as real data" in caplog.text
    data = OmegaConf.create(stored)
    synthetic_data(data, False, str(tmp_path / "cache"))  # this machine's cache
    assert data.root == str(tmp_path / "cache" / "synthetic" / phantom_folder_name(TINY))
    assert data.synthetic_cache == str(tmp_path / "cache" / "synthetic")
    real = OmegaConf.create({"root": "/my/kaggle_3m", "synthetic": None})
    synthetic_data(real, False, str(tmp_path / "cache"))
    assert real == OmegaConf.create({"root": "/my/kaggle_3m", "synthetic": None})


def test_a_checkpoint_whose_phantom_settings_lack_keys_is_read_or_one_line(
    tmp_path: Path,
) -> None:
    """Item 5 (second round): a hand-made checkpoint's data.synthetic without every setting
    names the phantoms data=synthetic writes for it (the generator's defaults); one with a key
    that is no setting is one line, not a traceback."""
    cache = tmp_path / "cache"
    data = OmegaConf.create({"root": "/train/cache/synthetic/x", "synthetic": {"seed": 1}})
    synthetic_data(data, False, str(cache))
    assert data.root == str(cache / "synthetic" / phantom_folder_name({"seed": 1}))
    data = OmegaConf.create({"root": "/x", "synthetic": {"seed": 1, "size": 64}})
    with pytest.raises(ConfigError, match=r"^data\.synthetic holds size, not a setting") as info:
        synthetic_data(data, False, str(cache))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_evaluating_a_checkpoint_with_impossible_phantom_settings_is_one_line(
    tiny_run: Path, tmp_path: Path
) -> None:
    import torch

    checkpoint = torch.load(
        tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True
    )
    checkpoint["hyper_parameters"]["config"]["data"]["synthetic"] = {"seed": 1, "size": 64}
    ckpt = tmp_path / "hand-made.ckpt"
    torch.save(checkpoint, ckpt)
    out = run_cli(
        ["tlunet.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'evaluation'}"],
        cwd=tmp_path,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("tlunet error")]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and f"The checkpoint '{ckpt}'" in errors[0]
    assert "data.synthetic holds size, not a setting" in errors[0]


@pytest.fixture()
def data_roots(synthetic_root: Path, tmp_path: Path) -> dict[str, Path]:
    """A real-looking folder and a folder of phantoms (a copy of ``synthetic_root``)."""
    phantoms = tmp_path / "phantoms" / "kaggle_3m"
    shutil.copytree(synthetic_root, phantoms)
    real = real_looking_root(synthetic_root, tmp_path / "real" / "kaggle_3m")
    return {"real": real, "phantoms": phantoms}


@pytest.mark.parametrize("root_kind", ["real", "phantoms"])
@pytest.mark.parametrize("overrides", [["data=synthetic"], ["experiment=demo"]])
def test_train_configs_with_phantoms_refuse_another_folder(
    data_roots: dict[str, Path], root_kind: str, overrides: list[str], tmp_path: Path
) -> None:
    """``train data=synthetic data.root=<it>`` and ``train experiment=demo data.root=<it>``,
    composed as the command composes them, up to where the data is prepared: refused in one
    line naming the folder, which is unchanged."""
    root = data_roots[root_kind]
    before = tree_snapshot(root)
    cfg = compose_config([*overrides, f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError) as info:
        instantiate(cfg.data).prepare_data()
    assert f"tlunet error: {info.value}".startswith(REFUSAL)
    assert f"data.root '{root}'" in str(info.value) and "\n" not in str(info.value)
    assert tree_snapshot(root) == before
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_no_command_writes_into_a_real_or_a_phantom_folder(
    data_roots: dict[str, Path], tmp_path: Path
) -> None:
    """End to end: training on a folder of exactly the phantoms asked for reads it as it is; the
    evaluation of that synthetic checkpoint with data.root=<a real-looking folder, the phantom
    folder> evaluates the folder as real data and says so; train experiment=demo
    data.root=<real> is refused in one line. Every file's bytes and the listing (hidden files
    included) are unchanged after each command."""
    real, phantoms = data_roots["real"], data_roots["phantoms"]
    before = {name: tree_snapshot(root) for name, root in data_roots.items()}

    run_dir = tmp_path / "run"
    out = run_cli(
        [
            "tlunet.train",
            *TINY_RUN,
            *_synthetic(**{**TINY, "slices_per_patient": "[6,9]"}),
            f"data.root={phantoms}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert tree_snapshot(phantoms) == before["phantoms"]
    assert not list((tmp_path / ".tlunet-cache").glob(f"synthetic/*/{MARKER_NAME}"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    out = run_cli(
        [
            "tlunet.train",
            "experiment=demo",
            *TINY_RUN,  # were it not refused: one tiny epoch
            f"data.root={real}",
            f"hydra.run.dir={tmp_path}/x",
        ],
        cwd=tmp_path,
    )
    errors = [line for line in out.stderr.splitlines() if "tlunet error" in line]
    assert out.returncode == 1 and len(errors) == 1 and errors[0].startswith(REFUSAL)
    assert f"data.root '{real}'" in errors[0] and "Traceback" not in out.stderr
    assert tree_snapshot(real) == before["real"]

    for name, root in data_roots.items():
        evaluation = tmp_path / "evaluations" / name
        out = run_cli(
            [
                "tlunet.evaluate",
                f"ckpt_path={ckpt}",
                f"data.root={root}",
                "stage=all",
                "eval.allow_seen_patients=true",
                f"hydra.run.dir={evaluation}",
            ],
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        said = out.stdout + out.stderr
        assert re.search(rf"data\.root={re.escape(str(root))} is evaluated as real data", said)
        assert (evaluation / "metrics.json").is_file()
        assert tree_snapshot(root) == before[name], name
