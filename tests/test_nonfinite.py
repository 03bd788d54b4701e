"""NaN/inf in full weights and LoRA adapters: refused with the tensor's name (exit 2) by every command
that converts them, unless --allow-nonfinite; allowed, they convert exactly (the same NaN in the same
place) and every check compares NaN for NaN, while a NaN on one side only, or a wrong conversion past
the first NaN, still fails. `verify` reports NaN/inf weights rather than refusing them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.model.layout import QKVOrder, permutation
from qkvconv.formats.litgpt import open_litgpt
from qkvconv.model.nonfinite import max_difference, same_bits, within
from qkvconv.formats.weights import open_weights

runner = CliRunner()
NAN, INF = float("nan"), float("inf")
FC2 = "transformer.h.0.mlp.fc_2.weight"  # litgpt's name in every format (open_weights maps the others)
LORA_B = "transformer.h.0.attn.attn.lora_B"  # legacy naming: lora_qv_gqa was written by litgpt 0.5.4
ALLOW = "--allow-nonfinite"


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    """The output as one line (Rich wraps long lines at the terminal width)."""
    return " ".join(result.output.split())


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def damage(path: Path, name: str, value: float, spot: tuple[int, int]) -> None:
    """Set one value of one tensor in a litgpt .pth (wrapped in {"model": ...} or not) or a safetensors file."""
    if path.suffix == ".safetensors":
        tensors = load_file(path)
        tensors[name][spot] = value
        save_file(tensors, path, metadata={"format": "pt"})
        return
    obj = torch.load(path, weights_only=True)
    tensors = obj["model"] if "model" in obj else obj
    tensors[name][spot] = value
    torch.save(obj, path)


def fc2(directory: Path) -> torch.Tensor:
    return open_weights(directory)(FC2)


def test_comparisons_take_nan_as_equal_to_nan_in_the_same_place_only() -> None:
    a = torch.tensor([1.0, NAN, INF, -INF])
    assert same_bits(a, a.clone()) and not torch.equal(a, a.clone())
    assert same_bits(a.bfloat16(), a.bfloat16().clone()) and same_bits(a.reshape(2, 2).t(), a.reshape(2, 2).t())
    assert not same_bits(a, torch.tensor([1.0, 0.0, INF, -INF]))
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # a copy keeps the sign
    assert not same_bits(a, a.double())
    near = torch.tensor([1.0 + 1e-6, NAN, INF, -INF])
    assert within(a, near, 1e-5) and not within(a, near, 1e-8)
    assert 0 < max_difference(a, near) < 1e-5
    for other in ([1.0, 2.0, INF, -INF], [1.0, NAN, -INF, -INF], [1.0, NAN, NAN, -INF], [1.0, INF, INF, -INF]):
        assert not within(a, torch.tensor(other), 10.0)
        assert max_difference(a, torch.tensor(other)) == INF
    assert not within(a, a[:3], 10.0)


# ---------------------------------------------------------------------------------------------
# full weights: NaN in fc_2 of a legacy checkpoint

FULL_COMMANDS = {
    "upgrade-in-place": ["upgrade", "{src}"],
    "upgrade-out": ["upgrade", "{src}", "--out", "{out}"],
    "convert-hf": ["convert", "{src}", "--to", "hf", "--out", "{out}"],
    "convert-litgpt": ["convert", "{src}", "--to", "litgpt", "--out", "{out}"],
    "fold-norms": ["fold-norms", "{src}", "--out", "{out}"],
}


# convert --allow-nonfinite --no-verify worked before these checks compared NaN (test_convert covers it)
FULL_CASES = [(c, v) for c in FULL_COMMANDS for v in ("--verify", "--no-verify")
              if not (c.startswith("convert") and v == "--no-verify")]


@pytest.mark.parametrize(("command", "verify"), FULL_CASES)
def test_nan_in_full_weights_is_refused_unless_allowed_then_carried_exactly(
    command: str, verify: str, legacy, tmp_path: Path
) -> None:
    src = legacy("gqa_llama")
    damage(src / "lit_model.pth", FC2, NAN, (3, 4))
    before, original = digest(src), fc2(src).clone()
    out = tmp_path / "out"
    args = [a.format(src=src, out=out) for a in FULL_COMMANDS[command]] + [verify]

    refused = cli(*args)
    assert refused.exit_code == 2, refused.output
    assert f"{FC2} holds 1 NaN/inf values" in said(refused) and ALLOW in said(refused)
    assert digest(src) == before and not out.exists()

    result = cli(*args, ALLOW)
    assert result.exit_code == 0, result.output
    got = fc2(src if command == "upgrade-in-place" else out)
    assert torch.equal(got.isnan(), original.isnan()) and int(got.isnan().sum()) == 1
    if command == "fold-norms":
        assert bool(got.isfinite().sum() == got.numel() - 1)  # W * g: finite wherever W is
    else:
        assert same_bits(got, original)  # copied, bit for bit
    if verify == "--verify":  # bits compared as they are (NaN included); computed: NaN for NaN, then as 0
        assert ("NaN for NaN in the same places" if command == "fold-norms" else "hold the source's bits") in said(result)


# ---------------------------------------------------------------------------------------------
# LoRA adapters: inf in a lora_B of a legacy q+v run (its base beside it)


def peft_of(run: Path, out: Path) -> Path:
    """A PEFT export of a clean litgpt LoRA run."""
    result = cli("convert", run, "--to", "peft", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def peft_b(directory: Path) -> str:
    return next(k for k in load_file(directory / "adapter_model.safetensors") if k.endswith("q_proj.lora_B.weight"))


ADAPTER_COMMANDS = {
    "upgrade-in-place": ["upgrade", "{src}"],
    "upgrade-out": ["upgrade", "{src}", "--out", "{out}"],
    "upgrade-lora-merge": ["upgrade", "{src}", "--lora-merge", "--out", "{out}"],
    "convert-merge": ["convert", "{src}", "--to", "litgpt", "--merge", "--out", "{out}"],
    "convert-peft": ["convert", "{src}", "--to", "peft", "--out", "{out}"],
    "peft-to-litgpt-lora": ["convert", "{peft}", "--to", "litgpt-lora", "--out", "{out}"],
    "peft-to-peft-fused": ["convert", "{peft}", "--to", "peft", "--qkv", "fused", "--out", "{out}"],
}


@pytest.mark.parametrize("command", list(ADAPTER_COMMANDS))
def test_inf_in_an_adapter_is_refused_naming_the_tensor_unless_allowed(command: str, legacy, tmp_path: Path) -> None:
    run = legacy("lora_qv_gqa")
    if "{peft}" in ADAPTER_COMMANDS[command]:
        src = peft_of(run, tmp_path / "peft")
        name = peft_b(src)
        damage(src / "adapter_model.safetensors", name, INF, (1, 1))
    else:
        src, name = run, LORA_B
        damage(run / "lit_model.pth.lora", name, INF, (1, 1))
    before, out = digest(src), tmp_path / "out"
    args = [a.format(src=src, peft=src, out=out) for a in ADAPTER_COMMANDS[command]]

    refused = cli(*args)
    assert refused.exit_code == 2, refused.output
    assert f"{name} holds 1 NaN/inf values" in said(refused) and ALLOW in said(refused)
    assert digest(src) == before and not out.exists()

    original = tmp_path / "original"  # an in-place upgrade replaces the source
    shutil.copytree(src, original)
    result = cli(*args, ALLOW)
    assert result.exit_code == 0, result.output
    # the result computes what the source computes: the same inf (and the NaN it makes) in the same places
    base = candidate_base = tmp_path / "gqa_llama"
    if command == "peft-to-peft-fused":  # an adapter on Phi-3's qkv_proj: its base is the fused twin
        candidate_base = tmp_path / "fused-base"
        assert cli("convert", base, "--to", "hf", "--qkv", "fused", "--out", candidate_base).exit_code == 0
    checked = cli("verify", original, src if command == "upgrade-in-place" else out, "--base", base,
                  "--candidate-base", candidate_base, "--json")
    report = json.loads(checked.output)
    assert checked.exit_code == 0 and report["passed"], checked.output
    assert report["nonfinite_weights"]["reference"] and report["nonfinite_weights"]["candidate"]


def test_upgrade_carries_an_allowed_inf_in_lora_b_bit_for_bit(legacy, tmp_path: Path) -> None:
    """q+v only: the adapter's tensors are only renamed."""
    run = legacy("lora_qv_gqa")
    damage(run / "lit_model.pth.lora", LORA_B, INF, (1, 1))
    assert cli("upgrade", run, "--out", tmp_path / "out", ALLOW).exit_code == 0
    old = torch.load(run / "lit_model.pth.lora", weights_only=True)["model"]
    new = torch.load(tmp_path / "out" / "lit_model.pth.lora", weights_only=True)["model"]
    assert same_bits(new[LORA_B.replace(".attn.attn.", ".attn.qkv.")], old[LORA_B])


def test_merge_refuses_nan_in_the_base_unless_allowed(legacy, tmp_path: Path) -> None:
    run = legacy("lora_qv_gqa")
    damage(tmp_path / "gqa_llama" / "lit_model.pth", FC2, NAN, (3, 4))
    refused = cli("convert", run, "--to", "litgpt", "--merge", "--out", tmp_path / "out")
    assert refused.exit_code == 2 and f"{FC2} holds 1 NaN/inf values" in said(refused)
    result = cli("convert", run, "--to", "litgpt", "--merge", "--out", tmp_path / "out", ALLOW)
    assert result.exit_code == 0, result.output
    assert same_bits(fc2(tmp_path / "out"), fc2(tmp_path / "gqa_llama"))


# ---------------------------------------------------------------------------------------------
# verify: reports NaN/inf, compares NaN for NaN, and still fails a wrong conversion


def test_verify_passes_an_exact_conversion_and_fails_any_other(legacy, tmp_path: Path) -> None:
    src = legacy("gqa_llama")
    damage(src / "lit_model.pth", FC2, NAN, (3, 4))
    good = tmp_path / "good"
    assert cli("upgrade", src, "--out", good, "--no-verify", ALLOW).exit_code == 0
    result = cli("verify", src, good, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["passed"], result.output
    assert report["nonfinite_weights"] == {"reference": [FC2], "candidate": [FC2]}
    assert any(s["nonfinite"] for s in report["stages"])  # the NaN reached the logits on both sides...
    assert any(s["name"].endswith("(NaN/inf weights as 0)") for s in report["stages"])  # ...so a second pass ran

    heads = open_litgpt(good).shape.heads
    qkv = "transformer.h.1.attn.qkv.weight"
    wrong = {  # a NaN on one side only; a NaN moved; right NaN, wrong QKV order past it
        "nan-lost": lambda sd: sd[FC2].__setitem__((3, 4), 0.0),
        "nan-moved": lambda sd: (sd[FC2].__setitem__((3, 4), 0.5), sd[FC2].__setitem__((4, 3), NAN)),
        "wrong-order-after": lambda sd: sd.__setitem__(
            qkv, sd[qkv][permutation(QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads)]),
    }
    for label, edit in wrong.items():
        candidate = tmp_path / label
        shutil.copytree(good, candidate)
        sd = torch.load(candidate / "lit_model.pth", weights_only=True)
        edit(sd)
        torch.save(sd, candidate / "lit_model.pth")
        result = cli("verify", src, candidate, "--json")
        assert result.exit_code == 1 and not json.loads(result.output)["passed"], (label, result.output)


def test_a_fold_that_spreads_a_nan_into_a_bias_is_not_passed_as_checked(legacy, tmp_path: Path) -> None:
    """GPT-NeoX: norm_2's LayerNorm bias folds into the bias of the MLP's fc (b' = b + W @ beta), so a NaN
    in fc's weight makes that bias entry NaN too. The same NaN as before in IEEE arithmetic, but the pass
    with NaN/inf read as 0 cannot tell it from a wrong conversion: exit 1, saying so, nothing written."""
    src = legacy("mha_neox")
    damage(src / "lit_model.pth", "transformer.h.0.mlp.fc.weight", NAN, (3, 4))
    result = cli("fold-norms", src, "--out", tmp_path / "out", ALLOW)
    assert result.exit_code == 1, result.output
    assert "with them read as 0" in said(result) and "cannot tell apart" in said(result)
    assert not (tmp_path / "out").exists()
    assert cli("fold-norms", src, "--out", tmp_path / "out", ALLOW, "--no-verify").exit_code == 0
