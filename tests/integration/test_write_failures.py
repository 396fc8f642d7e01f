"""A write that fails for the disk's sake (here a file size limit, ``RLIMIT_FSIZE``, standing
in for a full disk: Python ignores SIGXFSZ, so the write raises ``OSError`` EFBIG) ends in one
``tlunet error`` line naming the file and what is intact, exit status 1, no partial file; a
run whose checkpoint write failed continues with ``resume=`` once the limit is lifted."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, cli_env

#: Runs tlunet.train with ``RLIMIT_FSIZE`` lowered to 1 MB just before checkpoint write
#: number ``FAIL_AT`` (argv[1]): earlier checkpoints are complete, that one fails for real.
TRAIN_WITH_LIMIT = textwrap.dedent(
    """
    import resource, runpy, sys
    from tlunet import callbacks

    fail_at = int(sys.argv.pop(1))
    original = callbacks.AtomicCheckpointIO.save_checkpoint
    calls = []

    def save(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) >= fail_at:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        return original(self, checkpoint, path, storage_options)

    callbacks.AtomicCheckpointIO.save_checkpoint = save
    sys.argv[0] = "tlunet.train"
    runpy.run_module("tlunet.train", run_name="__main__", alter_sys=True)
    """
)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tlunet error")]


@pytest.mark.slow
def test_failed_checkpoint_write_is_one_line_and_resume_continues(
    synthetic_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "train_with_limit.py"
    script.write_text(TRAIN_WITH_LIMIT)
    overrides = [
        *[o for o in TINY_RUN if not o.startswith("trainer.max_epochs")],
        "trainer.max_epochs=3",
        f"data.root={synthetic_root}",
        f"hydra.run.dir={run_dir}",
    ]
    out = _run([str(script), "3", *overrides], tmp_path)  # epoch 0's checkpoints succeed
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = _error_lines(out.stderr)
    assert len(lines) == 1, out.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    assert f"'{ckpt_dir}" in lines[0] and "File too large" in lines[0]
    assert "last complete checkpoint" in lines[0] and f"resume={run_dir}" in lines[0]
    assert not [p for p in ckpt_dir.iterdir() if p.suffix != ".ckpt"]  # no partial file
    assert (ckpt_dir / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()

    out = _run(["-m", "tlunet.train", f"resume={run_dir}"], tmp_path)  # the limit lifted
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 3
    assert (run_dir / "metrics.json").is_file()


METRICS_WITH_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from tlunet.cli import user_errors_exit
    from tlunet.utils import write_json_atomic

    @user_errors_exit
    def main():
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        write_json_atomic(sys.argv[1], {"test/dice": list(range(10000))}, sys.argv[2] or None)

    main()
    """
)


@pytest.mark.parametrize("previous", [None, '{"test/dice": 0.5}\n'])
def test_failed_metrics_write_is_one_line_and_leaves_no_partial_file(
    tmp_path: Path, previous: str | None
) -> None:
    script = tmp_path / "write_metrics.py"
    script.write_text(METRICS_WITH_LIMIT)
    target = tmp_path / "run" / "metrics.json"
    target.parent.mkdir()
    if previous is not None:
        target.write_text(previous)
    out = _run([str(script), str(target), ""], tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and f"Cannot write '{target}'" in lines[0], out.stderr
    assert "File too large" in lines[0] and "ulimit -f" in lines[0]
    if previous is None:
        assert "no partial 'metrics.json' was left" in lines[0]
        assert list(target.parent.iterdir()) == []
    else:
        assert "keeps its previous content" in lines[0]
        assert target.read_text() == previous and list(target.parent.iterdir()) == [target]


def test_failed_cache_write_is_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    """The decoded-slice cache under a file size limit: one line naming the cache file, the
    inputs intact, no cache folder (complete or partial) left behind."""
    script = tmp_path / "cache_with_limit.py"
    script.write_text(
        textwrap.dedent(
            """
            import resource, sys
            from tlunet.cli import user_errors_exit
            from tlunet.data.cache import decode_slices
            from tlunet.data.index import index_kaggle3m

            @user_errors_exit
            def main():
                records = index_kaggle3m(sys.argv[1])
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
                decode_slices(records, sys.argv[1], sys.argv[2])

            main()
            """
        )
    )
    cache = tmp_path / "cache"
    out = _run([str(script), str(synthetic_root), str(cache)], tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and f"'{cache}" in lines[0] and "File too large" in lines[0]
    assert "input slices are intact" in lines[0]
    assert list(cache.iterdir()) == []


#: Runs ``python -m <command> ...`` with ``RLIMIT_FSIZE`` lowered to ``<limit>`` bytes when
#: ``<module.function>`` is first called: ``limit_at.py <module.function> <limit> <command> ...``.
#: Everything the command writes from then on meets a "full disk".
LIMIT_AT = textwrap.dedent(
    """
    import importlib, resource, runpy, sys

    target, limit, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = [command, *sys.argv[4:]]
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, attr)

    def limited(*args, **kwargs):
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        return original(*args, **kwargs)

    setattr(module, attr, limited)
    runpy.run_module(command, run_name="__main__", alter_sys=True)
    """
)


def _limited(tmp_path: Path, target: str, limit: int, command: list[str]):
    script = tmp_path / "limit_at.py"
    script.write_text(LIMIT_AT)
    out = _run([str(script), target, str(limit), *command], tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = _error_lines(out.stderr)
    assert len(lines) == 1, out.stderr[-3000:]
    # EFBIG, or a short write where the writer (numpy's tofile) keeps no errno
    assert "File too large" in lines[0] or "only part of it was written" in lines[0], lines[0]
    return lines[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_failed_prediction_write_is_one_line(tiny_run: Path, synthetic_root_128: Path, tmp_path):
    patient = sorted(p for p in synthetic_root_128.iterdir() if p.is_dir())[0]
    out_dir = tmp_path / "pred"
    line = _limited(
        tmp_path,
        "tlunet.slices.segment",
        1024,  # a 128x128 mask is 16 KB
        [
            "tlunet.predict",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            f"input={patient}",
            f"output={out_dir}",
        ],
    )
    assert f"Cannot write '{out_dir / 'masks'}" in line and "input slices are intact" in line
    assert not _leftovers(out_dir) and not list((out_dir / "masks").iterdir())
    assert not (out_dir / "tumour_area.csv").exists()


@pytest.mark.slow
def test_failed_export_write_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    output = tmp_path / "model.onnx"
    line = _limited(
        tmp_path,
        "tlunet.utils.atomic_path",  # before tlunet.export imports it
        1 << 20,  # the network is about 57 MB
        ["tlunet.export", f"ckpt_path={ckpt}", f"output={output}"],
    )
    assert f"Cannot write '{output}'" in line and f"the checkpoint '{ckpt}' is intact" in line
    assert list(tmp_path.glob("model.onnx*")) == [] and not _leftovers(tmp_path)


@pytest.mark.slow
def test_failed_csv_write_of_evaluate_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    eval_dir = tmp_path / "eval"
    line = _limited(
        tmp_path,
        "tlunet.utils.write_text_atomic",  # before tlunet.evaluate imports it
        64,
        [
            "tlunet.evaluate",
            f"ckpt_path={tiny_run / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={eval_dir}",
            "data.cache_dir=null",  # decoded in memory: the first file written is a CSV
        ],
    )
    assert f"Cannot write '{eval_dir}" in line and ".csv'" in line
    assert not _leftovers(eval_dir) and not (eval_dir / "metrics.json").exists()
    assert not [p for p in eval_dir.glob("*.csv")]  # none partial


@pytest.mark.slow
def test_failed_run_json_write_then_resume_writes_the_run_files(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Training ends, then run.json cannot be written: one line saying the checkpoints are
    intact and how to finish; ``resume=`` then tests the last checkpoint and writes the files."""
    run_dir = tmp_path / "run"
    line = _limited(
        tmp_path,
        "tlunet.run.write_json_atomic",
        256,
        [
            "tlunet.train",
            *TINY_RUN,
            f"data.root={synthetic_root}",
            f"hydra.run.dir={run_dir}",
        ],
    )
    assert f"Cannot write '{run_dir / 'run.json'}'" in line
    assert "checkpoints" in line and f"resume={run_dir}" in line
    assert not (run_dir / "run.json").exists() and not (run_dir / "metrics.json").exists()
    assert not _leftovers(run_dir)
    out = _run(["-m", "tlunet.train", f"resume={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["test/dice"] >= 0
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 1
