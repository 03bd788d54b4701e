"""Modes and owners: an in-place upgrade keeps those of the directory and of every file it replaces
(both commit paths of transaction.py); a new --out directory is this user's, so the umask decides."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import qkvconv.io.transaction as transaction
from conftest import FIXTURES
from qkvconv.ops.convert import convert
from qkvconv.io.transaction import sibling
from qkvconv.ops.upgrade import upgrade

ROOT = Path(__file__).resolve().parent.parent

# per fixture: the files an upgrade rewrites (the others are hard-linked or left in place)
REWRITTEN = {
    "gqa_llama": {"lit_model.pth", "model_config.yaml"},
    "lora_qkv_gqa": {"lit_model.pth.lora", "hyperparameters.yaml", "model_config.yaml"},
}
# a private checkpoint with files of different modes, and a read-only one
PRIVATE = (0o700, {"model_config.yaml": 0o640, "hyperparameters.yaml": 0o604, "reference.pt": 0o400}, 0o600)
READ_ONLY = (0o555, {}, 0o444)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def set_modes(directory: Path, modes: tuple[int, dict[str, int], int]) -> dict[str, int]:
    """Give the files and then the directory their modes; return what each file should keep."""
    dir_mode, per_file, default = modes
    wanted = {}
    for p in directory.iterdir():
        wanted[p.name] = per_file.get(p.name, default)
        os.chmod(p, wanted[p.name])
    os.chmod(directory, dir_mode)
    return wanted


def snapshot_modes(directory: Path) -> tuple[int, dict[str, int]]:
    return mode(directory), {p.name: mode(p) for p in directory.iterdir()}


def inodes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in directory.iterdir()}


def upgraded(directory: Path) -> bool:
    name = "lit_model.pth.lora" if (directory / "lit_model.pth.lora").exists() else "lit_model.pth"
    sd = torch.load(directory / name, weights_only=True)
    sd = sd.get("model", sd)
    return any(".attn.qkv." in k for k in sd) and not any(".attn.attn." in k for k in sd)


@pytest.fixture
def writable_again(tmp_path: Path) -> Iterator[None]:
    """pytest removes tmp_path later; leave nothing read-only behind (only root ignores modes)."""
    yield
    for root, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


def force_path(monkeypatch: pytest.MonkeyPatch, how: str, tmp_path: Path) -> None:
    """Send the commit down one of transaction.py's paths. Tests run as root, whom an unwritable
    parent does not stop, so the journal fallback is forced the way the crash tests do it."""
    if how == "no-exchange":  # a filesystem without RENAME_EXCHANGE: built beside, then journal
        monkeypatch.setattr(transaction, "exchange", lambda a, b: False)
    elif how == "parent-unwritable":  # the sibling build cannot be made: staged inside, journal
        monkeypatch.setattr(transaction, "sibling", lambda d: tmp_path / "no-such-parent" / f".{d.name}")


@pytest.mark.parametrize("modes", [PRIVATE, READ_ONLY], ids=["private", "read-only"])
@pytest.mark.parametrize("how", ["exchange", "no-exchange", "parent-unwritable"])
@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_in_place_upgrade_keeps_every_mode(legacy, name: str, how: str, modes, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, writable_again) -> None:
    target = legacy(name)
    wanted = set_modes(target, modes)
    before = inodes(target)
    force_path(monkeypatch, how, tmp_path)
    upgrade(target)
    assert upgraded(target)
    after = inodes(target)
    assert {n for n in before if after[n] != before[n]} == REWRITTEN[name]  # rewritten files are covered
    assert snapshot_modes(target) == (modes[0], wanted)
    assert not sibling(target.resolve()).exists()
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another owner needs root")
@pytest.mark.parametrize("how", ["exchange", "no-exchange"])
def test_in_place_upgrade_keeps_owner_and_group(legacy, how: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = legacy("lora_qkv_gqa")
    for p in [target, *target.iterdir()]:
        os.chown(p, 1234, 5678)
    force_path(monkeypatch, how, tmp_path)
    upgrade(target)
    assert upgraded(target)
    assert {p.name: (p.stat().st_uid, p.stat().st_gid) for p in [target, *target.iterdir()]} == {
        p.name: (1234, 5678) for p in [target, *target.iterdir()]
    }


# --- as an owner without root's powers: root ignores a 0555 directory, its owner cannot -------------

CHILD = """
import sys
import qkvconv.io.transaction as t
if sys.argv[1] == "no-exchange":
    t.exchange = lambda a, b: False
from qkvconv.cli import main
sys.argv = ["qkvconv", "upgrade", "--no-verify", sys.argv[2]]
main()
"""


def _without_root_powers() -> None:
    """Drop the capabilities that let root ignore modes (chown, DAC override and read search, fowner)
    from the bounding set: the exec'd child, still uid 0, then meets modes as the directory's owner."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (0, 1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def upgrade_as_owner(target: Path, how: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QKVCONV_CRASH_POINT", None)
    try:
        return subprocess.run([sys.executable, "-c", CHILD, how, str(target)], env=env, capture_output=True,
                              text=True, preexec_fn=_without_root_powers, timeout=120)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop root's capabilities here: {e}")


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                    reason="a root process dropping its capabilities (Linux) plays the owner")
def test_read_only_in_place_upgrade_as_owner(legacy, tmp_path: Path, writable_again) -> None:
    """The build stays writable until just before the swap, and the old 0555 version is deleted."""
    target = legacy("gqa_llama")
    wanted = set_modes(target, READ_ONLY)
    proc = upgrade_as_owner(target, "exchange")
    assert proc.returncode == 0, proc.stderr
    assert upgraded(target)
    assert snapshot_modes(target) == (0o555, wanted)
    assert not sibling(target.resolve()).exists(), "the old version was left behind"


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"),
                    reason="a root process dropping its capabilities (Linux) plays the owner")
def test_read_only_journal_fallback_refuses_as_owner(legacy, tmp_path: Path, writable_again) -> None:
    """Without a directory exchange the new files would have to go inside the read-only directory:
    refused (exit 2) with the way out, the checkpoint untouched and nothing left behind."""
    target = legacy("gqa_llama")
    original = {p.name: p.read_bytes() for p in target.iterdir()}
    wanted = set_modes(target, READ_ONLY)
    proc = upgrade_as_owner(target, "no-exchange")
    assert proc.returncode == 2, proc.stderr
    assert "read-only" in proc.stderr and "--out" in proc.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == original
    assert snapshot_modes(target) == (0o555, wanted)
    assert not sibling(target.resolve()).exists()


# --- new directories: the umask ----------------------------------------------------------------------

@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def read_only_source(legacy, name: str) -> Path:
    """A source whose modes match no umask below, with a tokenizer file for the copies."""
    source = legacy(name)
    (source / "tokenizer.json").write_text("{}")
    set_modes(source, READ_ONLY)
    return source


def assert_new(out: Path, mask: int) -> None:
    files = sorted(p.name for p in out.iterdir())
    assert "tokenizer.json" in files
    assert snapshot_modes(out) == (0o777 & ~mask, {n: 0o666 & ~mask for n in files})


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002], indirect=True, ids=oct)
def test_upgrade_out_follows_umask(legacy, umask: int, tmp_path: Path, writable_again) -> None:
    source = read_only_source(legacy, "lora_qkv_gqa")
    out = tmp_path / "new" / "run"
    upgrade(source, out=out)
    assert upgraded(out)
    assert_new(out, umask)
    assert mode(out.parent) == 0o777 & ~umask  # a parent it had to make, too


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002], indirect=True, ids=oct)
def test_convert_out_follows_umask(legacy, umask: int, tmp_path: Path, writable_again) -> None:
    source = read_only_source(legacy, "gqa_llama")
    out = tmp_path / "hf"
    convert(source, "hf", out, forward_check=False)
    assert (out / "model.safetensors").exists()
    assert_new(out, umask)


@pytest.mark.parametrize("umask", [0o022], indirect=True, ids=oct)
def test_existing_empty_out_keeps_its_mode(legacy, umask: int, tmp_path: Path) -> None:
    """An empty directory the user made for --out is replaced by the build, which takes its mode."""
    source = legacy("gqa_llama")
    out = tmp_path / "mine"
    out.mkdir(mode=0o700)
    upgrade(source, out=out)
    assert mode(out) == 0o700
    assert {mode(p) for p in out.iterdir()} == {0o644}
