"""One folder, one writer (tlunet.runfolder, tlunet.run.run_folder_writer), outputs that are
never written over (export, predict) and the checks of a resumed checkpoint: in-process.

flock locks belong to an open file description, so a second FolderLock in the same process
conflicts with the first exactly as another process's would (the two-process runs are in
tests/integration/test_run_folder.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pytorch_lightning.utilities import rank_zero_only

from tests.conftest import compose_config
from tlunet.errors import ConfigError
from tlunet.export import check_output
from tlunet.run import check_resume_network, check_resume_split, run_folder_writer
from tlunet.runfolder import LOCK_FILE, FolderLock, hydra_subdir, log_file
from tlunet.slices import run_prediction
from tlunet.utils import atomic_path, is_atomic_temporary


def _train_cfg(folder: Path, *overrides: str):
    return compose_config([f"paths.output_dir={folder}", *overrides])


def _killed_writes(folder: Path) -> list[Path]:
    """Temporaries as atomic_path names them, left by writers killed mid-write."""
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "csv").mkdir(exist_ok=True)
    left = [
        folder / "checkpoints" / ".best.ckpt.k3x_9a2q.tmp",
        folder / "checkpoints" / ".last.ckpt.0abcdefg.tmp",
        folder / ".run.json.zz_01234.tmp",
        folder / "csv" / ".metrics.csv.q1w2e3r4.tmp",
    ]
    for path in left:
        path.write_bytes(b"half a checkpoint")
    return left


def test_atomic_temporaries_are_recognised_by_name(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "best.ckpt") as tmp:
        assert is_atomic_temporary(tmp.name), tmp.name
        tmp.write_bytes(b"x")
    for name in ("best.ckpt", ".hydra", ".best.ckpt.tmp", "x.k3x_9a2q.tmp", ".a.SHOUTING.tmp"):
        assert not is_atomic_temporary(name), name


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = FolderLock(tmp_path, "tlunet.train")
    first.acquire("")
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "tlunet.train"
    with pytest.raises(
        ConfigError, match=rf"being written by tlunet.train \(pid {os.getpid()} on "
    ):
        FolderLock(tmp_path, "tlunet.evaluate").acquire("Wait for it to end.")
    # Hydra writes no .hydra/ (.hydra-resumed/) into a folder another process writes.
    assert hydra_subdir(str(tmp_path), ".hydra", "train") is None
    assert hydra_subdir(str(tmp_path), ".hydra-resumed", "resume") is None
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert hydra_subdir(str(tmp_path), ".hydra", "train") == ".hydra"


def test_a_lock_file_left_by_a_dead_process_is_free(tmp_path: Path) -> None:
    # What a killed writer leaves: the file with its name, no lock (the kernel dropped it).
    (tmp_path / LOCK_FILE).write_text('{"pid": 999999, "host": "gone", "command": "x"}\n')
    lock = FolderLock(tmp_path, "tlunet.train")
    lock.acquire("")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_new_training_into_a_folder_holding_a_run_is_refused(tmp_path: Path) -> None:
    left = _killed_writes(tmp_path)
    (tmp_path / "config.yaml").write_text("old: run\n")
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"the old model")
    held = r"holds another run's results \(checkpoints/best\.ckpt"
    with pytest.raises(ConfigError, match=held) as refused:
        with run_folder_writer(_train_cfg(tmp_path)):
            pytest.fail("the body ran")
    assert f"continue that run with resume={tmp_path}" in str(refused.value)
    assert all(p.exists() for p in left)  # a refused command changes nothing there
    assert not (tmp_path / LOCK_FILE).exists()
    assert hydra_subdir(str(tmp_path), ".hydra", "train") is None  # the run's .hydra/ stays its own


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("old: attempt\n")  # no checkpoint, no results
    with run_folder_writer(_train_cfg(tmp_path)):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_writer_removes_stale_temporaries_and_releases_on_failure(tmp_path: Path) -> None:
    left = _killed_writes(tmp_path)
    (tmp_path / "config.yaml").write_text("a: run\n")
    keep = [
        tmp_path / "checkpoints" / "last.ckpt",
        tmp_path / ".notes.tmp",
        tmp_path / "checkpoints" / ".best.onnx.abcdefgh.tmp",  # an export's, maybe running
    ]
    for path in keep:
        path.write_bytes(b"keep")
    cfg = _train_cfg(tmp_path, f"resume={tmp_path}")
    with pytest.raises(RuntimeError, match="the run failed"):
        with run_folder_writer(cfg):
            assert not any(p.exists() for p in left)
            assert all(p.exists() for p in keep)
            with pytest.raises(ConfigError, match="resume= continues a run once"):
                with run_folder_writer(cfg):  # a second resume= meanwhile
                    pytest.fail("two writers")
            raise RuntimeError("the run failed")
    # Released although the body failed: the next job (an in-process sweep) takes it.
    assert not (tmp_path / LOCK_FILE).exists()
    with run_folder_writer(cfg):
        pass


def test_other_ddp_ranks_take_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"written by rank 0")
    holder = FolderLock(tmp_path, "tlunet.train")
    holder.acquire("")  # rank 0
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with run_folder_writer(_train_cfg(tmp_path)):
        pass
    holder.release()


def test_export_never_replaces_a_checkpoint_or_another_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"trained")
    (tmp_path / "run" / "metrics.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"someone's model")
    cases = {
        ckpt: "is the checkpoint being exported",
        tmp_path / "model.ckpt": r"is named as a checkpoint \(\.ckpt\)",
        tmp_path / "run": "is a folder",
        tmp_path / "model.pt": "exists and is not an earlier export",
        tmp_path / "run" / "metrics": "sidecar '.*metrics.json' exists and is not one",
    }
    for output, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_output(output, ckpt)
    earlier = tmp_path / "best.onnx"  # an earlier export (model and sidecar): replaced
    earlier.write_bytes(b"onnx")
    sidecar = {"image_size": 64, "mean": [0, 0, 0], "std": [1, 1, 1], "threshold": 0.5}
    Path(f"{earlier}.json").write_text(json.dumps({**sidecar, "outputs": []}))
    check_output(earlier, ckpt)
    check_output(tmp_path / "new.onnx", ckpt)


def _never_load():
    pytest.fail("the model was loaded before the output was checked")


def test_prediction_output_is_checked_before_the_model_loads(
    synthetic_root: Path, tmp_path: Path
) -> None:
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    nifti = {"channels": "all"}
    a_file = tmp_path / "predictions"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output '.*predictions' is a file"):
        run_prediction(patient, a_file, _never_load, 4, nifti)
    with pytest.raises(ConfigError, match="lies under the file"):
        run_prediction(patient, a_file / "sub", _never_load, 4, nifti)
    earlier = tmp_path / "earlier"
    (earlier / patient.name).mkdir(parents=True)
    (earlier / "tumour_area.csv").write_text("file\n")  # of a patient folder's prediction
    (earlier / patient.name / "tumour_area.csv").write_text("file\n")  # of a kaggle_3m folder's
    for input_ in (patient, synthetic_root):
        with pytest.raises(ConfigError, match=r"already holds a prediction \(.*tumour_area.csv"):
            run_prediction(input_, earlier, _never_load, 4, nifti)
    assert (earlier / "tumour_area.csv").read_text() == "file\n"


class _Net(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)


class _Module(torch.nn.Module):
    has_aux = False

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = _Net(width)


def test_resume_refuses_another_networks_or_another_runs_checkpoint(tmp_path: Path) -> None:
    cfg = _train_cfg(tmp_path / "run")
    stored = {"model": {"name": "unet"}, "encoder": {"name": "resnet34"}}
    other = {
        "state_dict": _Module(8).state_dict(),
        "hyper_parameters": {"config": {**stored, "paths": {"output_dir": str(tmp_path / "run")}}},
    }
    with pytest.raises(
        ConfigError,
        match=r"'last.ckpt' holds the weights of another network \(model=unet encoder=resnet34\) "
        r"than the run's config.yaml \(model=unet encoder=densenet121\): 2 weights of other "
        r"shapes \(e.g. net.conv.weight: \(8, 3, 3, 3\) in the file, \(4, 3, 3, 3\)",
    ):
        check_resume_network(Path("last.ckpt"), other, _Module(4), cfg)
    copied = {
        "state_dict": _Module(4).state_dict(),
        "hyper_parameters": {"config": {**stored, "paths": {"output_dir": str(tmp_path / "B")}}},
    }
    with pytest.raises(ConfigError, match=r"was written by the run in '.*B', not by the run in"):
        check_resume_network(Path("last.ckpt"), copied, _Module(4), cfg)
    copied["hyper_parameters"]["config"]["paths"]["output_dir"] = str(tmp_path / "run")
    check_resume_network(Path("last.ckpt"), copied, _Module(4), cfg)  # its own: accepted


class _Split:
    root = "/data/kaggle_3m"

    def __init__(self, stages: dict[str, list[str]]) -> None:
        self.stages = stages

    def stage_patients(self, stage: str) -> list[str]:
        return self.stages[stage]


def test_resume_refuses_data_that_splits_otherwise() -> None:
    recorded = {"train": ["A", "B", "C"], "val": ["D"], "test": ["E"]}
    checkpoint = {"tlunet": {"patients": recorded}}
    check_resume_split(Path("last.ckpt"), checkpoint, _Split(recorded))  # unchanged: accepted
    now = {"train": ["A", "B", "D", "F"], "val": ["C"], "test": ["G"]}
    with pytest.raises(ConfigError) as refused:
        check_resume_split(Path("last.ckpt"), checkpoint, _Split(now))
    message = str(refused.value)
    assert "'/data/kaggle_3m' splits otherwise than when 'last.ckpt' was saved" in message
    assert "moved: C (train -> val), D (val -> train); added: F (train), G (test); " in message
    assert "removed: E (was test)" in message and "two validation sets" in message


def test_a_refused_command_starts_no_log_and_no_hydra_folder(tmp_path: Path) -> None:
    """resume= of a folder that is no run, or of a complete run, and a training or an
    evaluation into a folder holding results: Hydra's log goes to the null device and it
    writes no .hydra/ there."""
    user = tmp_path / "user"
    user.mkdir()
    assert log_file(str(user), "train.log", "resume") == os.devnull
    assert hydra_subdir(str(user), ".hydra-resumed", "resume") is None
    assert log_file(str(user), "train.log", "train") == str(user / "train.log")
    (user / "config.yaml").write_text("a: run\n")
    assert log_file(str(user), "train.log", "resume") == str(user / "train.log")
    assert log_file(str(user), "evaluate.log", "evaluate") == os.devnull  # it holds a run
    (user / "metrics.json").write_text("{}")
    assert log_file(str(user), "train.log", "resume") == os.devnull  # complete
    assert log_file(str(user), "train.log", "train") == os.devnull
