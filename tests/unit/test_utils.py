"""tlunet.utils: the one atomic writer every result file and checkpoint goes through."""

from __future__ import annotations

import argparse
import io
import stat
import sys
from pathlib import Path

import pytest

from tlunet.utils import (
    atomic_path,
    progress,
    show_progress,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_path_replaces_the_file_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "result.txt"
    write_text_atomic(target, "first\n")
    assert target.read_text() == "first\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by colleagues

    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half a fil")
        raise RuntimeError("disk full")
    assert target.read_text() == "first\n"  # the previous content, never a half-written one
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]  # no temp left

    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("second\n")
        assert target.read_text() == "first\n"  # not visible before the rename
    assert target.read_text() == "second\n"


def test_json_writer_turns_non_finite_numbers_into_null(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "m.json", {"b": float("nan"), "a": [1.5, float("inf")]})
    assert path.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": null\n}\n'


def test_one_dice_and_iou_for_numbers_arrays_and_tensors() -> None:
    import numpy as np
    import torch

    from tlunet.overlap import dice_from_counts, iou_from_counts

    assert dice_from_counts(3, 1, 1) == pytest.approx(0.75)  # 6 / 8
    assert iou_from_counts(3, 1, 1) == pytest.approx(0.6)
    assert dice_from_counts(0, 0, 0) == 1.0 and iou_from_counts(0, 0, 0) == 1.0  # both empty
    assert dice_from_counts(0, 2, 0) == 0.0
    counts = ([3, 0, 0], [1, 0, 4], [1, 0, 0])
    expected = [0.75, 1.0, 0.0]
    assert np.allclose(dice_from_counts(*map(np.array, counts)), expected)
    tensor = dice_from_counts(*(torch.tensor(c) for c in counts))
    assert tensor.dtype == torch.float64 and torch.allclose(tensor, torch.tensor(expected).double())


def test_tensors_load_safely_or_fail_naming_the_file(tmp_path: Path) -> None:
    import torch

    from tlunet.errors import ConfigError
    from tlunet.utils import load_tensors_safely

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_tensors_safely(good, "weights ")["w"], torch.ones(2))
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": argparse.Namespace(w=1)}, pickled)  # an object: needs pickled code to load
    with pytest.raises(ConfigError, match=r"Cannot load weights '.*pickled\.pt' safely"):
        load_tensors_safely(pickled, "weights ")


def test_progress_is_silent_off_a_terminal_and_yields_every_item(capfd) -> None:
    """pytest captures stdout and stderr: no terminal, so no bar, and nothing is lost."""
    assert not show_progress()
    items = list(progress(iter(range(500)), "Counting", total=500))
    assert items == list(range(500))
    assert list(progress([], "Nothing")) == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_still_yields_every_item(monkeypatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert show_progress()
    outer = []
    for i in progress(range(3), "Outer"):
        outer.append((i, list(progress(range(i), "Inner"))))  # nested: plain, no second bar
    assert outer == [(0, []), (1, [0]), (2, [0, 1])]
    assert "Outer" in terminal.getvalue() and "Inner" not in terminal.getvalue()
    # A loop left by an error stops its bar at once: the error's message is not drawn over,
    # and the next loop has its bar.
    with pytest.raises(ValueError, match="bad slice"):
        for i in progress(range(5), "Failing"):
            if i == 2:
                raise ValueError("bad slice")
    assert list(progress(range(2), "After")) == [0, 1]
    assert "After" in terminal.getvalue()
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of a distributed run: quiet
    assert not show_progress()
