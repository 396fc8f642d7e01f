"""Train/validation/test splits.

- ``patient`` (default): patients are shuffled with a seed and assigned whole to one stage,
  so no patient's slices appear in two stages (the honest protocol).
- ``paper``: the TL-U-Net paper's slice-level split, 3005/393/531 of 3929 slices, scaled to the
  number of slices present. Neighbouring slices of one patient land in different stages,
  which leaks information and inflates scores; it exists to reproduce the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlunet.errors import ConfigError, DataError

STAGES = ("train", "val", "test")
PAPER_SPLIT_SIZES = (3005, 393, 531)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ConfigError(
            f"data.split_fractions must hold three numbers (train, val, test), got {list(fractions)}."
        )
    f = tuple(float(x) for x in fractions)
    if any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6 or f[0] == 0:
        raise ConfigError(
            f"data.split_fractions={list(f)} must be non-negative, sum to 1 and give training a "
            "share, e.g. [0.7, 0.15, 0.15]."
        )
    return f  # type: ignore[return-value]


def _sizes(n: int, fractions: Sequence[float], what: str) -> tuple[int, int, int]:
    f_train, f_val, f_test = fractions
    n_val = max(1, round(n * f_val)) if f_val > 0 else 0
    n_test = max(1, round(n * f_test)) if f_test > 0 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"Only {n} {what} found: too few for a train/val/test split with fractions "
            f"{list(fractions)}. Add data or change data.split_fractions."
        )
    return n_train, n_val, n_test


def split_by_patient(
    patients: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 42
) -> dict[str, list[str]]:
    """Assign each distinct patient to exactly one stage.

    Returns ``{"train": [...], "val": [...], "test": [...]}`` with sorted patient names.
    The assignment depends only on the set of patients, the fractions and the seed.
    """
    fractions = _check_fractions(fractions)
    unique = sorted(set(patients))
    n_train, n_val, _ = _sizes(len(unique), fractions, "patients")
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    parts = {
        "train": shuffled[:n_train],
        "val": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }
    return {k: sorted(v) for k, v in parts.items()}


def split_by_slice(
    n_slices: int, sizes: Sequence[int] = PAPER_SPLIT_SIZES, seed: int = 42
) -> dict[str, np.ndarray]:
    """The paper's slice-level split: shuffle slices, cut in the proportions of ``sizes``.

    Returns sorted row indices per stage. With the full 3929-slice set and the default sizes
    the stages hold exactly 3005/393/531 slices.
    """
    total = float(sum(sizes))
    fractions = [s / total for s in sizes]
    n_train, n_val, _ = _sizes(n_slices, fractions, "slices")
    order = np.random.default_rng(seed).permutation(n_slices)
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n_train + n_val]),
        "test": np.sort(order[n_train + n_val :]),
    }


def kfold_patient_split(
    patients: Sequence[str],
    num_folds: int,
    fold: int,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 42,
) -> dict[str, list[str]]:
    """Patient-level k-fold cross-validation: fold ``fold`` of ``num_folds``.

    Patients are shuffled with ``seed`` and dealt into ``num_folds`` folds of near-equal size;
    fold ``fold`` is the test set, so the K test sets are disjoint and cover every patient.
    Validation patients are carved from the remaining ones in the proportion
    ``val / (train + val)`` of ``fractions`` (at least one), the rest train.
    """
    unique = sorted(set(patients))
    if num_folds < 2:
        raise ConfigError(f"data.num_folds={num_folds} must be at least 2 (or null for no folds).")
    if not 0 <= fold < num_folds:
        raise ConfigError(
            f"data.fold={fold} must be in 0..{num_folds - 1} (data.num_folds={num_folds})."
        )
    if len(unique) < num_folds + 2:
        raise DataError(
            f"Only {len(unique)} patients: too few for {num_folds} folds with a training and a "
            "validation patient each. Lower data.num_folds."
        )
    f_train, f_val, _ = _check_fractions(fractions)
    order = np.random.default_rng(seed).permutation(len(unique))
    folds = np.array_split(order, num_folds)
    test = [unique[i] for i in folds[fold]]
    rest = [unique[i] for k, part in enumerate(folds) if k != fold for i in part]
    n_val = max(1, round(len(rest) * f_val / (f_train + f_val)))
    rest_order = np.random.default_rng(seed + 1 + fold).permutation(len(rest))
    val = [rest[i] for i in rest_order[:n_val]]
    train = [rest[i] for i in rest_order[n_val:]]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
