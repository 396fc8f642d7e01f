"""Bad input, clear errors, nothing lost: a catalogue of user mistakes and their messages.

Each case breaks a copy of the synthetic set (or the configuration) in one way and names the
message the user must see. The data cases are checked in-process on the DataModule (fast);
a representative subset runs ``python -m tlunet.train`` end to end, where the message must be
one line on stderr (no traceback), the exit status non-zero, and the run directory must not
look complete (no metrics.json). ``data.on_error=skip`` and ``python -m tlunet.data.check``
are tested at the end.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hydra.errors import HydraException
from hydra.utils import instantiate

import tlunet.data.cache as cache_module
from tests.conftest import TINY_RUN, check_run_dir, compose_config, run_cli
from tlunet.data.check import check_dataset
from tlunet.data.datamodule import LGGDataModule
from tlunet.errors import TlunetError

PATIENT = "SYN_P002_20000101"


def _image(root: Path, n: int, patient: str = PATIENT) -> Path:
    return root / patient / f"{patient}_{n}.tif"


def _mask(root: Path, n: int, patient: str = PATIENT) -> Path:
    return root / patient / f"{patient}_{n}_mask.tif"


def _q(path: Path) -> str:
    return re.escape(str(path))


# -- the breakages: each edits a copy of the set and returns the expected message (a regex) --
def missing_mask(root: Path) -> str:
    _mask(root, 3).unlink()
    return rf"Missing mask for image '{_q(_image(root, 3))}'"


def missing_image(root: Path) -> str:
    _image(root, 3).unlink()
    return rf"Mask '{_q(_mask(root, 3))}' has no matching image"


def garbage_tiff(root: Path) -> str:
    _image(root, 2).write_bytes(b"this is not a tiff at all")
    return rf"Cannot read image '{_q(_image(root, 2))}'"


def truncated_tiff(root: Path) -> str:
    mask = _mask(root, 4)
    mask.write_bytes(mask.read_bytes()[:100])
    return rf"Cannot read mask '{_q(mask)}'"


def one_channel_image(root: Path) -> str:
    tifffile.imwrite(_image(root, 2), np.zeros((64, 64), np.uint8))
    return rf"Image '{_q(_image(root, 2))}' has shape \(64, 64\); expected \(H, W, 3\)"


def four_channel_image(root: Path) -> str:
    tifffile.imwrite(_image(root, 2), np.zeros((64, 64, 4), np.uint8), photometric="rgb")
    return rf"Image '{_q(_image(root, 2))}' has shape \(64, 64, 4\)"


def uint16_image(root: Path) -> str:
    tifffile.imwrite(_image(root, 2), np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    return rf"Image '{_q(_image(root, 2))}' has dtype uint16; expected uint8"


def mask_values_128(root: Path) -> str:
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 128
    tifffile.imwrite(_mask(root, 2), mask)
    return rf"Mask '{_q(_mask(root, 2))}' holds values \[0, 128\]; expected only 0 and 255"


def non_numeric_slice(root: Path) -> str:
    bad = root / PATIENT / f"{PATIENT}_x.tif"
    shutil.copy(_image(root, 1), bad)
    return rf"Cannot read a slice number from '{_q(bad)}'"


def duplicate_slice(root: Path) -> str:
    shutil.copy(_image(root, 1), root / PATIENT / f"{PATIENT}_01.tif")
    return rf"Slice 1 appears twice in '{_q(root / PATIENT)}'"


def different_size(root: Path) -> str:
    tifffile.imwrite(_image(root, 5), np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(_mask(root, 5), np.zeros((32, 32), np.uint8))
    return rf"Image '{_q(_image(root, 5))}' is 32x32, but .* 64x64: all slices must share one size"


def mask_size_differs(root: Path) -> str:
    tifffile.imwrite(_mask(root, 2), np.zeros((32, 32), np.uint8))
    return rf"Mask '{_q(_mask(root, 2))}' is 32x32 but its image is 64x64"


def empty_root(root: Path) -> str:
    shutil.rmtree(root)
    root.mkdir()
    return rf"No patient folders with \.tif slices found in data\.root '{_q(root)}'"


def root_of_the_root(root: Path) -> str:
    # data.root=<the folder holding kaggle_3m/>: the user pointed one level too high
    return rf"No patient folders .* Did you mean data\.root={_q(root)}\?"


def missing_root(root: Path) -> str:
    shutil.rmtree(root)
    return rf"data\.root '{_q(root)}' does not exist"


def patient_folders_of_other_files(root: Path) -> str:
    for folder in root.iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)
            folder.mkdir()
            (folder / "notes.txt").write_text("no slices here")
    return r"No patient folders with \.tif slices found"


def empty_patient_folder(root: Path) -> str:
    # a half-copied dataset: the folder is there, its slices are not
    folder = root / "SYN_P999_20000101"
    folder.mkdir()
    return rf"Patient folder '{_q(folder)}' is empty .*data\.on_error=skip"


def patient_folder_without_slices(root: Path) -> str:
    folder = root / "SYN_P998_20000101"
    folder.mkdir()
    (folder / "SYN_P998_20000101_1.png").write_bytes(b"not a tiff")
    return rf"Patient folder '{_q(folder)}' holds no slice TIFF, only 1 other entry such as"


def broken_symlink_slice(root: Path) -> str:
    # issue 21, item 11: a slice that is a dangling link (a copy made with links, then moved)
    image = _image(root, 3)
    image.unlink()
    image.symlink_to(root.parent / "moved" / image.name)
    return rf"Slice file '{_q(image)}' is a broken symbolic link \(to '.*moved.*', which does"


def rgb_mask_label_in_one_channel(root: Path) -> str:
    # issue 21, item 9: read as channel 0, this mask was empty
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[10:20, 10:20, 1] = 255
    tifffile.imwrite(_mask(root, 2), mask, photometric="rgb")
    return (
        rf"Mask '{_q(_mask(root, 2))}' has 3 channels that differ \(non-zero pixels per "
        r"channel: 0, 100, 0\)"
    )


DATA_CASES: dict[str, Callable[[Path], str]] = {
    f.__name__: f
    for f in (
        missing_mask,
        missing_image,
        garbage_tiff,
        truncated_tiff,
        one_channel_image,
        four_channel_image,
        uint16_image,
        mask_values_128,
        non_numeric_slice,
        duplicate_slice,
        different_size,
        mask_size_differs,
        empty_root,
        missing_root,
        patient_folders_of_other_files,
        empty_patient_folder,
        patient_folder_without_slices,
        broken_symlink_slice,
        rgb_mask_label_in_one_channel,
    )
}


@pytest.fixture()
def data_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, dst)
    return dst


def _datamodule(root: Path, **kwargs) -> LGGDataModule:
    return LGGDataModule(str(root), image_size=32, batch_size=4, num_workers=0, **kwargs)


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_mistake_is_named(case: str, data_copy: Path, tmp_path: Path) -> None:
    expected = DATA_CASES[case](data_copy)
    dm = _datamodule(data_copy, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(TlunetError, match=expected):
        dm.setup("fit")
    # A failed decode leaves no cache behind (neither a finished nor a temporary one).
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_root_one_level_too_high_suggests_the_subfolder(data_copy: Path) -> None:
    expected = root_of_the_root(data_copy)
    with pytest.raises(TlunetError, match=expected):
        _datamodule(data_copy.parent).setup("fit")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.split_fractions=[1.0,0.0,0.0]"], r"patient split of .* leaves the val stage empty"),
        (["data.split_fractions=[0.5,0.6,0.1]"], r"must be non-negative, sum to 1"),
        (["data.split=paper", "data.num_folds=5"], r"data\.num_folds=5 needs data\.split=patient"),
        (["data.num_folds=5", "data.fold=7"], r"data\.fold=7 must be in 0\.\.4"),
    ],
)
def test_split_mistakes(overrides: list[str], expected: str, synthetic_root: Path) -> None:
    cfg = compose_config([*TINY_RUN, f"data.root={synthetic_root}", *overrides])
    with pytest.raises((TlunetError, HydraException), match=expected):
        instantiate(cfg.data).setup("fit")


def test_too_few_patients_for_a_split(data_copy: Path) -> None:
    for folder in sorted(p for p in data_copy.iterdir() if p.is_dir())[2:]:
        shutil.rmtree(folder)
    with pytest.raises(TlunetError, match=r"Only 2 patients found: too few for a train/val/test"):
        _datamodule(data_copy).setup("fit")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["encoder=nope"], r"Could not find 'encoder/nope'"),
        (["data.batchsize=4"], r"Could not override 'data\.batchsize'"),
        (["data.batch_size=-1"], r"data\.batch_size=-1 must be positive"),
        (["data.image_size=100"], r"data\.image_size=100 must be a positive multiple of 32"),
        (["data.on_error=bogus"], r"data\.on_error='bogus' is unknown; choose one of \['raise'"),
        (["data.split=nope"], r"data\.split='nope' is unknown; choose one of \['patient'"),
        (["data.normalization=zscore"], r"data\.normalization='zscore' is unknown"),
        (["data.num_workers=-2"], r"data\.num_workers=-2 must be 0 or more"),
    ],
)
def test_config_mistakes(overrides: list[str], expected: str) -> None:
    with pytest.raises((TlunetError, HydraException), match=expected):
        cfg = compose_config(["data.root=/nowhere", *overrides])
        instantiate(cfg.data)


# -- end to end: one clear line on stderr, status 1, no complete-looking run directory ---------
def _assert_clean_failure(out, run_dir: Path, expected: str) -> None:
    assert out.returncode != 0, out.stdout[-2000:]
    assert re.search(expected, out.stderr), out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["missing_mask", "truncated_tiff", "mask_values_128", "broken_symlink_slice"]
)
def test_train_stops_before_training_on_bad_data(case: str, data_copy: Path, tmp_path: Path):
    expected = DATA_CASES[case](data_copy)
    run_dir = tmp_path / "run"
    out = run_cli(
        ["tlunet.train", *TINY_RUN, f"data.root={data_copy}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    _assert_clean_failure(out, run_dir, rf"(?m)^tlunet error: {expected}")
    assert len([line for line in out.stderr.splitlines() if "tlunet error" in line]) == 1
    assert not (run_dir / "checkpoints").exists()  # stopped before training
    assert not list((tmp_path / ".tlunet-cache").rglob("meta.json"))  # no cache of a bad set


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["encoder=nope"], r"Could not find 'encoder/nope'"),
        (["data.batchsize=4"], r"Key 'batchsize' is not in struct"),
        (["data.image_size=100"], r"tlunet error: data\.image_size=100 must be a positive"),
        (["data.split_fractions=[0.5,0.5,0.0]"], r"tlunet error: .* leaves the test stage empty"),
    ],
)
def test_train_config_mistakes_end_in_one_message(
    overrides: list[str], expected: str, synthetic_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    out = run_cli(
        [
            "tlunet.train",
            *TINY_RUN,
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=tmp_path,
    )
    _assert_clean_failure(out, run_dir, expected)


# -- data.on_error=skip ------------------------------------------------------------------------
def _break_two(root: Path) -> set[str]:
    garbage_tiff(root)  # image of slice 2
    mask_values_128(root)  # the same slice's mask: still one skipped slice ...
    truncated_tiff(root)  # ... and the mask of slice 4
    return {str(_image(root, 2)), str(_mask(root, 4))}


@pytest.mark.slow
def test_skip_trains_and_lists_the_skipped_files(data_copy: Path, tmp_path: Path) -> None:
    broken = _break_two(data_copy)
    broken_symlink_slice(data_copy)  # slice 3: a dangling link
    broken.add(str(_image(data_copy, 3)))
    run_dir = tmp_path / "run"
    out = run_cli(
        [
            "tlunet.train",
            *TINY_RUN,
            f"data.root={data_copy}",
            f"hydra.run.dir={run_dir}",
            "data.on_error=skip",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_run_dir(run_dir)
    with (run_dir / "skipped_files.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["path"] for r in rows} == broken
    starts = ("Cannot read image", "Cannot read mask", "Slice file")
    assert all(r["reason"].startswith(starts) for r in rows)
    assert "Skipped 3 unusable slices" in (run_dir / "train.log").read_text()
    assert "ignored" not in out.stdout + out.stderr  # the link is a problem, not a stray file


def test_skip_cache_is_reused_and_still_reports(
    data_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _break_two(data_copy)
    non_numeric = non_numeric_slice(data_copy)  # an index-level problem too
    cache = str(tmp_path / "cache")
    cold = _datamodule(data_copy, cache_dir=cache, on_error="skip")
    cold.setup("fit")
    skipped = {p["path"] for p in cold.skipped}
    assert broken < skipped and len(skipped) == 3
    assert re.search(non_numeric, " ".join(p["reason"] for p in cold.skipped))
    assert all(str(r.image_path) not in broken for r in cold.records)
    # Row i of the arrays is records[i].
    for i, r in enumerate(cold.records):
        assert np.array_equal(cold.decoded.images[i], tifffile.imread(r.image_path))

    def no_reads(path):
        raise AssertionError(f"warm cache re-read {path}")

    monkeypatch.setattr(cache_module, "read_image", no_reads)
    monkeypatch.setattr(cache_module, "read_mask", no_reads)
    warm = _datamodule(data_copy, cache_dir=cache, on_error="skip")
    warm.setup("fit")
    assert isinstance(warm.decoded.images, np.memmap)
    assert warm.skipped == cold.skipped
    assert warm.records == cold.records
    monkeypatch.undo()
    # The skip cache is never served to a raise run: that one still stops at the first problem.
    with pytest.raises(TlunetError, match=r"Cannot read"):
        _datamodule(data_copy, cache_dir=cache, on_error="raise").setup("fit")


def test_skip_lists_patient_folders_without_slices(data_copy: Path, tmp_path: Path) -> None:
    empty_patient_folder(data_copy)
    patient_folder_without_slices(data_copy)
    dm = _datamodule(data_copy, cache_dir=str(tmp_path / "cache"), on_error="skip")
    dm.setup("fit")
    assert {Path(p["path"]).name for p in dm.skipped} == {
        "SYN_P999_20000101",
        "SYN_P998_20000101",
    }
    assert len({r.patient for r in dm.records}) == 6  # the six complete patients


def test_stray_files_are_warned_about_one_line_each(
    data_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    patient = sorted(p for p in data_copy.iterdir() if p.is_dir())[0]
    strays = [patient / "notes.txt", patient / "scan.png", data_copy / f"{patient.name}_1.tif"]
    for f in strays:
        f.write_bytes(b"x")
    (patient / "old").mkdir()
    strays.append(patient / "old")
    (patient / ".DS_Store").write_bytes(b"x")  # hidden: not mentioned
    with caplog.at_level("WARNING", logger="tlunet.data.datamodule"):
        _datamodule(data_copy, cache_dir=str(tmp_path / "cache")).setup("fit")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == len(strays)
    for f in strays:
        assert sum(f"'{f}'" in w for w in warned) == 1, (f, warned)


def test_skip_drops_and_the_check_lists_a_broken_link_and_a_multichannel_mask(
    data_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 21, items 9 and 11: with data.on_error=skip both slices are skipped and listed;
    the check names both as problems, and warns of nothing (the link is no stray file)."""
    expected = [broken_symlink_slice(data_copy), rgb_mask_label_in_one_channel(data_copy)]
    paths = {str(_image(data_copy, 3)), str(_mask(data_copy, 2))}
    with caplog.at_level("WARNING", logger="tlunet.data.datamodule"):
        dm = _datamodule(data_copy, cache_dir=str(tmp_path / "cache"), on_error="skip")
        dm.setup("fit")
    assert {p["path"] for p in dm.skipped} == paths
    assert {r.slice for r in dm.records if r.patient == PATIENT}.isdisjoint({2, 3})
    assert "ignored" not in caplog.text
    for mode in ("raise", "skip"):
        report = check_dataset(_datamodule(data_copy, on_error=mode))
        assert {p["path"] for p in report.problems} == paths and report.warnings == []
        printed = "\n".join(report.lines())
        assert all(re.search(pattern, printed) for pattern in expected), printed
        assert "ignored" not in printed and report.ok == (mode == "skip")


@pytest.mark.slow
def test_a_cache_folder_that_is_a_file_is_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    """Issue 21, item 11: TLUNET_CACHE_DIR naming a file."""
    blocker = tmp_path / "cache_file"
    blocker.write_text("not a folder")
    run_dir = tmp_path / "run"
    out = run_cli(
        ["tlunet.train", *TINY_RUN, f"data.root={synthetic_root}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={"TLUNET_CACHE_DIR": str(blocker)},
    )
    expected = (
        rf"(?m)^tlunet error: The decoded-slice cache folder \(data\.cache_dir\) "
        rf"'{_q(blocker / 'slices')}' cannot be created: '{_q(blocker)}' is a file"
    )
    _assert_clean_failure(out, run_dir, expected)
    assert blocker.read_text() == "not a folder"


def test_skip_still_raises_when_nothing_is_left(data_copy: Path) -> None:
    for image in data_copy.glob("*/*[0-9].tif"):
        image.write_bytes(b"garbage")
    with pytest.raises(TlunetError, match=r"None of the \d+ slices .* can be used"):
        _datamodule(data_copy, on_error="skip").setup("fit")


# -- python -m tlunet.data.check ---------------------------------------------------------------
@pytest.mark.slow
def test_check_clean_set(synthetic_root: Path, tmp_path: Path) -> None:
    out = run_cli(["tlunet.data.check", f"data.root={synthetic_root}"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 patients, 48 usable slices" in out.stdout
    assert re.search(r"image size 64x64", out.stdout)
    for stage in ("train", "val", "test"):
        assert re.search(rf"^\s+{stage}\s+\d+ slices\s+\d+ patients", out.stdout, re.M), stage
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no cache


@pytest.mark.slow
def test_check_names_an_empty_patient_folder_and_warns_of_stray_files(
    data_copy: Path, tmp_path: Path
) -> None:
    expected = empty_patient_folder(data_copy)
    stray = next(p for p in data_copy.iterdir() if p.is_dir() and p.name != "SYN_P999_20000101")
    (stray / "notes.txt").write_text("x")
    out = run_cli(["tlunet.data.check", f"data.root={data_copy}"], cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(expected.split(" .*")[0], out.stdout), out.stdout
    assert f"warning: '{stray / 'notes.txt'}' is not a slice or mask TIFF" in out.stdout
    assert f"tlunet error: 1 problem in '{data_copy}'" in out.stderr
    assert "6 patients, 48 usable slices" in out.stdout
    # With data.on_error=skip the folder is listed as skipped and a run would start.
    report = check_dataset(_datamodule(data_copy, on_error="skip"))
    assert report.ok and [Path(p["path"]).name for p in report.problems] == ["SYN_P999_20000101"]
    assert "skipped with data.on_error=skip" in "\n".join(report.lines())


@pytest.mark.slow
def test_check_lists_every_problem(data_copy: Path, tmp_path: Path) -> None:
    expected = [missing_mask(data_copy), garbage_tiff(data_copy), different_size(data_copy)]
    out = run_cli(["tlunet.data.check", f"data.root={data_copy}"], cwd=tmp_path)
    assert out.returncode == 1
    for pattern in expected:
        assert re.search(pattern, out.stdout), (pattern, out.stdout)
    assert f"tlunet error: 3 problems in '{data_copy}'" in out.stderr
    assert "Traceback" not in out.stderr
    assert "6 patients, 45 usable slices" in out.stdout  # the summary of what is usable
