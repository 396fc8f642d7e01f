"""No command writes over another's work, end to end: one writer per run folder (a second
training or a ``resume=`` while one runs, a new training into a finished run's folder), an
evaluation into a run's folder, an export onto its checkpoint, a prediction onto a file, and a
``resume=`` whose checkpoint or data are not the run's any more. Each refusal is one line, and
the folder keeps every byte it had. (The in-process parts: tests/unit/test_runfolder.py.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, cli_env, compose_config, run_cli, train_tiny
from tlunet.builders import build_module
from tlunet.runfolder import LOCK_FILE

pytestmark = pytest.mark.slow


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) and its sha256, but those named in
    ``skip`` and those under a top-level folder named there."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and p.relative_to(folder).parts[0] not in skip
    }


def _one_line(out, pattern: str) -> str:
    """The one ``tlunet error:`` line of a refused command (exit 1, no traceback)."""
    import re

    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "tlunet error" in line]
    assert len(lines) == 1 and lines[0].startswith("tlunet error: "), out.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


#: What the holder keeps writing while it trains.
HOLDERS = ("train.log", "csv", "checkpoints")


def test_one_writer_per_run_folder(synthetic_root: Path, tmp_path: Path) -> None:
    """A training holds its folder: a second training and a ``resume=`` are refused naming it;
    once it is killed its lock is free (the kernel dropped it), a new training into the
    folder is refused for the run it holds, and the next start there removes the temporaries
    the killed checkpoint writes left."""
    run_dir = tmp_path / "run"
    base = [*TINY_RUN, f"data.root={synthetic_root}", f"hydra.run.dir={run_dir}"]
    holder = subprocess.Popen(
        [sys.executable, "-m", "tlunet.train", *base, "trainer.max_epochs=1000"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        lock = run_dir / LOCK_FILE
        while not (run_dir / "config.yaml").exists():  # written once the folder is held
            assert holder.poll() is None and time.monotonic() < deadline, "the holder stopped"
            time.sleep(0.05)
        before = _snapshot(run_dir, skip=HOLDERS)
        holding = rf"'{run_dir}' is being written by tlunet.train \(pid {holder.pid} on "

        # A second training and a resume= of the run, both while it runs (at once: each
        # waits for the other's start-up otherwise).
        contenders = [
            subprocess.Popen(
                [sys.executable, "-m", "tlunet.train", *args],
                cwd=tmp_path,
                env=cli_env(tmp_path),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for args in (base, [f"resume={run_dir}"])
        ]
        second, resumed = (_finished(c) for c in contenders)
        _one_line(second, holding + r".*Wait for it to end, or train into a new folder")
        _one_line(resumed, holding + r".*resume= continues a run once the process")
        assert holder.poll() is None, "the holder stopped while the others were refused"
        after = _snapshot(run_dir, skip=HOLDERS)
        assert after == before  # config.yaml, .hydra/: the holder's, no .hydra-resumed/

        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

    assert lock.exists()  # left by the killed process, holding no lock
    left = run_dir / "checkpoints" / ".last.ckpt.k1ll3d_0.tmp"  # a checkpoint write it died in
    left.write_bytes(b"half a checkpoint")
    kept = _snapshot(run_dir, skip=(LOCK_FILE,))
    again = run_cli(["tlunet.train", *base], cwd=tmp_path)
    _one_line(
        again,
        rf"'{run_dir}' holds another run's results \(checkpoints/.*continue that run with "
        rf"resume={run_dir}",
    )
    # Refused: nothing changed, not even train.log or .hydra/; the free lock was taken and
    # given back (its file goes with it).
    assert _snapshot(run_dir) == kept and not lock.exists()

    # The next start in the folder (here a resume= refused for its override, after taking the
    # folder) removes the temporaries of the killed writer.
    out = run_cli(["tlunet.train", f"resume={run_dir}", "trainer.max_epochs=2"], cwd=tmp_path)
    _one_line(out, r"drop the other overrides")
    assert not left.exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not lock.exists()


def test_evaluate_never_writes_into_a_run_or_an_evaluation(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = _snapshot(run_dir)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    out = run_cli(["tlunet.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}"], tmp_path)
    _one_line(out, rf"'{run_dir}' holds a training run \(checkpoints/best.ckpt, .*metrics.json")
    assert _snapshot(run_dir) == before and not (run_dir / "evaluate.log").exists()

    evaluation = tmp_path / "evaluations" / "A"  # an earlier evaluation's folder
    evaluation.mkdir(parents=True)
    (evaluation / "evaluation.json").write_text("{}\n")
    (evaluation / "metrics.json").write_text('{"test/dice": 0.5}\n')
    (evaluation / "evaluate.log").write_text("[the earlier evaluation's log]\n")
    before = _snapshot(evaluation)
    out = run_cli(["tlunet.evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={evaluation}"], tmp_path)
    _one_line(out, r"holds another evaluation \(metrics.json, evaluation.json\).*name a new folder")
    assert _snapshot(evaluation) == before


def test_export_never_replaces_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(tiny_run / "checkpoints" / "best.ckpt", ckpt)
    trained = ckpt.read_bytes()
    out = run_cli(
        ["tlunet.export", f"ckpt_path={ckpt}", f"output={ckpt}", "format=torchscript"], tmp_path
    )
    _one_line(out, rf"output '{ckpt}' is the checkpoint being exported")
    assert ckpt.read_bytes() == trained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "export.log"]  # Hydra's


def test_predict_onto_a_file_is_one_line_before_the_model_loads(
    tiny_run: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    target = tmp_path / "masks.tif"
    target.write_bytes(b"someone's file")
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    out = run_cli(
        ["tlunet.predict", f"ckpt_path={ckpt}", f"input={patient}", f"output={target}"], tmp_path
    )
    _one_line(out, rf"output '{target}' is a file: output names the folder")
    assert target.read_bytes() == b"someone's file"


def _add_patient(root: Path, source: str, name: str) -> None:
    """A copy of patient ``source`` of ``root`` under the name ``name`` (its files renamed)."""
    (root / name).mkdir()
    for f in (root / source).iterdir():
        shutil.copy(f, root / name / f.name.replace(source, name))


def test_resume_refuses_a_foreign_checkpoint_and_a_changed_split(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """``resume=`` with another network's checkpoint over last.ckpt, then with patients added
    to data.root (which re-splits it): one line each, naming the file and what differs, the
    patients that moved and those added; the run folder keeps its files."""
    data = tmp_path / "kaggle_3m"
    shutil.copytree(synthetic_root, data)
    run_dir = train_tiny(data, tmp_path / "work", "test=false")  # stopped before its test
    last = run_dir / "checkpoints" / "last.ckpt"
    own = last.read_bytes()

    other_cfg = compose_config(
        [*TINY_RUN, "encoder=resnet34", f"paths.output_dir={tmp_path / 'other'}"]
    )
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    other = build_module(other_cfg)
    checkpoint["state_dict"] = other.state_dict()
    checkpoint["hyper_parameters"]["config"] = other.hparams["config"]
    torch.save(checkpoint, last)  # another run's checkpoint copied over the run's
    # A resume= attempt is logged in the run's own log, its Hydra config in .hydra-resumed/.
    attempt = ("train.log", ".hydra-resumed")
    before = _snapshot(run_dir, skip=attempt)
    out = run_cli(["tlunet.train", f"resume={run_dir}"], cwd=tmp_path)
    _one_line(
        out,
        rf"'{last}' holds the weights of another network \(model=unet encoder=resnet34\) than "
        r"the run's config.yaml \(model=unet encoder=resnet18\): .*weights (missing|the run has "
        r"not).*Put the run's own last.ckpt back",
    )
    assert _snapshot(run_dir, skip=attempt) == before

    last.write_bytes(own)
    patients = sorted(p.name for p in data.iterdir() if p.is_dir())
    added = [f"SYN_P{n:03d}_20000101" for n in (7, 8, 9, 10)]
    for name, source in zip(added, patients, strict=False):
        _add_patient(data, source, name)
    before = _snapshot(run_dir, skip=attempt)
    out = run_cli(["tlunet.train", f"resume={run_dir}"], cwd=tmp_path)
    line = _one_line(
        out, rf"The data under '{data}' splits otherwise than when '{last}' was saved \(.*moved: "
    )
    for name in added:
        assert f"{name} (" in line.split("added: ")[1], line
    assert "two validation sets" in line
    # metrics.csv too: not cut for a resume that does not run
    assert _snapshot(run_dir, skip=attempt) == before
