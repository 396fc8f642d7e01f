"""Patient-level and paper (slice-level) splits."""

from __future__ import annotations

import numpy as np
import pytest

from tlunet.data.splits import kfold_patient_split, split_by_patient, split_by_slice
from tlunet.errors import ConfigError, DataError

PATIENTS = [f"P{i:02d}" for i in range(40)]


def test_patient_split_is_a_partition() -> None:
    parts = split_by_patient(PATIENTS, (0.7, 0.15, 0.15), seed=0)
    sets = [set(parts[s]) for s in ("train", "val", "test")]
    assert (
        sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    )
    assert set.union(*sets) == set(PATIENTS)
    assert [len(s) for s in sets] == [28, 6, 6]


def test_patient_split_is_seeded() -> None:
    a = split_by_patient(PATIENTS, seed=1)
    assert a == split_by_patient(list(reversed(PATIENTS)), seed=1)  # order of input irrelevant
    assert a != split_by_patient(PATIENTS, seed=2)


def test_patient_split_ignores_duplicates() -> None:
    parts = split_by_patient(["A", "A", "B", "C", "C", "D"], (0.5, 0.25, 0.25), seed=0)
    assert sorted(sum(parts.values(), [])) == ["A", "B", "C", "D"]


def test_patient_split_too_few_patients() -> None:
    with pytest.raises(DataError, match="Only 2 patients"):
        split_by_patient(["A", "B"], (0.7, 0.15, 0.15))


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5), (0.6, 0.3, 0.3), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1)]
)
def test_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="split_fractions"):
        split_by_patient(PATIENTS, fractions)


def test_paper_split_sizes_on_full_dataset_size() -> None:
    parts = split_by_slice(3929, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [3005, 393, 531]
    allrows = np.concatenate(list(parts.values()))
    assert sorted(allrows.tolist()) == list(range(3929))


def test_paper_split_scaled_to_sample() -> None:
    parts = split_by_slice(1425, seed=0)
    # 1425 * 393 / 3929 = 142.54 -> 143, 1425 * 531 / 3929 = 192.59 -> 193, train 1425-336
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1089, 143, 193]
    assert not np.array_equal(parts["test"], split_by_slice(1425, seed=1)["test"])


def test_kfold_test_sets_are_disjoint_and_cover_all_patients() -> None:
    k = 5
    parts = [kfold_patient_split(PATIENTS, k, i, seed=3) for i in range(k)]
    tests = [set(p["test"]) for p in parts]
    for i in range(k):
        for j in range(i + 1, k):
            assert tests[i].isdisjoint(tests[j]), (i, j)
    assert set.union(*tests) == set(PATIENTS)
    assert sorted(len(t) for t in tests) == [8] * 5
    for p in parts:
        train, val, test = set(p["train"]), set(p["val"]), set(p["test"])
        assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
        assert train | val | test == set(PATIENTS)
        # validation carved from the other 32 patients: 32 * 0.15 / 0.85 = 5.6 -> 6
        assert len(val) == 6
    assert parts[0] == kfold_patient_split(PATIENTS, k, 0, seed=3)


@pytest.mark.parametrize(
    ("folds", "fold", "error", "message"),
    [
        (1, 0, ConfigError, "num_folds=1 must be at least 2"),
        (3, 3, ConfigError, r"data.fold=3 must be in 0..2"),
        (39, 0, DataError, "too few for 39 folds"),
    ],
)
def test_kfold_errors(folds: int, fold: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        kfold_patient_split(PATIENTS, folds, fold)
