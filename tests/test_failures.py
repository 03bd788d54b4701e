"""Disk full, unwritable targets, and two runs at once: a clear error, exit 2, nothing lost or left."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_crash_safety import make_legacy_checkpoint, same, snapshot
from qkvconv.cli import app
from qkvconv.io.transaction import DirectoryLock, sibling

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run_cli(args: list[str], file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qkvconv.cli", *args], env=env, capture_output=True,
                          text=True, preexec_fn=limit)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    make_legacy_checkpoint(tmp_path / "parent" / "ckpt", n_layer=2, n_embd=256)
    return tmp_path / "parent" / "ckpt"


def leftovers(directory: Path) -> list[str]:
    hidden = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    return hidden + ([sibling(directory.resolve()).name] if sibling(directory.resolve()).exists() else [])


@pytest.mark.parametrize("with_out", [False, True], ids=["in-place", "out"])
def test_disk_full_is_exit_2_and_leaves_the_original(checkpoint: Path, with_out: bool, tmp_path: Path) -> None:
    before = snapshot(checkpoint)
    size = (checkpoint / "lit_model.pth").stat().st_size
    args = ["upgrade", str(checkpoint)] + (["--out", str(tmp_path / "out")] if with_out else [])
    result = run_cli(args, file_size_limit=size // 3)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr
    assert same(snapshot(checkpoint), before)
    assert leftovers(checkpoint) == []
    assert not (tmp_path / "out").exists() and not sibling(tmp_path / "out").exists()


def chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_unwritable_checkpoint_is_exit_2(checkpoint: Path) -> None:
    """Read-only directory and parent (root ignores permission bits, so the immutable flag is used)."""
    if not (chattr("+i", checkpoint) and chattr("+i", checkpoint.parent)):
        pytest.skip("this filesystem has no immutable flag (chattr)")
    try:
        before = snapshot(checkpoint)
        result = run_cli(["upgrade", str(checkpoint)])
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
        assert same(snapshot(checkpoint), before)
    finally:
        chattr("-i", checkpoint)
        chattr("-i", checkpoint.parent)
    assert leftovers(checkpoint) == []


def test_unwritable_parent_falls_back_to_staging_inside(checkpoint: Path) -> None:
    """The swap needs a writable parent; without one the upgrade still succeeds, through the journal."""
    if not chattr("+i", checkpoint.parent):
        pytest.skip("this filesystem has no immutable flag (chattr)")
    try:
        result = run_cli(["upgrade", str(checkpoint)])
    finally:
        chattr("-i", checkpoint.parent)
    assert result.returncode == 0, result.stderr
    assert run_cli(["inspect", str(checkpoint), "--expect", "current"]).returncode == 0
    assert leftovers(checkpoint) == []


def test_unwritable_out_is_exit_2(checkpoint: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not chattr("+i", locked):
        pytest.skip("this filesystem has no immutable flag (chattr)")
    try:
        result = run_cli(["upgrade", str(checkpoint), "--out", str(locked / "new")])
    finally:
        chattr("-i", locked)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert list(locked.iterdir()) == []


def test_a_second_run_on_a_locked_directory_refuses(checkpoint: Path) -> None:
    before = snapshot(checkpoint)
    with DirectoryLock(checkpoint):
        result = runner.invoke(app, ["upgrade", str(checkpoint)])
    assert result.exit_code == 2
    assert "another qkvconv run is working on" in result.output
    assert same(snapshot(checkpoint), before)


def test_two_runs_at_once_do_not_corrupt(checkpoint: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "qkvconv.cli", "upgrade", str(checkpoint)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # one upgrades; the other either refused (locked) or found it already current
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        assert any("another qkvconv run" in err for _, err in results)
    assert run_cli(["inspect", str(checkpoint), "--expect", "current"]).returncode == 0
    assert run_cli(["verify", str(checkpoint), str(checkpoint)]).returncode == 0
    assert leftovers(checkpoint) == []
