"""Post-processing of predicted volumes and automatic threshold selection, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tlunet.errors import ConfigError
from tlunet.postprocess import (
    best_threshold,
    parse_postprocess,
    pick_threshold,
    postprocess_volume,
    threshold_curve,
)


def _volume() -> np.ndarray:
    v = np.zeros((3, 8, 8), bool)
    v[0:2, 1:3, 1:3] = True  # 8 voxels across two slices: one 3D component
    v[2, 6, 6] = True  # 1 voxel
    v[1, 5:7, 0:2] = True  # 4 voxels
    return v


def test_largest_component_is_3d() -> None:
    out = postprocess_volume(_volume(), parse_postprocess("largest_component"))
    assert out.sum() == 8 and out[0:2, 1:3, 1:3].all()


def test_min_size_removes_small_components() -> None:
    out = postprocess_volume(_volume(), parse_postprocess("min_size:4"))
    assert out.sum() == 12 and not out[2, 6, 6]
    assert postprocess_volume(_volume(), None).sum() == 13
    assert not postprocess_volume(np.zeros((2, 4, 4)), parse_postprocess("largest_component")).any()


@pytest.mark.parametrize("spec", ["biggest", "min_size:0", "min_size=x", "min_size"])
def test_bad_postprocess(spec: str) -> None:
    with pytest.raises(ConfigError, match="eval.postprocess"):
        parse_postprocess(spec)


def test_best_threshold_maximises_dice() -> None:
    truth = np.array([1, 1, 0, 0, 0], bool).reshape(1, 1, 5)
    probs = np.array([0.9, 0.35, 0.3, 0.1, 0.05]).reshape(1, 1, 5)
    # t <= 0.30 adds a false positive; 0.30 < t <= 0.35 is perfect; above 0.35 misses one.
    threshold, dice = best_threshold([(probs, truth)])
    assert threshold == pytest.approx(0.35) and dice == pytest.approx(1.0)


def test_best_threshold_counts_the_post_processing() -> None:
    """Tuned with the post-processing its row applies: a low threshold that adds a separate
    false-positive component is free once largest_component removes it."""
    truth = np.zeros((1, 1, 9), bool)
    truth[0, 0, :3] = True
    probs = np.array([0.9, 0.9, 0.2, 0.0, 0.0, 0.0, 0.3, 0.3, 0.0]).reshape(1, 1, 9)
    # Plain: t <= 0.2 finds all 3 but adds 2 FP (Dice 6/8); t > 0.3 misses one (Dice 4/5).
    plain, dice_plain = best_threshold([(probs, truth)])
    assert plain == pytest.approx(0.35) and dice_plain == pytest.approx(4 / 5)
    # With largest_component the 2-voxel stray component is dropped: 0.05 is perfect.
    spec = parse_postprocess("largest_component")
    tuned, dice_pp = best_threshold([(probs, truth)], spec)
    assert tuned == pytest.approx(0.05) and dice_pp == pytest.approx(1.0)
    # Summed over volumes, not averaged: a second, empty volume adds nothing.
    assert best_threshold([(probs, truth), (np.zeros((1, 1, 9)), np.zeros((1, 1, 9)))]) == (
        plain,
        dice_plain,
    )


def test_threshold_curve_is_what_the_threshold_is_chosen_from() -> None:
    """threshold.png draws this curve: its maximum is the tuned threshold."""
    truth = np.array([1, 1, 0, 0, 0], bool).reshape(1, 1, 5)
    probs = np.array([0.9, 0.35, 0.3, 0.1, 0.05]).reshape(1, 1, 5)
    grid, dices = threshold_curve([(probs, truth)])
    assert len(grid) == len(dices) == 19 and grid[0] == 0.05 and grid[-1] == 0.95
    by_t = dict(zip(grid.tolist(), dices.tolist(), strict=True))
    assert by_t[0.3] == pytest.approx(4 / 5)  # 2 TP + 1 FP
    assert by_t[0.35] == pytest.approx(1.0) and by_t[0.5] == pytest.approx(2 / 3)
    assert pick_threshold(grid, dices) == best_threshold([(probs, truth)])
    assert pick_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.9, 0.9])) == (0.2, 0.9)


def test_min_size_spellings() -> None:
    assert parse_postprocess("min_size:7") == parse_postprocess("min_size=7") == ("min_size", 7)
