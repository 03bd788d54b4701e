"""SOURCE arguments: local paths and Hub repo ids from a pre-populated cache, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import FIXTURES, populate_hub_cache
from qkvconv.cli import app
from qkvconv.io.sources import is_repo_id

runner = CliRunner()


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_shapes() -> None:
    assert is_repo_id("meta-llama/Llama-2-7b-hf") and is_repo_id("org/name.v2")
    assert not is_repo_id("./org/name") and not is_repo_id("/abs/path") and not is_repo_id("a/b/c")


def test_inspect_repo_id_from_offline_cache(offline_cache: Path) -> None:
    populate_hub_cache(offline_cache, "qkvconv-test/gqa-legacy", FIXTURES / "gqa_llama")
    result = runner.invoke(app, ["inspect", "qkvconv-test/gqa-legacy", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["naming"] == "attn.attn" and report["attention"] == "GQA"
    assert "snapshots" in report["source"]


def test_uncached_repo_offline_is_exit_2(offline_cache: Path) -> None:
    result = runner.invoke(app, ["inspect", "qkvconv-test/not-there"])
    assert result.exit_code == 2
    assert "HF_HUB_OFFLINE" in result.output and "Traceback" not in result.output


def test_upgrade_of_a_repo_id_needs_out(offline_cache: Path, tmp_path: Path) -> None:
    populate_hub_cache(offline_cache, "qkvconv-test/gqa-legacy", FIXTURES / "gqa_llama")
    result = runner.invoke(app, ["upgrade", "qkvconv-test/gqa-legacy"])
    assert result.exit_code == 2 and "--out" in result.output
    out = tmp_path / "mine"
    result = runner.invoke(app, ["upgrade", "qkvconv-test/gqa-legacy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["inspect", str(out), "--expect", "current"]).exit_code == 0


def test_missing_local_path_is_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_upgrade_out_of_the_cache_copies_linked_files(offline_cache: Path, tmp_path: Path) -> None:
    populate_hub_cache(offline_cache, "qkvconv-test/gqa-legacy", FIXTURES / "gqa_llama")
    out = tmp_path / "mine"
    assert runner.invoke(app, ["upgrade", "qkvconv-test/gqa-legacy", "--out", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (FIXTURES / "gqa_llama").iterdir())
    assert not any(p.is_symlink() for p in out.iterdir())


@pytest.mark.parametrize("victim", ["lit_model.pth", "model_config.yaml", "reference.pt"])
def test_symlink_leaving_the_checkpoint_is_refused(victim: str, legacy, tmp_path: Path) -> None:
    import os

    directory = legacy("gqa_llama")
    outside = tmp_path / "outside"
    outside.mkdir()
    (directory / victim).rename(outside / victim)
    os.symlink(outside / victim, directory / victim)
    command = ["upgrade", str(directory), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "outside the checkpoint directory" in result.output
    assert not (tmp_path / "out").exists()
