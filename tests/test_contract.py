"""The CI contract: --json output keys are stable and documented in the README, exit codes as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkvconv.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()
runner = CliRunner()

INSPECT_KEYS = ["source", "format", "family", "model", "legacy", "naming", "qkv_order", "evidence", "n_layer", "n_head",
                "n_query_groups", "head_size", "n_embd", "attention", "rope", "lora", "dtype", "parameters", "files", "notes"]
UPGRADE_KEYS = ["source", "destination", "changed", "actions", "checks", "recovered", "lora_rank", "notes"]
ERROR_KEYS = ["error", "exit_code", "meaning"]
CONVERT_KEYS = ["source", "destination", "source_format", "target_format", "actions", "checks", "plan"]
VERIFY_KEYS = ["reference", "candidate", "device", "dtype", "tokens", "seed", "atol", "rtol", "stages",
               "top1_agreement", "seconds", "peak_rss_bytes", "peak_gpu_bytes", "nonfinite_weights",
               "tolerance_reason", "notes", "passed",
               "first_difference", "logits_max_abs_diff"]


def run_json(*args) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize("keys", [INSPECT_KEYS, UPGRADE_KEYS, CONVERT_KEYS, VERIFY_KEYS, ERROR_KEYS])
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


def one_json_document(result) -> dict:
    """stdout must be exactly one JSON document (json.loads refuses trailing data or an empty string)."""
    return json.loads(result.stdout)


@pytest.mark.parametrize("args", [
    ["inspect", "{missing}", "--json"],
    ["upgrade", "{missing}", "--json"],
    ["convert", "{missing}", "--to", "hf", "--out", "{out}", "--json"],
    ["convert", "{legacy}", "--to", "nonsense", "--out", "{out}", "--json"],  # an option error (click's)
    ["convert", "{legacy}", "--to", "hf", "--out", "{out}", "--max-shard-size", "-5GB", "--json"],
    ["fold-norms", "{missing}", "--json"],
    ["verify", "{legacy}", "{missing}", "--json"],
    ["inspect", "{legacy}", "--no-such-option", "--json"],
])
def test_json_on_failure_is_one_document_with_the_error(args, legacy, tmp_path: Path) -> None:
    values = {"missing": tmp_path / "missing", "out": tmp_path / "out", "legacy": legacy("gqa_llama")}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2
    doc = one_json_document(result)
    assert list(doc) == ERROR_KEYS and doc["exit_code"] == 2 and doc["meaning"] == "bad input or environment"
    assert doc["error"]
    assert not (tmp_path / "out").exists()


def test_json_when_a_check_fails(legacy, tmp_path: Path) -> None:
    """inspect --expect and verify exit 1 with their report in the one document (and the error, for inspect)."""
    result = runner.invoke(app, ["inspect", str(legacy("gqa_llama")), "--expect", "current", "--json"])
    doc = one_json_document(result)
    assert result.exit_code == 1 and doc["exit_code"] == 1 and doc["meaning"] == "a check failed"
    assert doc["legacy"] is True and "upgrade" in doc["error"]
    result = runner.invoke(app, ["verify", str(legacy("gqa_llama")), str(legacy("mqa_falcon")), "--json"])
    doc = one_json_document(result)
    assert result.exit_code == 1 and doc["exit_code"] == 1 and "different architectures" in doc["error"]


def test_help_shows_examples_and_exit_codes() -> None:
    for args in (["-h"], ["--help"], ["convert", "-h"], ["inspect", "-h"], ["verify", "-h"], ["upgrade", "-h"],
                 ["fold-norms", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, args
        assert "Examples:" in result.stdout and "Exit codes:" in result.stdout, args
        assert "<bool>" not in result.stdout and "qkvconv" in result.stdout, args
    convert_help = runner.invoke(app, ["convert", "-h"]).stdout
    assert "litgpt-legacy" in convert_help and "litgpt-lora" in convert_help  # --to's choices are listed


def test_readme_documents_every_option() -> None:
    """Each command's options appear in the README's command table (a user reads one place)."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        row = next(line for line in README.splitlines() if line.startswith(f"| `qkvconv {name} "))
        for param in command.params:
            if param.param_type_name == "option" and "--help" not in param.opts:
                assert any(opt in row for opt in param.opts), f"README's {name} row lacks {param.opts[0]}"
    for fmt in ("`litgpt`", "`litgpt-lora`", "`hf`", "`meta`", "`peft`"):
        assert fmt in README


def test_negative_sizes_are_refused(legacy, tmp_path: Path) -> None:
    for size in ("-5GB", "nan", "-1", "0.5"):
        result = runner.invoke(app, ["convert", str(legacy("gqa_llama")), "--to", "hf", "--out", str(tmp_path / "o"),
                                     "--max-shard-size", size])
        assert result.exit_code == 2, size
        assert "--max-shard-size" in result.stderr
    assert not (tmp_path / "o").exists()


def test_numpy_is_a_dependency_and_the_readme_names_the_cpu_wheels() -> None:
    """Without numpy, torch prints 'Failed to initialize NumPy' on every command; the quick start must not
    pull torch's CUDA build on an ordinary machine."""
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert '"numpy' in deps
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in quick_start
