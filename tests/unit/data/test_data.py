"""Decoded-slice cache, transforms and the DataModule."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from tlunet.data.cache import cache_key, decode_slices, read_mask
from tlunet.data.datamodule import LGGDataModule
from tlunet.data.index import index_kaggle3m
from tlunet.data.transforms import build_transform, channel_stats
from tlunet.errors import ConfigError, DataError


@pytest.fixture()
def data_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, dst)
    return dst


def _fresh(records) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([tifffile.imread(r.image_path) for r in records])
    masks = np.stack([tifffile.imread(r.mask_path) for r in records])
    return images, masks


def test_cache_equals_fresh_decode_bit_for_bit(data_copy: Path, cache_dir: Path) -> None:
    records = index_kaggle3m(data_copy)
    decoded = decode_slices(records, data_copy, cache_dir)
    images, masks = _fresh(records)
    assert decoded.images.dtype == np.uint8 and decoded.masks.dtype == np.uint8
    assert np.array_equal(decoded.images, images)
    assert np.array_equal(decoded.masks, (masks == 255).astype(np.uint8))
    assert set(np.unique(decoded.masks).tolist()) == {0, 1}
    # A second decode is served from the memory-mapped cache.
    again = decode_slices(records, data_copy, cache_dir)
    assert isinstance(again.images, np.memmap)
    assert np.array_equal(again.images, images)


def test_changed_or_added_file_invalidates_cache(data_copy: Path, cache_dir: Path) -> None:
    records = index_kaggle3m(data_copy)
    key = cache_key(records, data_copy)
    decode_slices(records, data_copy, cache_dir)
    # Change one image: new content, new mtime.
    target = records[3].image_path
    new = np.full_like(tifffile.imread(target), 7)
    tifffile.imwrite(target, new, photometric="rgb")
    os.utime(target, ns=(1, 1))
    records2 = index_kaggle3m(data_copy)
    assert cache_key(records2, data_copy) != key
    assert np.array_equal(decode_slices(records2, data_copy, cache_dir).images[3], new)
    # Add a slice.
    folder = records[0].image_path.parent
    n = max(r.slice for r in records if r.patient == folder.name) + 1
    tifffile.imwrite(folder / f"{folder.name}_{n}.tif", new, photometric="rgb")
    tifffile.imwrite(folder / f"{folder.name}_{n}_mask.tif", np.zeros(new.shape[:2], np.uint8))
    records3 = index_kaggle3m(data_copy)
    assert len(records3) == len(records) + 1
    assert cache_key(records3, data_copy) not in (key, cache_key(records2, data_copy))
    assert len(decode_slices(records3, data_copy, cache_dir).images) == len(records3)


def test_bad_mask_values_and_shapes_are_reported(data_copy: Path) -> None:
    records = index_kaggle3m(data_copy)
    bad = records[1].mask_path
    tifffile.imwrite(bad, np.full((64, 64), 128, np.uint8))
    with pytest.raises(DataError, match=rf"Mask '{bad}' holds values \[128\]"):
        decode_slices(records, data_copy)
    tifffile.imwrite(bad, np.zeros((64, 64), np.uint8))
    img = records[2].image_path
    tifffile.imwrite(img, np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match=rf"Image '{img}' has shape \(64, 64\)"):
        decode_slices(records, data_copy)


def test_corrupt_tiff_is_reported(data_copy: Path) -> None:
    records = index_kaggle3m(data_copy)
    records[0].image_path.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match=rf"Cannot read image '{records[0].image_path}'"):
        decode_slices(records, data_copy)
    truncated = records[1].mask_path
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"Cannot read mask '{truncated}'"):
        decode_slices(records[1:], data_copy)


@pytest.mark.parametrize("size", [32, 96, 160])
def test_masks_stay_binary_through_training_transforms(size: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[60:150, 90:200] = 1
    # The configured training augmentation, every transform forced on.
    augment = instantiate(compose_config().data.augment)
    for t in augment:
        t.p = 1.0
    tf = build_transform(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment)
    for _ in range(5):
        out = tf(image=image, mask=mask)
        assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (size, size)
        assert set(torch.unique(out["mask"]).tolist()) <= {0, 1}
        assert out["mask"].sum() > 0


def test_normalisation_is_per_channel() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 1] = 255
    out = build_transform(32, (0.0, 0.5, 1.0), (1.0, 0.5, 0.5))(image=image, mask=image[..., 0])
    assert torch.allclose(out["image"][:, 0, 0], torch.tensor([0.0, 1.0, -2.0]))


def test_channel_stats() -> None:
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255  # channel 0: half the pixels 1.0 -> mean 0.5, std 0.5
    mean, std = channel_stats(images, chunk=1)
    assert mean == pytest.approx([0.5, 0.0, 0.0])
    assert std[0] == pytest.approx(0.5)
    mean, std = channel_stats(images, rows=[0])  # only the first image: channel 0 all 1.0
    assert mean == pytest.approx([1.0, 0.0, 0.0])


def test_datamodule_batches(synthetic_root: Path, cache_dir: Path) -> None:
    dm = LGGDataModule(
        str(synthetic_root), image_size=32, batch_size=4, num_workers=0, cache_dir=str(cache_dir)
    )
    dm.setup("fit")
    stages = {s: set(dm.stage_patients(s)) for s in ("train", "val", "test")}
    assert stages["train"].isdisjoint(stages["val"]) and stages["train"].isdisjoint(stages["test"])
    assert sum(len(v) for v in stages.values()) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert batch["patient"].dtype == torch.int64
    assert "mask_native" not in batch  # augmented training slices: no native mask
    val = next(iter(dm.val_dataloader()))
    names = {dm.patients[int(p)] for p in val["patient"]}
    assert names <= stages["val"]
    assert dm.preprocessing["image_size"] == 32
    # Evaluation batches carry the masks as stored (64 px), untransformed, for scoring.
    assert val["mask_native"].shape == (len(val["patient"]), 1, 64, 64)
    assert val["mask_native"].dtype == torch.uint8
    rows = val["row"].numpy()
    assert np.array_equal(val["mask_native"][:, 0].numpy(), dm.decoded.masks[rows])
    assert dm.native_size == (64, 64)


@pytest.mark.parametrize(
    ("encoder", "mean", "source"),
    [
        ("tu-tf_efficientnet_lite0", 0.5, "timm pretrained_cfg"),
        ("tu-inception_v3", 0.5, "timm pretrained_cfg"),
        ("inceptionv4", 0.5, "smp 'inceptionv4'"),
        ("inceptionresnetv2", 0.5, "smp"),
        ("densenet121", 0.485, "ImageNet statistics"),
        ("tu-resnet18.a1_in1k", 0.485, "timm pretrained_cfg"),
        ("none", 0.485, "no pretrained encoder"),
        (None, 0.485, "no pretrained encoder"),
    ],
)
def test_encoder_normalisation(encoder: str | None, mean: float, source: str) -> None:
    """normalization=encoder gives what each encoder's pretrained weights were trained with
    (TF ports: mean = std = 0.5), and stores it with the rest of the preprocessing."""
    dm = LGGDataModule("/tmp", normalization="encoder", encoder_name=encoder)
    assert dm.mean[0] == pytest.approx(mean)
    assert dm.std[0] == pytest.approx(0.5 if mean == 0.5 else 0.229)
    assert dm.preprocessing["normalization"] == "encoder"
    assert source in dm.preprocessing["normalization_source"]


def test_encoder_normalisation_is_the_default_and_follows_the_encoder_group() -> None:
    cfg = compose_config(["encoder=inception_v4"])
    assert cfg.data.normalization == "encoder" and cfg.data.encoder_name == "inceptionv4"
    dm = instantiate(cfg.data)
    assert dm.mean == [0.5, 0.5, 0.5] and dm.std == [0.5, 0.5, 0.5]
    assert compose_config(["model=unet_scratch"]).data.encoder_name == "none"
    # smp's advprop EfficientNet weights were trained on [-1, 1] inputs.
    advprop = LGGDataModule("/tmp", encoder_name="efficientnet-b0", encoder_weights="advprop")
    assert advprop.mean == [0.5, 0.5, 0.5] and "advprop" in advprop.normalization_source
    imagenet = LGGDataModule("/tmp", encoder_name="efficientnet-b0", encoder_weights="imagenet")
    assert imagenet.mean == [0.485, 0.456, 0.406]
    # A stored preprocessing (a checkpoint's) wins over any normalisation setting.
    stored = {"image_size": 96, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    dm = LGGDataModule("/tmp", normalization="dataset", preprocessing=stored)
    assert (dm.image_size, dm.mean, dm.std) == (96, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_datamodule_paper_split_and_dataset_normalisation(synthetic_root: Path) -> None:
    dm = LGGDataModule(
        str(synthetic_root), split="paper", image_size=32, num_workers=0, normalization="dataset"
    )
    dm.setup()
    n = len(dm.records)
    sizes = [len(dm.stage_rows[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == n and sizes[1] == round(n * 393 / 3929)
    assert dm.mean != pytest.approx([0.485, 0.456, 0.406])
    assert all(0 < s < 1 for s in dm.std)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 100}, "multiple of 32"),
        ({"batch_size": -1}, "batch_size=-1 must be positive"),
        ({"split": "slices"}, "data.split='slices' is unknown"),
        ({"normalization": "zscore"}, "data.normalization='zscore' is unknown"),
    ],
)
def test_datamodule_rejects_impossible_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LGGDataModule("/tmp", **kwargs)


def test_skip_mode_drops_bad_slices_keeping_rows_aligned(data_copy: Path, cache_dir: Path) -> None:
    records = index_kaggle3m(data_copy)
    records[1].image_path.write_bytes(b"garbage")
    tifffile.imwrite(records[4].mask_path, np.full((64, 64), 7, np.uint8))
    tifffile.imwrite(records[0].image_path, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(records[0].mask_path, np.zeros((32, 32), np.uint8))
    for cache in (None, cache_dir, cache_dir):  # in memory, cold cache, warm cache
        decoded = decode_slices(records, data_copy, cache, on_error="skip")
        assert decoded.kept == [i for i in range(len(records)) if i not in (0, 1, 4)]
        # The odd size is the first slice's: the most common size wins, not the first.
        assert [Path(p["path"]) for p in decoded.skipped] == [
            records[0].image_path,
            records[1].image_path,
            records[4].mask_path,
        ]
        assert "is 32x32, but" in decoded.skipped[0]["reason"]
        images, _ = _fresh([records[i] for i in decoded.kept])
        assert np.array_equal(decoded.images, images)
    assert isinstance(decoded.images, np.memmap)
    with pytest.raises(DataError, match=r"Image '.*_1\.tif' is 32x32, but the first slice"):
        decode_slices(records[2:4] + records[:1], data_copy, on_error="raise")


def test_skip_and_raise_caches_have_different_keys(data_copy: Path) -> None:
    records = index_kaggle3m(data_copy)
    assert cache_key(records, data_copy) == cache_key(records, data_copy, "raise")
    assert cache_key(records, data_copy, "skip") != cache_key(records, data_copy)
    with pytest.raises(ConfigError, match=r"data.on_error='ignore' is unknown"):
        decode_slices(records, data_copy, on_error="ignore")
    with pytest.raises(ConfigError, match=r"choose one of \['raise', 'skip'\]"):
        LGGDataModule("/tmp", on_error="ignore")


def test_corrupted_cache_is_detected_and_rebuilt(
    data_copy: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes of a cached masks.npy changed in place (same size, values still 0/1, as bit rot
    or another program could leave them): the next open warns once naming the cache and
    rebuilds it from the TIFFs, never serving the changed masks."""
    records = index_kaggle3m(data_copy)
    decode_slices(records, data_copy, cache_dir)
    folder = cache_dir / cache_key(records, data_copy)
    masks = np.load(folder / "masks.npy", mmap_mode="r+")
    truth = np.array(masks)
    masks[: len(masks) // 2] = 1 - masks[: len(masks) // 2]  # flipped, still {0, 1}
    masks.flush()
    del masks
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        again = decode_slices(records, data_copy, cache_dir)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(folder) in warnings[0].getMessage()
    assert "masks.npy" in warnings[0].getMessage()
    assert np.array_equal(again.masks, truth)
    assert np.array_equal(np.load(folder / "masks.npy"), truth)  # rebuilt on disk too
    caplog.clear()
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        decode_slices(records, data_copy, cache_dir)  # the rebuilt cache verifies
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_corrupted_skip_cache_is_rebuilt(data_copy: Path, cache_dir: Path) -> None:
    records = index_kaggle3m(data_copy)
    first = decode_slices(records, data_copy, cache_dir, on_error="skip")
    truth = np.array(first.images)
    del first
    folder = cache_dir / cache_key(records, data_copy, "skip")
    with open(folder / "images.npy", "r+b") as f:  # one byte near the end, same size
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert np.array_equal(
        decode_slices(records, data_copy, cache_dir, on_error="skip").images, truth
    )


def test_cache_without_checksums_is_rebuilt(data_copy: Path, cache_dir: Path) -> None:
    records = index_kaggle3m(data_copy)
    decode_slices(records, data_copy, cache_dir)
    meta_path = cache_dir / cache_key(records, data_copy) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert set(meta["checksums"]) == {"images", "masks"}
    del meta["checksums"]
    meta_path.write_text(json.dumps(meta))
    decode_slices(records, data_copy, cache_dir)
    assert "checksums" in json.loads(meta_path.read_text())


def test_recently_verified_cache_is_not_hashed_again_until_a_write_or_an_hour(
    data_copy: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp: a cache verified within the hour whose files were not written since opens
    without hashing; a write into it (its ctime moves) or an hour passing brings the check
    back."""
    import time

    from tlunet.data import cache as cache_module

    records = index_kaggle3m(data_copy)
    decode_slices(records, data_copy, cache_dir)
    folder = cache_dir / cache_key(records, data_copy)
    monkeypatch.setattr(cache_module, "CTIME_MARGIN_NS", 0)  # no waiting for the coarse clock
    hashed = []
    real = cache_module.array_checksum
    monkeypatch.setattr(cache_module, "array_checksum", lambda arr: hashed.append(1) or real(arr))
    stamp = folder / "verified"  # its modification time: when the last verification began
    os.utime(stamp, ns=(time.time_ns(),) * 2)
    decode_slices(records, data_copy, cache_dir)
    assert hashed == []  # fresh stamp, files unchanged: no hashing
    old = time.time_ns() - 2 * 3600 * 10**9
    os.utime(stamp, ns=(old, old))
    decode_slices(records, data_copy, cache_dir)
    assert len(hashed) == 2  # an old stamp: both arrays hashed, and the stamp renewed
    assert stamp.stat().st_mtime_ns > old and not list(folder.glob(".verified-*"))
    hashed.clear()
    decode_slices(records, data_copy, cache_dir)
    assert hashed == []
    time.sleep(0.05)  # past the coarse clock of file times
    masks = np.load(folder / "masks.npy", mmap_mode="r+")  # a write: the ctime moves
    truth = np.array(masks)
    masks[0, :4, :4] = 1 - masks[0, :4, :4]
    masks.flush()
    del masks
    time.sleep(0.05)
    assert np.array_equal(decode_slices(records, data_copy, cache_dir).masks, truth)


# -- issue 21 ----------------------------------------------------------------------------------
def _tumour_row(records) -> int:
    return next(i for i, r in enumerate(records) if tifffile.imread(r.mask_path).any())


@pytest.mark.parametrize("how", ["rewritten in place", "replaced by a rename"])
def test_a_mask_replaced_with_the_same_name_size_and_mtime_gets_a_new_cache(
    data_copy: Path, cache_dir: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 3: kaggle_3m masks are uncompressed TIFFs of one size, and cp -p, rsync -a and
    archives keep modification times: a corrected mask differs from the cached one only in
    its bytes (and in what no copy keeps: ctime, inode). The cache must follow the file: its
    (ctime, inode) stamp moved, its bytes are hashed, they differ: one warning naming it, and
    the cache is rebuilt."""
    records = index_kaggle3m(data_copy)
    row = _tumour_row(records)
    target = records[row].mask_path
    old = decode_slices(records, data_copy, cache_dir)
    assert old.masks[row].any()
    st = target.stat()
    scratch = data_copy / ".new_mask.tif"
    tifffile.imwrite(scratch, np.zeros(old.masks.shape[1:], np.uint8))  # the tumour removed
    assert scratch.stat().st_size == st.st_size
    if how == "rewritten in place":
        with open(target, "r+b") as f:
            f.write(scratch.read_bytes())
        scratch.unlink()
    else:
        os.replace(scratch, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    records = index_kaggle3m(data_copy)
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        new = decode_slices(records, data_copy, cache_dir)
    assert not new.masks[row].any()
    assert np.array_equal(new.masks[row], tifffile.imread(target) > 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"'{target}' is not the file it was built from" in warnings[0]
    folder = cache_dir / cache_key(records, data_copy)
    assert not np.load(folder / "masks.npy")[row].any()  # rebuilt on disk too
    caplog.clear()
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        again = decode_slices(records, data_copy, cache_dir)
    assert not again.masks[row].any() and not caplog.records


def test_an_rgb_mask_is_read_when_its_channels_agree_and_refused_otherwise(
    data_copy: Path, cache_dir: Path
) -> None:
    """Item 9: a mask saved as RGB with the label in one channel is not read as empty."""
    records = index_kaggle3m(data_copy)
    row = _tumour_row(records)
    grey = tifffile.imread(records[row].mask_path)
    path = records[row].mask_path
    tifffile.imwrite(path, np.stack([grey] * 3, axis=-1), photometric="rgb")
    assert np.array_equal(read_mask(path), grey > 0)  # a grey mask saved as RGB
    tifffile.imwrite(path, grey[..., None], photometric="minisblack")
    assert np.array_equal(read_mask(path), grey > 0)  # (H, W, 1)
    rgb = np.zeros((*grey.shape, 3), np.uint8)
    rgb[..., 1] = grey  # the label in the green channel alone
    tifffile.imwrite(path, rgb, photometric="rgb")
    tumour = int(np.count_nonzero(grey))
    expected = (
        rf"Mask '{re.escape(str(path))}' has 3 channels that differ \(non-zero pixels per "
        rf"channel: 0, {tumour}, 0\)"
    )
    with pytest.raises(DataError, match=expected):
        read_mask(path)
    with pytest.raises(DataError, match=expected):
        decode_slices(records, data_copy, cache_dir)
    skipped = decode_slices(records, data_copy, cache_dir, on_error="skip")
    assert [p["path"] for p in skipped.skipped] == [str(path)]
    assert row not in skipped.kept


@pytest.mark.parametrize("where", ["the cache folder", "a folder above it", "its slices/"])
def test_a_cache_folder_that_is_a_file_is_one_line(
    data_copy: Path, tmp_path: Path, where: str
) -> None:
    """Item 11: TLUNET_CACHE_DIR or data.cache_dir naming a file (or its slices/ a file)."""
    records = index_kaggle3m(data_copy)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    cache = {
        "the cache folder": blocker,
        "a folder above it": blocker / "slices",
        "its slices/": tmp_path / "cache" / "slices",
    }[where]
    if where == "its slices/":
        cache.parent.mkdir()
        cache.write_text("x")
        blocker = cache
    for on_error in ("raise", "skip"):
        with pytest.raises(ConfigError) as info:
            decode_slices(records, data_copy, cache, on_error=on_error)
        message = str(info.value)
        what = f"The decoded-slice cache folder (data.cache_dir) '{cache}'"
        if blocker == cache:
            assert message.startswith(f"{what} is a file, not a folder.")
        else:
            assert message.startswith(f"{what} cannot be created: '{blocker}' is a file")
        assert "TLUNET_CACHE_DIR" in message and "\n" not in message


def test_stale_temporaries_of_killed_cache_builds_are_removed(
    data_copy: Path, cache_dir: Path
) -> None:
    """Item 12: a build killed mid-way leaves <key>.tmp-<host>-<pid>-<hex> (356 MiB for 40
    patients). The next decode removes those of this host's dead processes, never a live
    process's build; a temporary whose owner cannot be asked goes after a day untouched."""
    from tlunet.data.cache import _HOST, STALE_AFTER_S  # how a build names its temporary

    records = index_kaggle3m(data_copy)
    key = cache_key(records, data_copy)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        day_old = time.time() - 2 * STALE_AFTER_S
        folders = {
            "dead": (f"{key}.tmp-{_HOST}-{dead.pid}-0123abcd", None),
            "live": (f"{key}.tmp-{_HOST}-{live.pid}-4567cdef", None),
            "other host": (f"{key}.tmp-elsewhere.example-{dead.pid}-89abcdef", None),
            "other host, old": (f"{key}.tmp-elsewhere.example-{dead.pid}-00000000", day_old),
            "older tlunet": (f"{key}.tmp-1a2b3c4d", None),
            "older tlunet, old": (f"{key}.tmp-5e6f7a8b", day_old),
            "set aside": (f"{key}.bad-9c0d1e2f", None),
            "not ours": ("notes.tmp-12345678", day_old),
        }
        for name, when in folders.values():
            (cache_dir / name).mkdir(parents=True)
            (cache_dir / name / "images.npy").write_bytes(b"x" * 1000)
            if when is not None:
                os.utime(cache_dir / name / "images.npy", (when, when))
                os.utime(cache_dir / name, (when, when))
        decoded = decode_slices(records, data_copy, cache_dir)
        assert np.array_equal(decoded.masks, _fresh(records)[1] > 0)
        left = {what for what, (name, _) in folders.items() if (cache_dir / name).exists()}
        assert left == {"live", "other host", "older tlunet", "not ours"}
        assert (cache_dir / key / "meta.json").is_file()
    finally:
        live.kill()
        live.wait()


# -- issue 21, second round: the cache key on (path, size, mtime), files checked by stamp -------
def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from tlunet.data import cache as cache_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt: the slices were decoded")

    monkeypatch.setattr(cache_module, "_decode_into", no_decoding)  # on_error=raise
    monkeypatch.setattr(cache_module, "scan_slices", no_decoding)  # on_error=skip


def _count_file_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from tlunet.data import cache as cache_module

    hashed: list[int] = []
    real = getattr(cache_module, "file_hash", None)
    monkeypatch.setattr(
        cache_module, "file_hash", lambda data: hashed.append(1) or real(data), raising=False
    )
    return hashed


def test_a_copy_with_its_times_kept_reuses_the_cache_without_decoding(
    data_copy: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """rsync -a / cp -p of the data set to node-local scratch at every cluster job: the copy's
    files have new ctimes and inodes but the same relative paths, sizes, mtimes and bytes, so
    it shares the cache: hashed once (no TIFF decoded, no warning), then a plain warm start."""
    records = index_kaggle3m(data_copy)
    first = decode_slices(records, data_copy, cache_dir)
    truth = np.array(first.masks)
    scratch = tmp_path / "scratch" / "kaggle_3m"
    shutil.copytree(data_copy, scratch, copy_function=shutil.copy2)
    copied = index_kaggle3m(scratch)
    a, b = records[0].mask_path.stat(), copied[0].mask_path.stat()
    assert (a.st_ino, a.st_mtime_ns) != (b.st_ino, b.st_mtime_ns) and a.st_mtime_ns == b.st_mtime_ns

    _no_decoding(monkeypatch)
    hashed = _count_file_hashes(monkeypatch)
    with caplog.at_level("INFO", logger="tlunet.data.cache"):
        decoded = decode_slices(copied, scratch, cache_dir)
    assert np.array_equal(decoded.masks, truth)
    assert [p.name for p in cache_dir.iterdir()] == [cache_key(records, data_copy)]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(hashed) == 2 * len(copied)  # every file of the copy hashed, once
    hashed.clear()
    decode_slices(copied, scratch, cache_dir)
    assert hashed == []  # the copy's stamps were recorded: a plain warm start
    decode_slices(records, data_copy, cache_dir)
    assert len(hashed) == 2 * len(records)  # back on the original: its stamps again


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_chmod_alone_does_not_rebuild_the_cache(
    data_copy: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, on_error: str, caplog
) -> None:
    """A change of metadata only (chmod: a new ctime) hashes that file, finds its bytes the same
    and keeps the cache, without hashing the cache's arrays again (the `verified` stamp watches
    the arrays and meta.json, not the stamps of the slice files)."""
    from tlunet.data import cache as cache_module

    records = index_kaggle3m(data_copy)
    decode_slices(records, data_copy, cache_dir, on_error=on_error)
    folder = cache_dir / cache_key(records, data_copy, on_error)
    monkeypatch.setattr(cache_module, "CTIME_MARGIN_NS", 0)  # no waiting for the coarse clock
    time.sleep(0.05)
    decode_slices(records, data_copy, cache_dir, on_error=on_error)  # verified: the stamp
    time.sleep(0.05)
    target = records[2].mask_path
    target.chmod(0o600)
    _no_decoding(monkeypatch)
    hashed = _count_file_hashes(monkeypatch)
    arrays_hashed = []
    real = cache_module.array_checksum
    monkeypatch.setattr(
        cache_module, "array_checksum", lambda arr: arrays_hashed.append(1) or real(arr)
    )
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        decode_slices(records, data_copy, cache_dir, on_error=on_error)
        decode_slices(records, data_copy, cache_dir, on_error=on_error)
    assert not caplog.records
    assert hashed == [1] and arrays_hashed == []  # one file hashed, once; the arrays not
    assert [p.name for p in cache_dir.iterdir()] == [folder.name]


def test_a_skip_cache_follows_a_mask_replaced_with_the_same_name_size_and_mtime(
    data_copy: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = index_kaggle3m(data_copy)
    row = _tumour_row(records)
    target = records[row].mask_path
    assert decode_slices(records, data_copy, cache_dir, on_error="skip").masks[row].any()
    st = target.stat()
    time.sleep(0.02)
    with open(target, "r+b") as f:  # the tumour removed, same size
        f.write(_empty_mask_bytes(target))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        new = decode_slices(records, data_copy, cache_dir, on_error="skip")
    assert not new.masks[row].any()
    assert [str(target) in r.getMessage() for r in caplog.records] == [True]


def _empty_mask_bytes(like: Path) -> bytes:
    scratch = like.with_name(".empty.tif")
    tifffile.imwrite(scratch, np.zeros_like(tifffile.imread(like)))
    data = scratch.read_bytes()
    scratch.unlink()
    assert len(data) == like.stat().st_size
    return data


def test_new_stamps_that_cannot_be_recorded_leave_the_cache_usable(
    data_copy: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A read-only cache folder (or one another process removed meanwhile): the stamps stay
    the old ones, the cache is used all the same, the files are hashed again next time."""
    from tlunet.data import cache as cache_module
    from tlunet.errors import WriteError

    records = index_kaggle3m(data_copy)
    truth = np.array(decode_slices(records, data_copy, cache_dir).masks)
    time.sleep(0.02)
    records[0].image_path.chmod(0o600)

    def read_only(path, *args, **kwargs):
        raise WriteError(f"Cannot write '{path}': Read-only file system")

    monkeypatch.setattr(cache_module, "atomic_path", read_only, raising=False)
    _no_decoding(monkeypatch)
    hashed = _count_file_hashes(monkeypatch)
    with caplog.at_level("WARNING", logger="tlunet.data.cache"):
        for _ in range(2):
            assert np.array_equal(decode_slices(records, data_copy, cache_dir).masks, truth)
    assert not caplog.records and hashed == [1, 1]


def _hold_in_another_process(meta: Path) -> subprocess.Popen:
    """A process holding the read lock a user of the cache holds (tlunet.data.cache._hold)."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.lockf(fd, fcntl.LOCK_SH)\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(meta)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def _can_lock(meta: Path) -> bool:
    """Whether another process can take the write lock that removing the cache takes."""
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(meta)]).returncode == 0


def _edit(path: Path) -> None:
    """A new version of a slice image (new bytes and mtime): another state of the data set."""
    image = tifffile.imread(path)
    tifffile.imwrite(path, 255 - image, photometric="rgb")


def test_a_build_removes_the_caches_of_earlier_states_that_no_process_uses(
    data_copy: Path, tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 12: every state of a data set left a ~1 GB cache forever. After a build, the caches
    of the same root and mode whose files are no longer on disk go, unless a process uses them
    (this one, or another: a training started before the edit reads its memory-mapped arrays);
    the skip cache, another root's caches and everything on a network file system stay."""
    from tlunet.data import cache as cache_module

    def decode(root: Path = data_copy, on_error: str = "raise") -> Path:
        records = index_kaggle3m(root)
        decoded = decode_slices(records, root, cache_dir, on_error=on_error)
        assert np.array_equal(decoded.images, _fresh(records)[0])
        return cache_dir / cache_key(records, root, on_error)

    def done_with(folder: Path) -> None:  # as if an earlier process had used it
        cache_module._release(folder)

    first = decode()
    assert _can_lock(first / "meta.json") is False  # a process using a cache holds its lock
    some = index_kaggle3m(data_copy)[-3:]  # never edited below: a current cache, kept
    decode_slices(some, data_copy, cache_dir)
    subset = cache_dir / cache_key(some, data_copy)
    skip = decode(on_error="skip")
    other = tmp_path / "other" / "kaggle_3m"
    shutil.copytree(data_copy, other, copy_function=shutil.copy2)
    _edit(index_kaggle3m(other)[0].image_path)
    elsewhere = decode(other)
    done_with(skip), done_with(elsewhere), done_with(first), done_with(subset)
    assert _can_lock(first / "meta.json") is True

    records = index_kaggle3m(data_copy)
    _edit(records[0].image_path)
    second = decode()
    assert not first.exists()  # an earlier state, used by no process: removed
    assert skip.exists() and elsewhere.exists()  # the other mode, another root: kept
    assert subset.exists()  # built from files that are on disk as they were: current
    done_with(second)
    holder = _hold_in_another_process(second / "meta.json")
    try:
        _edit(records[1].image_path)
        third = decode()
        assert second.exists()  # used by another process: kept
    finally:
        holder.kill()
        holder.wait()
    _edit(records[2].image_path)
    fourth = decode()
    assert third.exists()  # used by this process: kept
    assert not second.exists()  # no longer held: removed at the next build
    done_with(third)
    monkeypatch.setattr(cache_module, "_file_system", lambda path: "nfs4")
    _edit(records[3].image_path)
    decode()
    assert third.exists() and fourth.exists()  # locks may be local to a machine: nothing goes
    assert skip.exists() and elsewhere.exists() and subset.exists()
