"""tlunet.utils: the one atomic writer every result file and checkpoint goes through."""

from __future__ import annotations

import argparse
import io
import stat
import sys
from pathlib import Path

import pytest

from tlunet.errors import ConfigError, WriteError
from tlunet.utils import (
    atomic_path,
    check_folder,
    is_atomic_temporary,
    names_and_more,
    not_a_folder,
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


# -- issue 21, second round: one way to find what blocks a folder, one way to list names -------
def test_names_and_more() -> None:
    assert names_and_more([], 3) == ""
    assert names_and_more(["a", "b"], 3) == "a, b"
    assert names_and_more(["a", "b", "c"], 3) == "a, b, c"
    assert names_and_more(["a", "b", "c", "d", "e"], 3) == "a, b, c and 2 more"
    assert names_and_more(["'x'", "'y'"], 1) == "'x' and 1 more"


def test_what_blocks_a_folder(tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    (tmp_path / "dir_link").symlink_to(tmp_path)
    assert not_a_folder(tmp_path / "new" / "deeper") is None
    assert not_a_folder(tmp_path / "dir_link" / "new") is None
    assert not_a_folder(a_file) == (a_file, "a file")
    assert not_a_folder(a_file / "sub" / "deeper") == (a_file, "a file")
    assert not_a_folder(broken / "sub") == (broken, "a broken link")
    assert check_folder(tmp_path / "new", "x", "") == tmp_path / "new"
    with pytest.raises(
        ConfigError, match=rf"^setting '{broken}' is a broken link, not a folder\. Fix"
    ):
        check_folder(broken, "setting", "Fix it.")


def test_atomic_temporaries_of_named_files(tmp_path: Path) -> None:
    with atomic_path(tmp_path / ".synthetic.json") as tmp:
        assert is_atomic_temporary(tmp.name, of=[".synthetic.json", "README.md"])
        assert not is_atomic_temporary(tmp.name, of=["README.md"])
    assert not is_atomic_temporary("..synthetic.json.abc.tmp", of=[".synthetic.json"])


def test_an_atomic_write_without_its_folder_fails_rather_than_create_it(tmp_path: Path) -> None:
    """make_parents=False: a cache folder another process removed stays removed."""
    with (
        pytest.raises((WriteError, OSError)),
        atomic_path(tmp_path / "gone" / "stamps.json", make_parents=False) as tmp,
    ):
        tmp.write_text("{}")
    assert not (tmp_path / "gone").exists()


def test_a_prediction_output_that_is_a_broken_link_is_one_line(tmp_path: Path) -> None:
    """slices.check_output_folder walks up as the cache's check does (utils.not_a_folder): a
    broken link is refused before anything is read, not met by mkdir later."""
    from tlunet.slices import check_output_folder

    broken = tmp_path / "predictions"
    broken.symlink_to(tmp_path / "unmounted")
    with pytest.raises(ConfigError, match=rf"^output '{broken}' is a broken link: output names"):
        check_output_folder(broken)
    with pytest.raises(ConfigError, match=rf"lies under the broken link '{broken}'"):
        check_output_folder(broken / "sub")
    check_output_folder(tmp_path / "new" / "sub")
