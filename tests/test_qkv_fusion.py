"""`convert --qkv fused|split` (issue 7, part 2): separate q/k/v projections <-> one fused QKV matrix.

No format holds both fusions of one architecture: litgpt is always fused (CausalSelfAttention.qkv),
Meta's layout always split (wq/wk/wv), and transformers' classes fix it per architecture. So --qkv
picks the Hugging Face architecture with the asked-for fusion that computes the same model: Llama and
Mistral (split q/k/v_proj, separate gate/up_proj) <-> Phi-3 (sequential qkv_proj, gate_up_proj);
LoRA adapters follow (PEFT on qkv_proj <-> three adapters on q/k/v_proj sharing lora_A). Where no
architecture of that fusion computes the model (GPT-NeoX, Falcon: LayerNorm and GELU; Qwen2: q/k/v
biases, which Phi-3 lacks), or the target format holds one fusion only, it is refused with exit 2.

Oracles: transformers loads every written model (no missing or unexpected keys) and computes the
source's logits; PeftModel on the converted base computes the source adapter's logits; a conversion
and its inverse give back the source's tensors bit for bit; litgpt loads a litgpt result strictly.
Observed in float32 on CPU: the forward-pass check inside convert is bitwise equal (pure row
copies); transformers' logits differ by <= 6e-7 (Phi-3 and Llama compute attention in another
association order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import TOKENS, TOL, Case, _build, hf_logits, litgpt_logits, LLAMA_SIZES  # noqa: F401
from peft_models import (  # noqa: F401
    TOKENS as PEFT_TOKENS,
    assert_same_updates,
    make_lora_run,
    make_peft_adapter,
    peft_logits,
    peft_updates,
)
from qkvconv.cli import app
from qkvconv.errors import UnsupportedFamily
from qkvconv.formats.hf.families import FAMILIES
from qkvconv.formats.hf import hf_config_from_litgpt, litgpt_config_from_hf
from qkvconv.model.layout import QKVOrder

runner = CliRunner()

# Llama with GQA and default RoPE (Phi-3 accepts no llama3 scaling), with a tied head, and Phi-3 with
# full rotary and a sliding window (its split twin is Mistral)
EXTRA = {
    "llama-gqa": Case("llama-gqa", {"model_type": "llama", **LLAMA_SIZES, "rms_norm_eps": 1e-5}, QKVOrder.SPLIT),
    "llama-tied": Case("llama-tied", {"model_type": "llama", **LLAMA_SIZES, "tie_word_embeddings": True,
                                      "bos_token_id": 5, "eos_token_id": 6}, QKVOrder.SPLIT),
    "phi3-window": Case("phi3-window", {"model_type": "phi3", **LLAMA_SIZES, "original_max_position_embeddings": 64,
                                        "sliding_window": 5, "pad_token_id": 0, "bos_token_id": 1,
                                        "eos_token_id": 2}, QKVOrder.SEQUENTIAL),
}


@pytest.fixture(scope="module")
def model(built, tmp_path_factory):  # noqa: F811
    """Tiny random HF models: the cases above, or test_hf_mapping's by id."""
    cache = {}

    def get(case_id: str):
        if case_id not in EXTRA:
            return built(case_id)
        if case_id not in cache:
            cache[case_id] = _build(EXTRA[case_id], tmp_path_factory.mktemp(case_id))
        return cache[case_id]

    return get


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def converted(*args) -> dict:
    """Run a convert that must succeed; its --json report."""
    result = cli("convert", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def refused(*args) -> str:
    result = cli("convert", *args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    return " ".join(result.output.split())


def architecture(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text())["architectures"][0]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# which architecture holds which fusion


def test_every_family_has_one_fusion():
    fusion = {name: f.fusion for name, f in FAMILIES.items()}
    assert fusion == {"LlamaForCausalLM": "split", "MistralForCausalLM": "split", "Qwen2ForCausalLM": "split",
                      "GemmaForCausalLM": "split", "GPTNeoXForCausalLM": "fused", "FalconForCausalLM": "fused",
                      "Phi3ForCausalLM": "fused", "Qwen3ForCausalLM": "split", "StableLmForCausalLM": "split",
                      "PhiForCausalLM": "split", "Gemma2ForCausalLM": "split", "Gemma3ForCausalLM": "split",
                      "OlmoForCausalLM": "split", "Olmo2ForCausalLM": "split", "MixtralForCausalLM": "split",
                      "Qwen3MoeForCausalLM": "split",
                      "Starcoder2ForCausalLM": "split",
                      "GraniteForCausalLM": "split", "SmolLM3ForCausalLM": "split", "CohereForCausalLM": "split", "GlmForCausalLM": "split",
                      "GPT2LMHeadModel": "fused", "GPTBigCodeForCausalLM": "fused", "BloomForCausalLM": "fused",
                      "MptForCausalLM": "fused", "DbrxForCausalLM": "fused", "PersimmonForCausalLM": "fused",
                      "CodeGenForCausalLM": "fused", "InternLM2ForCausalLM": "fused",
                      "PhiForCausalLM (phi-msft)": "fused", "BaichuanForCausalLM": "fused", "QWenLMHeadModel": "fused",
                      "OLMoForCausalLM": "fused", "ChatGLMModel": "fused", "JAISLMHeadModel": "fused",
                      "Phi3SmallForCausalLM": "fused"}


@pytest.mark.parametrize("case_id, qkv, want", [
    ("llama-gqa", "fused", "Phi3ForCausalLM"),
    ("llama-gqa", "split", "LlamaForCausalLM"),
    ("mistral-window", "fused", "Phi3ForCausalLM"),
    ("phi3-window", "split", "MistralForCausalLM"),  # the window needs Mistral, not Llama
    ("neox-parallel", "fused", "GPTNeoXForCausalLM"),
    ("falcon-40b-grouped", "fused", "FalconForCausalLM"),
])
def test_config_of_the_other_fusion(case_id, qkv, want, model):
    cfg = litgpt_config_from_hf(model(case_id).config_json)
    got = hf_config_from_litgpt(cfg, qkv=qkv)
    assert got["architectures"] == [want]
    assert FAMILIES[want].fusion == qkv


@pytest.mark.parametrize("case_id, qkv, why", [
    ("neox-parallel", "split", "with split QKV qkvconv maps: LlamaForCausalLM"),
    ("falcon-40b-grouped", "split", "with split QKV qkvconv maps: LlamaForCausalLM"),
    ("qwen2-bias-tied", "fused", "qkv_bias"),  # Phi-3 has no q/k/v biases
    ("llama3-gqa", "fused", "RoPE scaling 'llama3'"),  # Phi3Config accepts default and longrope only
    ("phi3-fused", "split", "rope_n_elem"),  # partial rotary: transformers' Llama and Mistral rotate all dims
])
def test_no_architecture_of_that_fusion(case_id, qkv, why, model):
    cfg = litgpt_config_from_hf(model(case_id).config_json)
    with pytest.raises(UnsupportedFamily, match=f"no supported architecture with {qkv} QKV") as e:
        hf_config_from_litgpt(cfg, qkv=qkv)
    assert why in str(e.value)


# ---------------------------------------------------------------------------------------------
# full models


@pytest.mark.parametrize("case_id, qkv, want", [
    ("llama-gqa", "fused", "Phi3ForCausalLM"),
    ("llama-tied", "fused", "Phi3ForCausalLM"),  # the head stays tied, the token ids stay the tokenizer's
    ("mistral-window", "fused", "Phi3ForCausalLM"),
    ("phi3-window", "split", "MistralForCausalLM"),
    ("neox-parallel", "fused", "GPTNeoXForCausalLM"),  # already fused: the same architecture
    ("falcon-40b-grouped", "fused", "FalconForCausalLM"),
])
def test_hf_to_the_other_fusion_and_back(case_id, qkv, want, model, tmp_path):
    src = model(case_id)
    report = converted(src.directory, "--to", "hf", "--qkv", qkv, "--out", tmp_path / "out")
    assert any(a.startswith(f"--qkv {qkv}: written as {want}") for a in report["actions"]), report["actions"]
    assert any("hold the source's bits" in c for c in report["checks"]), report["checks"]  # verify, inside convert
    assert architecture(tmp_path / "out") == want
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config.get(key) == src.config_json.get(key), key
    verified = cli("verify", src.directory, tmp_path / "out", "--json")  # the command, across architectures
    assert verified.exit_code == 0 and json.loads(verified.output)["passed"], verified.output
    d = diff(hf_logits(tmp_path / "out"), src.logits)  # transformers loads it, no missing/unexpected keys
    print(f"{case_id} --qkv {qkv} -> {want}: transformers logits max abs diff {d:.2e}")
    assert d < TOL
    # and back to the source's fusion: the very same tensors, and the source's architecture
    back = "split" if src.config_json["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM") else "fused"
    converted(tmp_path / "out", "--to", "hf", "--qkv", back, "--out", tmp_path / "back")
    got = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(got) == sorted(src.tensors)
    assert all(torch.equal(got[k], src.tensors[k]) for k in got)
    assert architecture(tmp_path / "back") == src.config_json["architectures"][0]


def test_split_tensors_are_the_fused_rows(model, tmp_path):
    """Phi-3's qkv_proj rows are q, k, v (sequential); gate_up_proj rows are gate, then up."""
    src = model("phi3-window")
    converted(src.directory, "--to", "hf", "--qkv", "split", "--out", tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    for i in range(2):
        qkv = src.tensors[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        q, k, v = (got[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv")
        assert q.shape == (32, 32) and k.shape == (16, 32) and v.shape == (16, 32)  # 4 query heads, 2 kv, hs 8
        assert torch.equal(torch.cat([q, k, v]), qkv)
        gate_up = src.tensors[f"model.layers.{i}.mlp.gate_up_proj.weight"]
        assert torch.equal(torch.cat([got[f"model.layers.{i}.mlp.gate_proj.weight"],
                                      got[f"model.layers.{i}.mlp.up_proj.weight"]]), gate_up)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)  # the tokenizer's


def test_qkv_composes_with_the_other_transformations(model, tmp_path):
    """GQA Llama -> MHA Phi-3 with folded norms, in one pass from litgpt (one qkv matrix of 3 * 32 rows)."""
    src = model("llama-gqa")
    converted(src.directory, "--to", "litgpt", "--out", tmp_path / "lit")
    report = converted(tmp_path / "lit", "--to", "hf", "--qkv", "fused", "--kv-heads", 4, "--fold-norms",
                       "--out", tmp_path / "out")
    assert report["checks"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["num_key_value_heads"] == 4
    assert load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.self_attn.qkv_proj.weight"].shape == (96, 32)
    d = diff(hf_logits(tmp_path / "out"), src.logits)
    assert d < 1e-5 * max(1.0, src.logits.abs().max().item())  # folding rounds W * g once


@pytest.mark.parametrize("case_id", ["llama-gqa", "neox-parallel", "falcon-40b-grouped"])
def test_litgpt_output_is_fused(case_id, model, tmp_path):
    """--qkv fused --to litgpt: litgpt's own layout, loaded strictly by litgpt; split is refused."""
    src = model(case_id)
    converted(src.directory, "--to", "litgpt", "--qkv", "fused", "--out", tmp_path / "lit")
    lit_cfg = __import__("yaml").safe_load((tmp_path / "lit" / "model_config.yaml").read_text())
    state = torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True)
    assert diff(litgpt_logits(lit_cfg, state), src.logits) < TOL
    assert "litgpt's attention is one fused qkv Linear" in refused(src.directory, "--to", "litgpt", "--qkv", "split",
                                                                   "--out", tmp_path / "no")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("case_id", ["neox-parallel", "falcon-40b-grouped"])
def test_split_refused_where_no_architecture_computes_the_model(case_id, model, tmp_path):
    message = refused(model(case_id).directory, "--to", "hf", "--qkv", "split", "--out", tmp_path / "no")
    assert "no supported architecture with split QKV computes this model" in message
    assert ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, "
            "Gemma2ForCausalLM, Gemma3ForCausalLM") in message
    assert not (tmp_path / "no").exists()


def test_meta_holds_split_only(model, tmp_path):
    src = model("llama-gqa")
    converted(src.directory, "--to", "meta", "--qkv", "split", "--out", tmp_path / "meta")
    assert "Meta's Llama code has separate wq/wk/wv" in refused(src.directory, "--to", "meta", "--qkv", "fused",
                                                                "--out", tmp_path / "no")
    converted(tmp_path / "meta", "--to", "hf", "--qkv", "fused", "--out", tmp_path / "phi3")  # Meta source, fused
    assert architecture(tmp_path / "phi3") == "Phi3ForCausalLM"
    assert diff(hf_logits(tmp_path / "phi3"), src.logits) < TOL


def test_dry_run_shows_the_fused_plan(model, tmp_path):
    result = cli("convert", model("llama-gqa").directory, "--to", "hf", "--qkv", "fused", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)["plan"]
    qkv = next(p for p in plan if p["output"] == "model.layers.0.self_attn.qkv_proj.weight")
    assert qkv["inputs"] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] and qkv["shape"] == [64, 32]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# adapters


def _hf_base(base, qkv: str, directory: Path) -> Path:
    converted(base.directory, "--to", "hf", "--qkv", qkv, "--out", directory)
    return directory


def test_peft_fused_adapter_splits_into_three_sharing_lora_a(bases, tmp_path):  # noqa: F811
    base = bases("phi3")
    want = make_peft_adapter(base, tmp_path / "peft", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                                                           r=3, lora_alpha=6))
    split_base = _hf_base(base, "split", tmp_path / "llama")
    report = converted(tmp_path / "peft", "--to", "peft", "--qkv", "split", "--base", base.directory,
                       "--out", tmp_path / "split")
    assert any("written as LlamaForCausalLM" in a for a in report["actions"])
    got = peft_logits(split_base, tmp_path / "split")  # PeftModel on the split base: no missing/unexpected keys
    print(f"PEFT qkv_proj -> q/k/v_proj: logits max abs diff {diff(got, want):.2e}")
    assert diff(got, want) < TOL
    # the verify command reads adapters on their bases: the same function, bitwise
    result = cli("verify", tmp_path / "peft", tmp_path / "split", "--candidate-base", split_base, "--json")
    assert result.exit_code == 0, result.output
    assert all(stage["max_abs_diff"] == 0 for stage in json.loads(result.output)["stages"])
    t = load_file(tmp_path / "split" / "adapter_model.safetensors")
    for i in range(2):
        a = [t[f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_A.weight"] for p in "qkv"]
        assert a[0].shape == (3, 32) and torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])  # one shared lora_A
        fused_a = load_file(tmp_path / "peft" / "adapter_model.safetensors")[
            f"base_model.model.model.layers.{i}.self_attn.qkv_proj.lora_A.weight"]
        assert torch.equal(a[0], fused_a)
    # and back: the same update matrices at the same ranks (fused at rank r again, not 3r)
    converted(tmp_path / "split", "--to", "peft", "--qkv", "fused", "--base", split_base, "--out", tmp_path / "back")
    assert_same_updates(peft_updates(tmp_path / "back"), peft_updates(tmp_path / "peft"))
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    source = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in source.items()}
    assert all(torch.equal(back[k], source[k]) for k in source)  # one scaling: the very same tensors


def test_peft_split_adapters_fuse_at_the_sum_of_ranks_unless_they_share_a(bases, tmp_path):  # noqa: F811
    base = bases("llama")
    fused_base = _hf_base(base, "fused", tmp_path / "phi3")
    want = make_peft_adapter(base, tmp_path / "peft", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=2,
                                                           lora_alpha=4))
    converted(tmp_path / "peft", "--to", "peft", "--qkv", "fused", "--base", base.directory, "--out", tmp_path / "f")
    assert diff(peft_logits(fused_base, tmp_path / "f"), want) < TOL
    t = load_file(tmp_path / "f" / "adapter_model.safetensors")
    assert t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"].shape == (4, 32)  # 2 + 2
    assert t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"].shape == (64, 4)
    assert t["base_model.model.model.layers.0.mlp.gate_up_proj.lora_A.weight"].shape == (2, 32)
    # q, k and v sharing one lora_A (what a split fused adapter is): fused at rank r
    shared = tmp_path / "shared"
    shared.mkdir()
    make_peft_adapter(base, shared, dict(target_modules=["q_proj", "k_proj", "v_proj"], r=2, lora_alpha=4))
    tensors = load_file(shared / "adapter_model.safetensors")
    for i in range(2):
        a = tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"]
        for p in "kv":
            tensors[f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_A.weight"] = a.clone()
    save_file(tensors, shared / "adapter_model.safetensors", metadata={"format": "pt"})
    converted(shared, "--to", "peft", "--qkv", "fused", "--base", base.directory, "--out", tmp_path / "sf")
    t = load_file(tmp_path / "sf" / "adapter_model.safetensors")
    assert t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"].shape == (2, 32)
    assert_same_updates(
        {k: v for k, v in peft_updates(tmp_path / "sf").items()},
        {f"model.layers.{i}.self_attn.qkv_proj": torch.cat([peft_updates(shared)[f"model.layers.{i}.self_attn.{p}_proj"]
                                                            for p in "qkv"]) for i in range(2)},
    )


def test_litgpt_lora_exports_to_the_fused_architecture(bases, tmp_path):  # noqa: F811
    base = bases("llama")
    _, want = make_lora_run(base, tmp_path / "run", dict(lora_query=True, lora_value=True, lora_mlp=True))
    fused_base = _hf_base(base, "fused", tmp_path / "phi3")
    converted(tmp_path / "run", "--to", "peft", "--qkv", "fused", "--out", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_up_proj", "qkv_proj"]
    assert diff(peft_logits(fused_base, tmp_path / "peft"), want) < TOL  # PeftModel reproduces litgpt's LoRA


def test_adapter_refusals(bases, tmp_path):  # noqa: F811
    base = bases("phi3")
    make_peft_adapter(base, tmp_path / "peft", dict(target_modules=["qkv_proj"], r=2, lora_alpha=4))
    assert "LoRA runs hold fused QKV only" in refused(tmp_path / "peft", "--to", "litgpt-lora", "--qkv", "split",
                                             "--base", base.directory, "--out", tmp_path / "no")
    assert "peft to peft with --qkv" in refused(tmp_path / "peft", "--to", "peft", "--base", base.directory,
                                                "--out", tmp_path / "no")
    assert "transform full models" in refused(tmp_path / "peft", "--to", "peft", "--qkv", "split", "--kv-heads", 4,
                                              "--out", tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_verify_tells_an_adapter_from_its_base(bases, tmp_path):  # noqa: F811
    base = bases("llama")
    make_peft_adapter(base, tmp_path / "peft", dict(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4))
    result = cli("verify", base.directory, tmp_path / "peft", "--json")  # the base from base_model_name_or_path
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert not report["passed"] and report["first_difference"] == "layer 0"
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    result = cli("verify", base.directory, tmp_path / "peft")
    assert result.exit_code == 2 and "names no base model; pass the base HF directory with --candidate-base" in result.output
