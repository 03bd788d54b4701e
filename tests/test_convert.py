"""`qkvconv convert` end to end, on tiny random models of every family: the files it writes load in
litgpt (strict) and transformers and reproduce the original logits; `verify` works across formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import populate_hub_cache
from hf_models import BY_ID, TOKENS, TOL, hf_logits, litgpt_logits  # noqa: F401
from qkvconv.cli import app
from qkvconv.formats.hf import litgpt_config_from_hf, plan_hf_to_litgpt

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_hf_to_litgpt_to_hf(case_id: str, built, tmp_path: Path) -> None:  # noqa: F811
    b = built(case_id)
    lit = tmp_path / "litgpt"
    result = cli("convert", b.directory, "--to", "litgpt", "--out", lit)
    assert result.exit_code == 0, result.output
    assert "tensors hold the source's bits in litgpt's names" in " ".join(result.output.split())
    written = load(lit / "lit_model.pth")
    expected = plan_hf_to_litgpt(b.config_json, list(b.tensors)).apply_in_memory(b.tensors)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    cfg = __import__("yaml").safe_load((lit / "model_config.yaml").read_text())
    assert cfg == litgpt_config_from_hf(b.config_json)
    assert (litgpt_logits(cfg, written) - b.logits).abs().max() < TOL
    # back to HF, sharded small enough to need several files
    hf = tmp_path / "hf"
    result = cli("convert", lit, "--to", "hf", "--out", hf, "--max-shard-size", "20KB")
    assert result.exit_code == 0, result.output
    assert (hf / "model.safetensors.index.json").is_file()
    assert (hf_logits(hf) - b.logits).abs().max() < TOL
    # verify across formats: the original HF directory against the litgpt one
    result = cli("verify", b.directory, lit, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"]


@pytest.mark.parametrize("case_id", ["llama3-gqa", "falcon-40b-grouped", "neox-parallel"])
def test_hf_to_litgpt_legacy(case_id: str, built, tmp_path: Path) -> None:  # noqa: F811
    b = built(case_id)
    out = tmp_path / "legacy"
    assert cli("convert", b.directory, "--to", "litgpt-legacy", "--out", out).exit_code == 0
    report = json.loads(cli("inspect", out, "--json").output)
    assert report["naming"] == "attn.attn" and report["qkv_order"] == "grouped" and report["legacy"]
    # current litgpt re-orders legacy files as it loads them
    cfg = litgpt_config_from_hf(b.config_json)
    assert (litgpt_logits(cfg, load(out / "lit_model.pth")) - b.logits).abs().max() < TOL
    assert cli("upgrade", out).exit_code == 0
    assert cli("verify", b.directory, out).exit_code == 0


def test_verify_catches_a_wrong_order_across_formats(built, tmp_path: Path) -> None:  # noqa: F811
    from qkvconv.model.layout import HeadLayout, QKVOrder, reorder

    b = built("falcon-40b-grouped")
    lit = tmp_path / "litgpt"
    assert cli("convert", b.directory, "--to", "litgpt", "--out", lit).exit_code == 0
    sd = load(lit / "lit_model.pth")
    heads = HeadLayout(4, 2, 8)
    for k in [k for k in sd if ".attn.qkv." in k]:  # Falcon's grouped rows under litgpt's sequential name
        sd[k] = reorder(sd[k], QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads)
    torch.save(sd, lit / "lit_model.pth")
    result = cli("verify", b.directory, lit, "--json")
    assert result.exit_code == 1
    assert json.loads(result.output)["first_difference"] == "layer 0"


@pytest.mark.parametrize("tensor", ["mlp.experts.{e}.fc_2.weight", "mlp.gate.weight"])
def test_verify_covers_experts_no_token_reaches(tensor: str, built, tmp_path: Path) -> None:  # noqa: F811
    """One token reaches 2 of 4 experts per layer; a wrong row in an expert that it does not reach (or in
    that expert's router row, which leaves the choice unchanged) still fails the check, by the probe."""
    from qkvconv.formats.weights import open_weights
    from qkvconv.ops.verify import architecture, verify
    from qkvconv.reference import forward

    b = built("mixtral-moe")
    lit = tmp_path / "litgpt"
    assert cli("convert", b.directory, "--to", "litgpt", "--out", lit).exit_code == 0
    weights = open_weights(lit)
    arch = architecture(weights)
    ids = torch.randint(0, arch.padded_vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))  # verify's
    seen: list = []
    forward.block(arch, 0, weights, forward.embed(arch, weights, ids), probe=lambda *t: seen.append(t))
    chosen = set(seen[0][0].topk(arch.n_expert_per_token).indices.flatten().tolist())
    e = min(set(range(arch.n_expert)) - chosen)
    sd = load(lit / "lit_model.pth")
    name = f"transformer.h.0.{tensor.format(e=e)}"
    row = e if "gate" in tensor else 5
    sd[name][row] -= 0.01 * sd[name][row].abs().max()  # small: the router's choice stays the same
    torch.save(sd, lit / "lit_model.pth")
    report = verify(open_weights(b.directory), open_weights(lit), tokens=1, batch=1)
    assert not report.passed
    assert report.first_difference == ("layer 0 router" if "gate" in tensor else "layer 0 experts")
    assert all(s.within for s in report.stages if s.name in ("layer 0", "layer 1", "logits"))  # routing hides it


def test_dry_run_writes_nothing(built, tmp_path: Path) -> None:  # noqa: F811
    b = built("phi3-fused")
    out = tmp_path / "never"
    result = cli("convert", b.directory, "--to", "litgpt", "--out", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
    qkv = next(r for r in plan if r["output"] == "transformer.h.0.attn.qkv.weight")
    assert qkv["inputs"] == ["model.layers.0.self_attn.qkv_proj.weight"] and qkv["file"] == "lit_model.pth"
    fc = {r["output"]: r for r in plan}["transformer.h.1.mlp.fc_2.weight"]
    assert fc["inputs"] == ["model.layers.1.mlp.gate_up_proj.weight"]  # Phi-3's fused gate/up, second half
    assert sum(r["bytes"] for r in plan) > 0


def test_convert_refuses_existing_out_and_unknown_target(built, tmp_path: Path) -> None:  # noqa: F811
    b = built("llama3-gqa")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "precious.txt").write_text("keep me")
    result = cli("convert", b.directory, "--to", "litgpt", "--out", taken)
    assert result.exit_code == 2 and "not empty" in result.output
    assert (taken / "precious.txt").read_text() == "keep me"
    result = cli("convert", b.directory, "--to", "onnx", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "'onnx' is not one of" in result.output and "litgpt-lora" in result.output


def test_inspect_hf_repo_id_offline(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    populate_hub_cache(cache, "tiny-org/falcon-40b-tiny", built("falcon-40b-grouped").directory)
    result = cli("inspect", "tiny-org/falcon-40b-tiny", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "hf" and report["qkv_order"] == "grouped" and report["attention"] == "GQA"
    assert report["architecture"] == "FalconForCausalLM"
    out = tmp_path / "lit"
    assert cli("convert", "tiny-org/falcon-40b-tiny", "--to", "litgpt", "--out", out).exit_code == 0
    assert cli("verify", "tiny-org/falcon-40b-tiny", out).exit_code == 0


@pytest.mark.parametrize("name", ["lora_qkv_gqa", "lora_qv_gqa", "lora_qkv_proj_mlp_oddhead"])
def test_legacy_lora_to_peft_and_back_from_the_cli(name: str, legacy, tmp_path: Path) -> None:
    """A legacy litgpt LoRA run -> PEFT -> litgpt LoRA again computes what litgpt 0.5.4 computed."""
    from conftest import CASES

    directory = legacy(name)
    base = directory.parent / CASES[name]["base"]
    peft_dir = tmp_path / "peft"
    result = cli("convert", directory, "--to", "peft", "--out", peft_dir)
    assert result.exit_code == 0, result.output
    report = json.loads(cli("inspect", peft_dir, "--json").output)
    assert report["format"] == "peft" and report["lora"]["query"]
    back = tmp_path / "litgpt-lora"
    result = cli("convert", peft_dir, "--to", "litgpt-lora", "--out", back, "--base", base)
    assert result.exit_code == 0, result.output
    result = cli("verify", directory, back, "--base", base, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["logits_max_abs_diff"] < 1e-5


def test_convert_merge_of_a_legacy_lora_run(legacy, tmp_path: Path) -> None:
    from conftest import litgpt_logits as litgpt_file_logits, reference

    directory = legacy("lora_qkv_gqa")
    out = tmp_path / "merged"
    result = cli("convert", directory, "--to", "litgpt", "--merge", "--out", out)
    assert result.exit_code == 0, result.output
    ref = reference(directory)
    assert (litgpt_file_logits(out, ref["tokens"]) - ref["logits"]).abs().max() < 1e-5
    bad = cli("convert", directory, "--to", "hf", "--merge", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--merge" in bad.output


def test_convert_refuses_nonfinite_weights_unless_allowed(built, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import load_file, save_file

    b = built("llama3-gqa")
    damaged = tmp_path / "damaged"
    __import__("shutil").copytree(b.directory, damaged)
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    result = cli("convert", damaged, "--to", "litgpt", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "NaN/inf" in result.output and "--allow-nonfinite" in result.output
    assert not (tmp_path / "out").exists()
    result = cli("convert", damaged, "--to", "litgpt", "--out", tmp_path / "out", "--allow-nonfinite", "--no-verify")
    assert result.exit_code == 0, result.output


def test_inspect_meta_directory(built, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "meta"
    assert cli("convert", built("llama3-gqa").directory, "--to", "meta", "--out", out).exit_code == 0
    report = json.loads(cli("inspect", out, "--json").output)
    assert report["format"] == "meta" and report["attention"] == "GQA" and "pairs" in report["evidence"][0]


def test_inspect_refuses_an_hf_config_that_contradicts_the_tensors(built, tmp_path: Path) -> None:  # noqa: F811
    b = built("llama3-gqa")
    broken = tmp_path / "broken"
    __import__("shutil").copytree(b.directory, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the files hold 2 K/V heads
    (broken / "config.json").write_text(json.dumps(cfg))
    for command in (["inspect", broken], ["convert", broken, "--to", "litgpt", "--out", tmp_path / "o"]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.output.startswith("error:")


def test_condensed_positions_convert_with_their_check(tmp_path: Path) -> None:
    """LLaMA-2-7B-32K's condensed positions become linear RoPE scaling in config.json: the default check and
    verify hold the two spellings for one function (the check once crashed here on an error it named wrong)."""
    import dataclasses

    import yaml
    from litgpt import Config
    from litgpt.model import GPT

    cfg = Config.from_name("LLaMA-2-7B-32K", n_layer=2, n_embd=32, n_head=4, n_query_groups=4, intermediate_size=48,
                           padded_vocab_size=96, vocab_size=96, block_size=64)
    torch.manual_seed(0)
    lit = tmp_path / "lit"
    lit.mkdir()
    torch.save(GPT(cfg).state_dict(), lit / "lit_model.pth")
    (lit / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    result = cli("convert", lit, "--to", "hf", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert "computed on random inputs" in " ".join(result.output.split())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    assert cli("verify", lit, tmp_path / "hf").exit_code == 0
