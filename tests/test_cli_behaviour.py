"""What a new user runs into at the command line: CI gates that check what litgpt will load, errors
that name the option the user typed, start-up and Ctrl-C, notes apart from actions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qkvconv import progress
from qkvconv.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_expect_current_checks_the_base_of_a_lora_run(legacy, tmp_path: Path) -> None:
    """A current adapter on a legacy base computes wrong logits in current litgpt: the gate must say no."""
    run = tmp_path / "qv"
    assert invoke("upgrade", legacy("lora_qv_gqa"), "--out", run, "--base", legacy("gqa_llama")).exit_code == 0
    result = invoke("inspect", run, "--expect", "current")
    assert result.exit_code == 1
    assert str(legacy("gqa_llama")) in result.stderr and "legacy" in result.stderr
    report = json.loads(invoke("inspect", run, "--json").stdout)
    assert report["lora"]["base_legacy"] is True and any("legacy" in n for n in report["notes"])
    # the base upgraded: the gate passes
    assert invoke("upgrade", legacy("gqa_llama")).exit_code == 0
    assert invoke("inspect", run, "--expect", "current").exit_code == 0


def test_expect_current_says_when_the_base_cannot_be_found(legacy, tmp_path: Path) -> None:
    run = tmp_path / "qv"
    invoke("upgrade", legacy("lora_qv_gqa"), "--out", run, "--base", legacy("gqa_llama"))
    hyper = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    hyper["checkpoint_dir"] = str(tmp_path / "gone")
    (run / "hyperparameters.yaml").write_text(yaml.safe_dump(hyper))
    result = invoke("inspect", run, "--expect", "current")
    assert result.exit_code == 1 and "not found" in result.stderr and "--base" in result.stderr
    assert invoke("upgrade", legacy("gqa_llama")).exit_code == 0
    assert invoke("inspect", run, "--expect", "current", "--base", legacy("gqa_llama")).exit_code == 0


def test_legacy_base_warning_is_a_note_not_an_action(legacy, tmp_path: Path) -> None:
    result = invoke("upgrade", legacy("lora_qv_gqa"), "--out", tmp_path / "up", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0
    assert any("legacy" in n and "gqa_llama" in n for n in report["notes"])
    assert not any("base checkpoint" in a for a in report["actions"])


def test_family_names_the_architecture_for_litgpt_and_hf(legacy, tmp_path: Path) -> None:
    """`family` means the same for every format; litgpt's config name is `model`."""
    lit = json.loads(invoke("inspect", legacy("gqa_llama"), "--json").stdout)
    assert invoke("convert", legacy("gqa_llama"), "--to", "hf", "--out", tmp_path / "hf").exit_code == 0
    hf = json.loads(invoke("inspect", tmp_path / "hf", "--json").stdout)
    assert lit["family"] == hf["family"] is not None
    assert lit["model"] == yaml.safe_load((legacy("gqa_llama") / "model_config.yaml").read_text())["name"]


def test_fold_norms_dry_run_needs_no_out_and_refuses_adapters(legacy, tmp_path: Path) -> None:
    result = invoke("fold-norms", legacy("gqa_llama"), "--dry-run", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["plan"]
    result = invoke("fold-norms", legacy("gqa_llama"), "--to", "peft", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "peft" in result.stderr and "LoRA" not in result.stderr
    result = invoke("fold-norms", legacy("lora_qv_gqa"), "--out", tmp_path / "o")
    assert result.exit_code == 2 and "full models" in result.stderr


def test_old_torch_save_format_is_named(legacy, tmp_path: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    for f in legacy("gqa_llama").iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    weights = torch.load(directory / "lit_model.pth", weights_only=True)
    torch.save(weights, directory / "lit_model.pth", _use_new_zipfile_serialization=False)
    result = invoke("inspect", directory)
    assert result.exit_code == 2
    assert "legacy serialization format" in result.stderr and "torch.save" in result.stderr
    assert "truncated" not in result.stderr


def test_verify_names_the_option_of_a_wrong_candidate_base(legacy, tmp_path: Path) -> None:
    result = invoke("verify", legacy("lora_qv_gqa"), legacy("lora_qv_gqa"), "--candidate-base", tmp_path)
    assert result.exit_code == 2 and "--candidate-base" in result.stderr


def test_progress_clear_takes_every_display_off(monkeypatch) -> None:
    """An error or Ctrl-C clears bars before its message; a new stage replaces a display still shown."""
    monkeypatch.setattr(progress, "interactive", lambda: True)
    bar = progress.progress_for(progress.THRESHOLD_BYTES * 2, "writing")
    bar.advance(10)
    assert len(progress._active) == 1
    layer = progress.layers("checking")
    assert layer is not None
    layer(1, 4)  # the write bar never finished: the check's bar replaces it
    assert len(progress._active) == 1
    progress.clear()
    assert progress._active == []
    with progress.status("planning"):
        assert len(progress._active) == 1
    assert progress._active == []


def test_verify_reports_each_layer(legacy) -> None:
    from qkvconv.ops.verify import verify
    from qkvconv.formats.weights import open_weights

    seen: list[tuple[int, int]] = []
    directory = legacy("gqa_llama")
    verify(open_weights(directory), open_weights(directory), progress=lambda i, n: seen.append((i, n)))
    n = seen[-1][1]  # the blocks, then the head
    assert seen == [(i, n) for i in range(0, n + 1)] and n > 1


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])
def test_ctrl_c_at_any_moment_prints_one_line(legacy, delay: float) -> None:
    """SIGINT while the CLI starts (importing typer, torch) or works: one line on stderr, exit 130."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "qkvconv", "verify", str(legacy("gqa_llama")),
                             str(legacy("gqa_llama"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("finished before the signal")  # a fast machine: nothing to interrupt
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err
