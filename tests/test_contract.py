"""The CI contract: --json output keys are stable and documented in the README, exit codes as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkvconv.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()
runner = CliRunner()

INSPECT_KEYS = ["source", "format", "family", "legacy", "naming", "qkv_order", "evidence", "n_layer", "n_head",
                "n_query_groups", "head_size", "n_embd", "attention", "lora", "dtype", "parameters", "files", "notes"]
UPGRADE_KEYS = ["source", "destination", "changed", "actions", "checks", "recovered", "lora_rank"]
CONVERT_KEYS = ["source", "destination", "source_format", "target_format", "actions", "checks", "plan"]
VERIFY_KEYS = ["reference", "candidate", "device", "dtype", "tokens", "seed", "atol", "rtol", "stages",
               "top1_agreement", "seconds", "peak_rss_bytes", "peak_gpu_bytes", "nonfinite_weights", "passed",
               "first_difference", "logits_max_abs_diff"]


def run_json(*args) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("keys", [INSPECT_KEYS, UPGRADE_KEYS, CONVERT_KEYS, VERIFY_KEYS])
def test_every_key_is_documented(keys: list[str]) -> None:
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README does not document {missing}"


def test_json_outputs_have_exactly_the_documented_keys(legacy, tmp_path: Path) -> None:
    directory = legacy("lora_qkv_gqa")
    code, report = run_json("inspect", directory, "--json")
    assert code == 0 and list(report) == INSPECT_KEYS
    code, report = run_json("upgrade", directory, "--out", tmp_path / "up", "--json")
    assert code == 0 and list(report) == UPGRADE_KEYS
    code, report = run_json("verify", directory, tmp_path / "up", "--json")
    assert code == 0 and list(report) == VERIFY_KEYS
    assert list(report["stages"][0]) == ["name", "max_abs_diff", "scale", "within", "nonfinite"]
    code, report = run_json("convert", legacy("gqa_llama"), "--to", "hf", "--out", tmp_path / "hf", "--json")
    assert code == 0 and list(report) == CONVERT_KEYS


def test_documented_exit_codes(legacy, tmp_path: Path) -> None:
    directory = legacy("gqa_llama")
    assert runner.invoke(app, ["inspect", str(directory), "--expect", "legacy"]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(directory), "--expect", "current"]).exit_code == 1
    assert runner.invoke(app, ["inspect", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(app, ["inspect", "--no-such-option", str(directory)]).exit_code == 2
    assert runner.invoke(app, ["upgrade", str(directory)]).exit_code == 0
    assert runner.invoke(app, ["upgrade", str(directory)]).exit_code == 0  # nothing to do
    assert "exit" in README.lower() and "| 3 |" in README
