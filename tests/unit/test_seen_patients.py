"""evaluate's seen-patient guard: patients are recognised by folder name and, renamed, by a
fingerprint of their images (tlunet.data.fingerprint) that checkpoints record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from tests.conftest import copy_patient_renamed
from tlunet.data.datamodule import LGGDataModule
from tlunet.data.fingerprint import patient_fingerprint
from tlunet.evaluate import seen_patients


def _setup(root: Path) -> LGGDataModule:
    datamodule = LGGDataModule(
        root=str(root), image_size=64, normalization="imagenet", num_workers=0
    )
    datamodule.setup("test")
    return datamodule


def test_renamed_copy_has_the_fingerprint_of_its_original(
    synthetic_root: Path, tmp_path: Path
) -> None:
    original = _setup(synthetic_root)
    names = original.patients
    copy = tmp_path / "kaggle_3m"
    for k, name in enumerate(names):
        copy_patient_renamed(synthetic_root, name, copy, f"OTHER_{k:02d}_20240101")
    # Tumour-free patients: their mask stacks are alike (all zero), their images are not. A
    # second tumour-free patient: the first one's empty masks beside its images mirrored.
    empty = next(n for n in names if not original.decoded.masks[_rows(original, n)].any())
    twin = copy_patient_renamed(synthetic_root, empty, copy, "TWIN_20240101")
    for image in twin.glob("*.tif"):
        if not image.stem.endswith("_mask"):
            tifffile.imwrite(image, tifffile.imread(image)[:, ::-1], photometric="rgb")
    renamed = _setup(copy)
    before = original.patient_fingerprints(names)
    after = renamed.patient_fingerprints(renamed.patients)
    assert [after[f"OTHER_{k:02d}_20240101"] for k in range(len(names))] == [
        before[n] for n in names
    ]
    assert len(set(before.values())) == len(names)  # distinct patients, distinct fingerprints
    twin_rows = _rows(renamed, "TWIN_20240101")
    assert np.array_equal(
        renamed.decoded.masks[twin_rows], original.decoded.masks[_rows(original, empty)]
    )
    assert not renamed.decoded.masks[twin_rows].any()
    assert after["TWIN_20240101"] != before[empty]
    # Reused, not recomputed: each patient is hashed once per DataModule.
    original.decoded.images = np.zeros_like(original.decoded.images)
    assert original.patient_fingerprints(names) == before


def _rows(datamodule: LGGDataModule, name: str) -> list[int]:
    return [i for i, r in enumerate(datamodule.records) if r.patient == name]


def test_one_changed_slice_is_another_patient() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    reference = patient_fingerprint(images, [0, 1, 2, 3])
    changed = images.copy()
    changed[2, 3, 3, 1] ^= 1
    assert patient_fingerprint(changed, [0, 1, 2, 3]) != reference
    assert patient_fingerprint(images, [0, 1, 3, 2]) != reference  # slice order counts
    assert patient_fingerprint(images, [0, 1, 2]) != reference


RECORDED = {"train": ["A", "B"], "val": ["C"]}
PRINTS = {"A": "fa", "B": "fb", "C": "fc"}


def test_seen_by_name_and_by_content() -> None:
    seen = seen_patients(
        RECORDED,
        ["A", "B2", "C2", "B", "NEW"],
        PRINTS,
        {"A": "fa", "B2": "fb", "C2": "fc", "B": "changed", "NEW": "fn"},
    )
    assert seen["compared"] == "names and content"
    assert (seen["count"], seen["train"], seen["val"], seen["evaluated"]) == (4, 3, 1, 5)
    assert seen["patients"] == [
        {"patient": "A", "recorded_as": "A", "stage": "train", "matched_by": "name and content"},
        {"patient": "B", "recorded_as": "B", "stage": "train", "matched_by": "name"},
        {"patient": "B2", "recorded_as": "B", "stage": "train", "matched_by": "content"},
        {"patient": "C2", "recorded_as": "C", "stage": "val", "matched_by": "content"},
    ]
    assert seen_patients(RECORDED, ["NEW"], PRINTS, {"NEW": "fn"})["count"] == 0


def test_old_checkpoints_compare_names_only() -> None:
    seen = seen_patients(RECORDED, ["A", "B2"])  # no fingerprints recorded
    assert seen["compared"] == "names only"
    assert seen["count"] == 1 and seen["patients"][0]["matched_by"] == "name"
    assert seen_patients(None, ["A"]) is None
