"""`qkvconv upgrade` on checkpoints written by a real litgpt 0.5.4: the result loads strictly in current
litgpt and reproduces the logits that the old code computed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import CASES, FULL_CASES, LORA_CASES, litgpt_logits, reference, state_dict
from qkvconv.cli import app
from qkvconv.ops.upgrade import upgrade

runner = CliRunner()


def tree_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", FULL_CASES)
def test_full_upgrade_reproduces_legacy_logits(name: str, legacy) -> None:
    directory = legacy(name)
    assert cli("inspect", directory, "--expect", "current").exit_code == 1
    result = cli("upgrade", directory)
    assert result.exit_code == 0, result.output
    ref = reference(directory)
    logits = litgpt_logits(directory, ref["tokens"])
    assert (logits - ref["logits"]).abs().max() < 1e-5
    sd = state_dict(directory / "lit_model.pth")
    assert not any(".attn.attn." in k for k in sd) and any(".attn.qkv." in k for k in sd)
    wrapped = "model" in torch.load(directory / "lit_model.pth", weights_only=True)
    assert wrapped == CASES[name].get("wrapped", False)  # wrapping kept as found
    assert cli("inspect", directory, "--expect", "current").exit_code == 0
    # a second run is a no-op that says so, and changes no byte
    before = tree_digest(directory)
    again = cli("upgrade", directory)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert tree_digest(directory) == before


@pytest.mark.parametrize("name", LORA_CASES)
def test_lora_upgrade_reproduces_legacy_logits(name: str, legacy) -> None:
    directory = legacy(name)
    base = directory.parent / CASES[name]["base"]
    ref = reference(directory)
    before_hp = yaml.safe_load((directory / "hyperparameters.yaml").read_text())
    # current litgpt refuses the legacy adapter outright: the reason this tool exists
    with pytest.raises(RuntimeError, match="attn.attn.lora_A|Unexpected key"):
        litgpt_logits(base, ref["tokens"], lora_dir=_migrated_copy(directory))
    report = upgrade(directory)
    assert report.changed
    assert any("base" in a and "legacy" in a for a in report.notes)  # told to upgrade the base too
    upgrade(base)
    logits = litgpt_logits(base, ref["tokens"], lora_dir=directory)
    assert (logits - ref["logits"]).abs().max() < 1e-5
    hp = yaml.safe_load((directory / "hyperparameters.yaml").read_text())
    all_qkv = all(CASES[name]["lora"][f] for f in ("lora_query", "lora_key", "lora_value"))
    if all_qkv:  # exact rank-3r adapter, alpha/r unchanged
        assert hp["lora_r"] == 3 * before_hp["lora_r"]
        assert hp["lora_alpha"] / hp["lora_r"] == before_hp["lora_alpha"] / before_hp["lora_r"]
        assert report.lora_rank == (before_hp["lora_r"], 3 * before_hp["lora_r"])
    else:  # only names change
        assert hp == before_hp
    assert cli("inspect", directory, "--expect", "current").exit_code == 0
    digest = tree_digest(directory)
    assert not upgrade(directory).changed
    assert tree_digest(directory) == digest


def test_current_litgpt_cannot_put_lora_on_a_legacy_base(legacy) -> None:
    """Found while testing: litgpt 0.5.13 maps a LoRA model's `attn.qkv.weight` before re-ordering legacy
    `attn.attn.weight`, so a legacy base does not load under a LoRA model (strict) and is silently left
    at random init by `finetune lora` (strict=False). Upgrading the base fixes both."""
    directory = legacy("lora_qv_gqa")
    upgrade(directory)
    base = directory.parent / CASES["lora_qv_gqa"]["base"]
    ref = reference(directory)
    with pytest.raises(RuntimeError, match="attn.qkv.linear.weight"):
        litgpt_logits(base, ref["tokens"], lora_dir=directory)
    upgrade(base)
    assert (litgpt_logits(base, ref["tokens"], lora_dir=directory) - ref["logits"]).abs().max() < 1e-5


def _migrated_copy(directory: Path) -> Path:
    """The legacy adapter with only its config made readable by current litgpt."""
    copy = directory.parent / f"{directory.name}-config-only"
    copy.mkdir()
    for p in directory.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    cfg = yaml.safe_load((copy / "model_config.yaml").read_text())
    cfg.pop("sliding_window_layer_placing", None)
    (copy / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


@pytest.mark.parametrize("name", LORA_CASES)
def test_lora_merge_reproduces_legacy_logits(name: str, legacy, tmp_path: Path) -> None:
    directory = legacy(name)
    source = tree_digest(directory)
    out = tmp_path / "merged"
    result = cli("upgrade", directory, "--lora-merge", "--out", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(directory) == source  # --out leaves the source alone
    ref = reference(directory)
    logits = litgpt_logits(out, ref["tokens"])
    assert (logits - ref["logits"]).abs().max() < 1e-5
    assert not (out / "lit_model.pth.lora").exists()


def test_lora_merge_needs_out(legacy) -> None:
    result = cli("upgrade", legacy("lora_qv_gqa"), "--lora-merge")
    assert result.exit_code == 2 and "--out" in result.output


def test_upgrade_into_out_leaves_source_untouched(legacy, tmp_path: Path) -> None:
    directory = legacy("lora_qkv_gqa")
    before = tree_digest(directory)
    out = tmp_path / "nested" / "upgraded"
    result = cli("upgrade", directory, "--out", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(directory) == before
    assert {p.name for p in out.iterdir()} == {p.name for p in directory.iterdir()}
    hp = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    base = Path(hp["checkpoint_dir"])
    assert base.is_absolute() and (base / "lit_model.pth").is_file()
    upgrade(base)
    ref = reference(directory)
    assert (litgpt_logits(base, ref["tokens"], lora_dir=out) - ref["logits"]).abs().max() < 1e-5
    # an existing non-empty --out is refused, not overwritten
    again = cli("upgrade", directory, "--out", out)
    assert again.exit_code == 2 and "not empty" in again.output


def test_naive_rename_would_be_silently_wrong(legacy) -> None:
    """What the checks protect against: renaming attn.attn -> attn.qkv without re-ordering rows
    loads strictly in litgpt and produces different logits."""
    directory = legacy("gqa_llama")
    upgrade(directory)
    sd = state_dict(directory / "lit_model.pth")
    from qkvconv.model.layout import HeadLayout, QKVOrder, reorder

    heads = HeadLayout(8, 2, 4)
    for k in [k for k in sd if ".attn.qkv." in k]:
        sd[k] = reorder(sd[k], QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads)  # rows as the legacy file had them
    torch.save(sd, directory / "lit_model.pth")
    ref = reference(directory)
    assert (litgpt_logits(directory, ref["tokens"]) - ref["logits"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("empty_dir", "checkpoint"),
        ("head_mismatch", "does not belong to these weights"),
        ("truncated", "truncated or corrupt"),
        ("lora_mismatch", "hyperparameters.yaml"),
        ("no_config", "model_config.yaml"),
        ("pickle_code", "refused"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "upgrade"])
def test_bad_input_is_one_line_and_exit_2(breakage: str, message: str, command: str, legacy, tmp_path: Path) -> None:
    if breakage == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif breakage == "head_mismatch":
        target = legacy("gqa_llama")
        cfg = yaml.safe_load((target / "model_config.yaml").read_text())
        cfg["n_query_groups"] = 4  # same n_embd, wrong head counts
        (target / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    elif breakage == "truncated":
        target = legacy("mha_neox")
        data = (target / "lit_model.pth").read_bytes()
        (target / "lit_model.pth").write_bytes(data[: len(data) // 2])
    elif breakage == "lora_mismatch":
        target = legacy("lora_qv_gqa")
        hp = yaml.safe_load((target / "hyperparameters.yaml").read_text())
        hp["lora_r"] = 8
        (target / "hyperparameters.yaml").write_text(yaml.safe_dump(hp))
    elif breakage == "no_config":
        target = legacy("gqa_llama")
        (target / "model_config.yaml").unlink()
    else:  # a pickle that would run code if loaded without weights_only
        target = legacy("gqa_llama")
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (Path.touch, (marker,))

        torch.save({"transformer.wte.weight": Evil()}, target / "lit_model.pth")
    before = tree_digest(target)
    result = cli(command, target)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:")
    assert tree_digest(target) == before  # nothing written
    if breakage == "pickle_code":
        assert not marker.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_reported_not_converted(value: float, legacy) -> None:
    directory = legacy("gqa_llama")
    sd = torch.load(directory / "lit_model.pth", weights_only=True)
    sd["transformer.h.1.mlp.fc_2.weight"][3, 4] = value
    torch.save(sd, directory / "lit_model.pth")
    before = tree_digest(directory)
    result = cli("upgrade", directory)
    assert result.exit_code == 2
    assert "transformer.h.1.mlp.fc_2.weight holds 1 NaN/inf values" in result.output
    assert tree_digest(directory) == before
