"""Tests for the synthetic kaggle_3m phantom generator (tlunet.data.synthetic)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import REPO, compose_config, tree_snapshot
from tlunet.data.datamodule import LGGDataModule
from tlunet.data.synthetic import (
    MARKER_NAME,
    PATIENT_NAME_RE,
    foreign_entries,
    holds_phantoms,
    make_phantom_volume,
    phantom_folder_name,
    write_synthetic_dataset,
)
from tlunet.data.synthetic import _main as synthetic_main
from tlunet.errors import ConfigError

SMALL = {"num_patients": 5, "slices_per_patient": (6, 10), "image_size": 64, "seed": 3}
IMAGE_RE = re.compile(r"^(?P<patient>SYN_P\d{3}_20000101)_(?P<n>[1-9]\d*)\.tif$")
MASK_RE = re.compile(r"^(?P<patient>SYN_P\d{3}_20000101)_(?P<n>[1-9]\d*)_mask\.tif$")


def _data_files(root: Path) -> list[Path]:
    """The generator's TIFF files (inside SYN_* patient folders only)."""
    return sorted(p for p in root.glob("SYN_P*/*.tif") if p.is_file())


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in _data_files(root)}


def _mtimes(root: Path) -> dict[str, int]:
    paths = [*_data_files(root), root / MARKER_NAME, root / "README.md"]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in paths}


def _load_patient(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    name = folder.name
    n = len(list(folder.glob(f"{name}_*_mask.tif")))
    images = np.stack([tifffile.imread(folder / f"{name}_{i}.tif") for i in range(1, n + 1)])
    masks = np.stack([tifffile.imread(folder / f"{name}_{i}_mask.tif") for i in range(1, n + 1)])
    return images, masks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "kaggle_3m"
    out = write_synthetic_dataset(root, **SMALL)
    assert out == root
    return root


def test_layout_dtypes_and_values(dataset: Path) -> None:
    patients = sorted(p for p in dataset.iterdir() if p.is_dir())
    assert [p.name for p in patients] == [f"SYN_P{i:03d}_20000101" for i in range(1, 6)]
    assert (dataset / "README.md").read_text().lower().count("synthetic") >= 1
    marker = json.loads((dataset / MARKER_NAME).read_text())
    assert marker["params"]["seed"] == SMALL["seed"]
    assert "format_version" in marker

    for folder in patients:
        assert PATIENT_NAME_RE.match(folder.name)
        names = sorted(p.name for p in folder.iterdir())
        images = [m for m in map(IMAGE_RE.match, names) if m]
        masks = [m for m in map(MASK_RE.match, names) if m]
        assert len(images) + len(masks) == len(names), names  # nothing else in the folder
        assert all(m["patient"] == folder.name for m in images + masks)
        numbers = sorted(int(m["n"]) for m in images)
        assert numbers == list(range(1, len(numbers) + 1))  # 1..n, contiguous
        assert sorted(int(m["n"]) for m in masks) == numbers
        assert 6 <= len(numbers) <= 10
        assert f"{folder.name}_1.tif" in names and f"{folder.name}_01.tif" not in names
        for n in numbers:
            img = tifffile.imread(folder / f"{folder.name}_{n}.tif")
            mask = tifffile.imread(folder / f"{folder.name}_{n}_mask.tif")
            assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
            assert mask.dtype == np.uint8 and mask.shape == (64, 64)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert img.max() > 50  # every slice shows some head
            corners = img[:4, :4].astype(int)
            assert corners.max() <= 5  # background ~0


def test_tumour_free_and_mixed_patients(dataset: Path) -> None:
    marker = json.loads((dataset / MARKER_NAME).read_text())
    free, mixed = [], []
    for folder in sorted(p for p in dataset.iterdir() if p.is_dir()):
        _, masks = _load_patient(folder)
        has = masks.reshape(len(masks), -1).max(axis=1) > 0
        if not has.any():
            free.append(folder.name)
            assert marker["lesion_slices"][folder.name] is None
            continue
        assert not has.all()
        mixed.append(folder.name)
        idx = np.flatnonzero(has)
        assert idx.max() - idx.min() + 1 == len(idx)  # contiguous run
        assert not has[0] and not has[-1]  # middle part of the volume
        assert marker["lesion_slices"][folder.name] == [idx.min() + 1, idx.max() + 1]
        area = (masks[has] > 0).reshape(len(idx), -1).mean(axis=1)
        assert area.min() >= 0.005
    assert free and mixed


def test_lesion_is_bright_in_flair(dataset: Path) -> None:
    checked = 0
    for folder in sorted(p for p in dataset.iterdir() if p.is_dir()):
        images, masks = _load_patient(folder)
        if not masks.any():
            continue
        flair = images[..., 1].astype(float)
        lesion = masks == 255
        brain = (flair > 20) & ~lesion
        assert flair[lesion].mean() > flair[brain].mean() + 40
        # the lesion changes the other channels only mildly
        for c in (0, 2):
            diff = abs(images[..., c][lesion].mean() - images[..., c][brain].mean())
            assert diff < 40
        checked += 1
    assert checked


def test_brain_grows_then_shrinks() -> None:
    vol = make_phantom_volume(np.random.default_rng(0), 15, 64, has_lesion=True)
    area = (vol.images[..., 1] > 20).reshape(15, -1).mean(axis=1)
    mid = area[5:10].mean()
    assert area[0] < mid and area[-1] < mid
    # FLAIR has the brightest tissue
    head = vol.images[..., 1] > 20
    means = [vol.images[..., c][head].mean() for c in range(3)]
    assert means[1] == max(means)


def test_determinism(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", **SMALL)
    b = write_synthetic_dataset(tmp_path / "b", **SMALL)
    c = write_synthetic_dataset(tmp_path / "c", **{**SMALL, "seed": SMALL["seed"] + 1})
    snap_a = _snapshot(a)
    assert snap_a and snap_a == _snapshot(b)
    snap_c = _snapshot(c)
    common = set(snap_a) & set(snap_c)
    assert any(snap_a[k] != snap_c[k] for k in common) or set(snap_a) != set(snap_c)


def test_idempotent_and_rewrites_on_change(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_synthetic_dataset(root, **SMALL)
    before = _mtimes(root)
    time.sleep(0.02)
    write_synthetic_dataset(root, **SMALL)
    assert _mtimes(root) == before

    # different parameters: rewritten cleanly, stale SYN patients removed
    write_synthetic_dataset(root, **{**SMALL, "num_patients": 3, "image_size": 48})
    syn = sorted(p.name for p in root.iterdir() if PATIENT_NAME_RE.match(p.name))
    assert syn == [f"SYN_P{i:03d}_20000101" for i in (1, 2, 3)]
    img = tifffile.imread(root / syn[0] / f"{syn[0]}_1.tif")
    assert img.shape == (48, 48, 3)
    assert json.loads((root / MARKER_NAME).read_text())["params"]["num_patients"] == 3

    # overwrite=True rewrites even when up to date
    before = _mtimes(root)
    time.sleep(0.02)
    write_synthetic_dataset(root, **{**SMALL, "num_patients": 3, "image_size": 48}, overwrite=True)
    after = _mtimes(root)
    assert all(after[k] != before[k] for k in before if k.endswith(".tif"))


def test_interrupted_run_is_rewritten(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "data", **SMALL)
    reference = _snapshot(root)
    # simulate an interrupted run: marker missing, one patient half written, a stale patient
    (root / MARKER_NAME).unlink()
    victim = root / "SYN_P002_20000101"
    for p in sorted(victim.glob("*_mask.tif"))[:3]:
        p.unlink()
    stale = root / "SYN_P009_20000101"
    stale.mkdir()
    (stale / "SYN_P009_20000101_1.tif").write_bytes(b"junk")

    write_synthetic_dataset(root, **SMALL)
    assert (root / MARKER_NAME).is_file()
    assert not stale.exists()
    assert _snapshot(root) == reference


def _foreign_readme(root: Path) -> Path:
    (root / "README.md").write_text("my notes\n")
    return root / "README.md"


def _real_patient(root: Path) -> Path:
    folder = root / "TCGA_CS_4943_20000902"  # a real-looking patient folder is not ours
    folder.mkdir()
    tifffile.imwrite(folder / "TCGA_CS_4943_20000902_1.tif", np.zeros((8, 8, 3), np.uint8))
    return folder


def _hidden_file(root: Path) -> Path:
    (root / ".notes").write_text("x")
    return root / ".notes"


def _file_in_a_phantom_folder(root: Path) -> Path:
    (root / "SYN_P001_20000101" / "notes.txt").write_text("mine")
    return root / "SYN_P001_20000101"


def _linked_phantom_folder(root: Path) -> Path:
    target = root.parent / "elsewhere"
    target.mkdir()
    (root / "SYN_P009_20000101").symlink_to(target)
    return root / "SYN_P009_20000101"


@pytest.mark.parametrize(
    "foreign",
    [
        _foreign_readme,
        _real_patient,
        _hidden_file,
        _file_in_a_phantom_folder,
        _linked_phantom_folder,
    ],
)
@pytest.mark.parametrize("settings", ["same", "other"])
def test_a_folder_holding_anything_else_is_never_written_to(
    tmp_path: Path, foreign, settings: str
) -> None:
    """Issue 21, item 1: phantoms go only into an empty folder or one of tlunet's phantoms;
    anything else is refused with one line naming the folder, and the folder is unchanged
    (whether the call would rewrite the set or find it up to date)."""
    root = write_synthetic_dataset(tmp_path / "data", **SMALL)
    entry = foreign(root)
    before = tree_snapshot(root)
    kwargs = SMALL if settings == "same" else {**SMALL, "num_patients": 3}
    with pytest.raises(ConfigError) as info:
        write_synthetic_dataset(root, **kwargs)
    message = str(info.value)
    assert message.startswith(f"Refusing to write synthetic phantoms into '{root}': it holds")
    assert f"'{entry}'" in message and "\n" not in message
    assert tree_snapshot(root) == before
    assert not holds_phantoms(root, **SMALL)


def test_leftovers_of_an_interrupted_write_are_the_generator_own(tmp_path: Path) -> None:
    root = write_synthetic_dataset(tmp_path / "data", **SMALL)
    for name in (MARKER_NAME, "README.md"):  # killed atomic writes (tlunet.utils.atomic_path)
        fd, _ = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
    assert foreign_entries(root) == []
    assert holds_phantoms(root, **SMALL)
    assert not holds_phantoms(root, **{**SMALL, "seed": 4})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_patients": 0},
        {"slices_per_patient": (2, 5)},
        {"slices_per_patient": (8, 6)},
        {"image_size": 8},
        {"tumour_free_patients": 1.5},
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        write_synthetic_dataset(tmp_path / "bad", **kwargs)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tlunet.data.synthetic", str(out)]
    cmd += ["--patients", "3", "--size", "48", "--seed", "1", "--min-slices", "5"]
    cmd += ["--max-slices", "6"]
    env_root = REPO
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=env_root, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / MARKER_NAME).read_text())["params"]["num_patients"] == 3


# -- data=synthetic: phantoms are written under tlunet's cache only (issue 21, item 1) -------
def _phantom_module(root: Path, cache: Path, **settings) -> LGGDataModule:
    return LGGDataModule(
        str(root), synthetic={**SMALL, **settings}, synthetic_cache=str(cache), image_size=64
    )


def test_data_synthetic_writes_under_the_cache_and_only_reads_elsewhere(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "synthetic"
    inside = cache / "p5_s64_seed3"
    _phantom_module(inside, cache).prepare_data()
    assert holds_phantoms(inside, **SMALL)
    # A complete set of these phantoms outside the cache is read as it is.
    mine = write_synthetic_dataset(tmp_path / "mine", **SMALL)
    before = tree_snapshot(mine)
    _phantom_module(mine, cache).prepare_data()
    assert tree_snapshot(mine) == before
    # Any other folder outside the cache is refused, named, and left as it was.
    real = tmp_path / "real"
    real.mkdir()
    _real_patient(real)
    for root in (real, mine, tmp_path / "new"):
        existed = {p: tree_snapshot(p) for p in (real, mine)}
        module = _phantom_module(root, cache, seed=9)  # other settings than the set in `mine`
        with pytest.raises(ConfigError) as info:
            module.prepare_data()
        message = str(info.value)
        assert message.startswith("data=synthetic writes its phantoms only into tlunet's cache")
        assert f"data.root '{root}'" in message and "data.synthetic=null" in message
        assert {p: tree_snapshot(p) for p in (real, mine)} == existed
        assert not (tmp_path / "new").exists()
    # Without a cache folder (an older config) nothing is written anywhere.
    with pytest.raises(ConfigError, match="writes its phantoms only into tlunet's cache"):
        LGGDataModule(str(tmp_path / "new"), synthetic=SMALL).prepare_data()


def test_a_real_folder_inside_the_cache_is_not_written_to_either(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "synthetic"
    root = cache / "p5_s64_seed3"
    root.mkdir(parents=True)
    folder = _real_patient(root)
    before = tree_snapshot(root)
    with pytest.raises(ConfigError, match=rf"into '{re.escape(str(root))}': it holds '{folder}'"):
        _phantom_module(root, cache).prepare_data()
    assert tree_snapshot(root) == before


@pytest.mark.parametrize("overrides", [["data=synthetic"], ["experiment=demo"]])
def test_the_synthetic_configs_keep_their_phantoms_in_the_cache(overrides: list[str]) -> None:
    cfg = compose_config([*overrides, "paths.cache_dir=/somewhere/cache"])
    assert cfg.data.synthetic_cache == "/somewhere/cache/synthetic"
    expected = f"/somewhere/cache/synthetic/{phantom_folder_name(cfg.data.synthetic)}"
    assert cfg.data.root == expected


def test_cli_refuses_a_folder_of_someone_else_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "kaggle_3m"
    root.mkdir()
    folder = _real_patient(root)
    before = tree_snapshot(root)
    assert synthetic_main([str(root), "--patients", "3", "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert err == f"tlunet error: Refusing to write synthetic phantoms into '{root}': " + (
        f"it holds '{folder}', which tlunet's phantom generator did not write. Phantoms are "
        "written only into an empty folder or one holding tlunet's own phantoms; nothing was "
        "changed.\n"
    )
    assert tree_snapshot(root) == before


def test_a_phantom_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    """Issue 21, item 11: TLUNET_CACHE_DIR naming a file, for the phantoms' folder."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    module = _phantom_module(blocker / "synthetic" / "p5_s64_seed3", blocker / "synthetic")
    with pytest.raises(ConfigError) as info:
        module.prepare_data()
    assert str(info.value).startswith(
        f"data.root '{blocker / 'synthetic' / 'p5_s64_seed3'}' cannot be created: "
        f"'{blocker}' is a file, not a folder."
    )
    assert blocker.read_text() == "x"


# -- issue 21, second round: one folder per phantom set, named in one place ------------------
PHANTOMS = {
    "num_patients": 12,
    "slices_per_patient": [16, 24],
    "image_size": 256,
    "tumour_free_patients": 0.2,
    "seed": 0,
}


def test_every_setting_that_changes_the_phantoms_names_their_folder() -> None:
    """Two settings that write other phantoms never share (and rewrite) one folder that
    another command may be reading; settings read alike name the same folder."""
    changed = {
        "num_patients": 13,
        "slices_per_patient": [16, 25],
        "image_size": 128,
        "tumour_free_patients": 0.5,
        "seed": 1,
    }
    names = {phantom_folder_name(PHANTOMS)}
    names |= {phantom_folder_name({**PHANTOMS, key: value}) for key, value in changed.items()}
    assert len(names) == 1 + len(changed)
    alike = {**PHANTOMS, "slices_per_patient": (16, 24), "tumour_free_patients": 0.20}
    assert phantom_folder_name(alike) == phantom_folder_name(PHANTOMS)
    assert phantom_folder_name(PHANTOMS).startswith("p12_s256_seed0-")


@pytest.mark.parametrize(
    "override",
    ["data.synthetic.slices_per_patient=[6,9]", "data.synthetic.tumour_free_patients=0.5"],
)
def test_the_config_names_the_phantom_folder_with_the_one_definition(override: str) -> None:
    plain = compose_config(["data=synthetic", "paths.cache_dir=/c"])
    changed = compose_config(["data=synthetic", "paths.cache_dir=/c", override])
    assert changed.data.root != plain.data.root
    assert changed.data.root == f"/c/synthetic/{phantom_folder_name(changed.data.synthetic)}"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({**PHANTOMS, "colour": 1}, "data.synthetic holds colour, not a setting"),
        ({**PHANTOMS, "num_patients": "many"}, "num_patients='many'"),
        ({**PHANTOMS, "slices_per_patient": 8}, "slices_per_patient=8"),
        ({"slices_per_patient": [5]}, "slices_per_patient=[5]"),
        (None, "data.synthetic is None"),
        ([12, 256], "data.synthetic is [12, 256]"),
    ],
)
def test_phantom_settings_that_name_no_folder_are_one_line(node: dict, message: str) -> None:
    """Item 5: a hand-made checkpoint's (or a command line's) data.synthetic with another key,
    a value that is no number, or no mapping at all: one line, not a traceback."""
    with pytest.raises(ConfigError) as info:
        phantom_folder_name(node)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_setting_the_node_lacks_is_the_generator_default() -> None:
    """Item 5: a node without every setting (a hand-made checkpoint, an older one) names the
    phantoms data=synthetic writes for it (write_synthetic_dataset's defaults), as it reads
    them (holds_phantoms)."""
    defaults = {"num_patients": 8, "slices_per_patient": [16, 24], "image_size": 256}
    defaults |= {"tumour_free_patients": 0.2, "seed": 0}
    assert phantom_folder_name({"seed": 0}) == phantom_folder_name(defaults)
    assert phantom_folder_name({}) == phantom_folder_name(defaults)
    assert phantom_folder_name({"seed": 1}) != phantom_folder_name(defaults)


def test_an_impossible_phantom_setting_on_the_command_line_is_one_line() -> None:
    """The resolver's refusal comes out as its own line, not in OmegaConf's three."""
    from tlunet.cli import _user_error

    cfg = compose_config(["data=synthetic", "+data.synthetic.colour=1"])
    with pytest.raises(Exception) as info:
        str(cfg.data.root)
    error = _user_error(info.value)
    assert isinstance(error, ConfigError) and "holds colour, not a setting" in str(error)
    assert "\n" not in str(error)


def test_a_key_that_is_no_phantom_setting_is_one_line_with_an_explicit_root(
    tmp_path: Path,
) -> None:
    """data.root set inside the cache (the resolver that names the folder does not run): a
    key of data.synthetic that is no setting is one line too, not a TypeError."""
    cache = tmp_path / "cache" / "synthetic"
    with pytest.raises(ConfigError, match=r"^data\.synthetic: .*'colour'") as info:
        _phantom_module(cache / "mine", cache, colour=1).prepare_data()
    assert "\n" not in str(info.value) and not (cache / "mine").exists()
