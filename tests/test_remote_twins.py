"""Remote-code originals (families_remote.py) convert to their transformers twins exactly.

No remote code is run: each original is built from a tiny random transformers twin by the layout facts (tensor
names, the fused order, the config's own key names), and the fused tensor is checked against a second source
someone else wrote, llama.cpp's converter class for that architecture (its un-fusing code run on our tensor).
Then `convert --to hf` must give the twin's class with no missing or unexpected key and the twin's logits
(1e-5 of their scale, float32), and `convert --to litgpt` litgpt's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import LLAMA_SIZES, TOKENS, hf_logits, litgpt_logits, saved_random_model
from qkvconv.cli import app
from qkvconv.formats.hf import litgpt_config_from_hf
from qkvconv.model.layout import HeadLayout, QKVOrder, fuse

transformers = pytest.importorskip("transformers")
runner = CliRunner()
def llama_cpp() -> Path:
    """llama.cpp's converter tree (the llama-cpp-python 0.3.36 sdist), built by the GGUF tests' fixture script
    on first use and cached: the second source these tests read."""
    from gguf_oracle import converter_dir

    return converter_dir() / "llama.cpp"


def name_maps(*archs: str) -> list:
    """gguf-py's TensorNameMap (llama.cpp's, from the converter tree) of each MODEL_ARCH name, at 2 layers."""
    tree = llama_cpp()
    sys.path[:0] = [str(tree / "gguf-py")]
    try:
        import gguf
    finally:
        del sys.path[:1]
    return [gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), 2) for arch in archs]


def write_fused_adapter(adapter: Path, module: str, rows: int, base: Path, r: int, alpha: int, seed: int) -> dict:
    """A PEFT LoRA adapter (random A and B, two layers) on the fused module `module` ("...{i}..." per layer) of
    the original at `base`, written as peft saves one; its tensors."""
    torch.manual_seed(seed)
    adapter.mkdir()
    tensors = {}
    for i in range(2):
        key = f"base_model.model.{module.format(i=i)}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, 32) * 0.3
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, r) * 0.3
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": [module.rsplit(".", 1)[1]], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base)}))
    return tensors


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def build_twin(directory: Path, **settings):
    """A tiny transformers model with nonzero random weights, norms and biases, saved, with its logits."""
    _, logits = saved_random_model(settings, directory, seed=1)
    return directory, load_file(directory / "model.safetensors"), logits


@pytest.fixture(scope="module")
def llama_twin(tmp_path_factory):
    """A tiny GQA Llama (H=4, G=2, hs=8)."""
    return build_twin(tmp_path_factory.mktemp("llama-twin"), model_type="llama", **LLAMA_SIZES, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)


def exact(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def internlm2_from_llama(twin: dict, directory: Path) -> dict:
    """InternLM2's file layout (llama.cpp conversion/internlm.py, gguf-py tensor_mapping.py) and config keys
    (the remote InternLM2Config's), from the Llama twin's tensors."""
    heads = HeadLayout(4, 2, 8)
    out = {"model.tok_embeddings.weight": twin["model.embed_tokens.weight"], "model.norm.weight": twin["model.norm.weight"],
           "output.weight": twin["lm_head.weight"]}
    names = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    for i in range(2):
        p = f"model.layers.{i}"
        for hf, theirs in names.items():
            out[f"{p}.{theirs}.weight"] = twin[f"{p}.{hf}.weight"]
        q, k, v = (twin[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv")
        out[f"{p}.attention.wqkv.weight"] = fuse(q, k, v, QKVOrder.GROUPED, heads)
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 64,
              "rms_norm_eps": 1e-6, "bias": False, "rope_theta": 10000, "rope_scaling": None,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              "torch_dtype": "float32", "attn_implementation": "eager"}
    (directory / "config.json").write_text(json.dumps(config))
    return out


def test_internlm2_wqkv_agrees_with_llama_cpp(llama_twin, tmp_path) -> None:
    """llama.cpp's InternLM2Model.modify_tensors un-fuses our wqkv into the twin's q, k, v (q and k in its
    pairs order: LlamaModel.permute of the twin's)."""
    tree = llama_cpp()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    try:
        from conversion.internlm import InternLM2Model
        from conversion.llama import LlamaModel
        from conversion.base import TextModel
    finally:
        del sys.path[:2]
    _, twin, _ = llama_twin
    ours = internlm2_from_llama(twin, tmp_path / "internlm2")
    converter = object.__new__(InternLM2Model)
    converter.hparams = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32}
    converter.format_tensor_name = lambda kind, bid: f"{kind.name}.{bid}"
    original = TextModel.modify_tensors
    TextModel.modify_tensors = lambda self, data, name, bid: [(name, data)]
    try:
        got = dict(converter.modify_tensors(ours["model.layers.1.attention.wqkv.weight"],
                                            "model.layers.1.attention.wqkv.weight", 1))
    finally:
        TextModel.modify_tensors = original
    p = "model.layers.1.self_attn"
    assert torch.equal(got["ATTN_Q.1"], LlamaModel.permute(twin[f"{p}.q_proj.weight"], 4, 4))
    assert torch.equal(got["ATTN_K.1"], LlamaModel.permute(twin[f"{p}.k_proj.weight"], 4, 2))
    assert torch.equal(got["ATTN_V.1"], twin[f"{p}.v_proj.weight"])
    # and a wrong fusion (sequential) is caught by the same oracle
    q, k, v = (twin[f"{p}.{x}_proj.weight"] for x in "qkv")
    TextModel.modify_tensors = lambda self, data, name, bid: [(name, data)]
    try:
        wrong = dict(converter.modify_tensors(torch.cat([q, k, v]), "model.layers.1.attention.wqkv.weight", 1))
    finally:
        TextModel.modify_tensors = original
    assert not torch.equal(wrong["ATTN_V.1"], v)


def test_internlm2_converts_to_llama_exactly(llama_twin, tmp_path) -> None:
    twin_dir, twin, logits = llama_twin
    source = tmp_path / "internlm2"
    internlm2_from_llama(twin, source)
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["family"], report["naming"], report["qkv_order"]) == ("InternLM2 (remote code)",
                                                                         "fused attention.wqkv", "grouped")
    assert (report["n_head"], report["n_query_groups"], report["head_size"]) == (4, 2, 8)
    out = tmp_path / "llama"
    result = cli("convert", source, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert exact(hf_logits(out), logits)  # hf_logits asserts no missing, unexpected or mismatched key
    assert sorted(load_file(out / "model.safetensors")) == sorted(twin)
    lit = tmp_path / "lit"
    assert cli("convert", source, "--to", "litgpt", "--out", lit).exit_code == 0
    state = torch.load(lit / "lit_model.pth")
    lit_logits = litgpt_logits(litgpt_config_from_hf(json.loads((source / "config.json").read_text())), state)
    assert exact(lit_logits, logits)


def test_internlm2_refuses_what_llama_lacks(llama_twin, tmp_path) -> None:
    """The remote class's default bias=true (wqkv and wo biased, MLP not) and dynamic RoPE scaling: refused."""
    _, twin, _ = llama_twin
    source = tmp_path / "internlm2"
    internlm2_from_llama(twin, source)
    config = json.loads((source / "config.json").read_text())
    for change, why in (({"bias": None}, "a bias on the attention output but no MLP biases"),
                        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'")):
        (source / "config.json").write_text(json.dumps({**config, **change}))
        result = cli("convert", source, "--to", "hf", "--out", tmp_path / "out")
        assert result.exit_code == 2 and why in result.output, result.output
        assert not (tmp_path / "out").exists()


PHI_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=96,
                 max_position_embeddings=64, partial_rotary_factor=0.5, layer_norm_eps=1e-5, tie_word_embeddings=False)
PHI_MSFT_NAMES = {"model.embed_tokens": "transformer.embd.wte", "model.final_layernorm": "lm_head.ln",
                  "lm_head": "lm_head.linear"}
PHI_MSFT_LAYER = {"input_layernorm": "ln", "self_attn.dense": "mixer.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def phi_msft_from_phi(twin: dict, directory: Path) -> dict:
    """Phi-2's original layout (names as gguf-py's tensor_mapping lists them for phi2; Wqkv sequential, as
    ggml's attn_qkv) and its GPT-2-style config keys, from the HF Phi twin's tensors."""
    out = {}
    for kind in ("weight", "bias"):
        for hf, theirs in PHI_MSFT_NAMES.items():
            if f"{hf}.{kind}" in twin:
                out[f"{theirs}.{kind}"] = twin[f"{hf}.{kind}"]
        for i in range(2):
            for hf, theirs in PHI_MSFT_LAYER.items():
                out[f"transformer.h.{i}.{theirs}.{kind}"] = twin[f"model.layers.{i}.{hf}.{kind}"]
            out[f"transformer.h.{i}.mixer.Wqkv.{kind}"] = torch.cat(
                [twin[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    directory.mkdir()
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["PhiForCausalLM"], "model_type": "phi-msft",
              "auto_map": {"AutoConfig": "configuration_phi.PhiConfig", "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
              "n_embd": 32, "n_layer": 2, "n_head": 4, "n_head_kv": None, "n_inner": None, "rotary_dim": 4,
              "n_positions": 64, "vocab_size": 96, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    return out


def test_phi_msft_names_are_llama_cpps(tmp_path) -> None:
    """gguf-py's TensorNameMap (llama.cpp) sends each original Phi-2 name to the GGUF tensor of the HF Phi name
    it is built from here; mixer.Wqkv to attn_qkv, whose rows ggml's phi2 graph reads as Q, K, V in turn."""
    (names,) = name_maps("PHI2")
    pairs = {**PHI_MSFT_NAMES, **{f"model.layers.1.{hf}": f"transformer.h.1.{theirs}" for hf, theirs in PHI_MSFT_LAYER.items()}}
    for hf, theirs in pairs.items():
        assert names.get_name(theirs) is not None and names.get_name(theirs) == names.get_name(hf), (hf, theirs)
    assert names.get_name("transformer.h.1.mixer.Wqkv") == "blk.1.attn_qkv"


def test_phi_msft_converts_to_phi_exactly(tmp_path) -> None:
    twin_dir, twin, logits = build_twin(tmp_path / "phi", model_type="phi", **PHI_SIZES)
    source = tmp_path / "phi-msft"
    phi_msft_from_phi(twin, source)
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["naming"], report["qkv_order"], report["n_head"], report["head_size"]) == (
        "fused mixer.Wqkv", "sequential", 4, 8)
    assert "on the first 4 of 8 dims of each Q/K head (config.json rotary_dim)" in " ".join(report["evidence"])
    out = tmp_path / "out"
    result = cli("convert", source, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PhiForCausalLM"] and config["model_type"] == "phi"
    assert exact(hf_logits(out), logits)
    assert sorted(load_file(out / "model.safetensors")) == sorted(twin)
    # the same file read as if rotary_dim were the whole head is another model: the key matters
    wrong = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**wrong, "rotary_dim": 8}))
    assert cli("convert", source, "--to", "hf", "--out", tmp_path / "wrong").exit_code == 0
    assert not exact(hf_logits(tmp_path / "wrong"), logits)


def test_peft_adapter_on_internlm2_wqkv_becomes_llama_q_k_v_adapters(llama_twin, tmp_path) -> None:
    """A PEFT LoRA on InternLM2's grouped `wqkv` converts (--to peft --qkv split) to adapters on the Llama twin's
    q/k/v_proj: peft itself loads them on the twin, and its logits are the twin's with the fused update
    un-fused by the grouped order (checked against llama.cpp above) merged in."""
    peft = pytest.importorskip("peft")
    from qkvconv.model.layout import split

    twin_dir, twin, _ = llama_twin
    base = tmp_path / "internlm2"
    internlm2_from_llama(twin, base)
    heads, r, alpha = HeadLayout(4, 2, 8), 2, 4
    adapter = tmp_path / "adapter"
    tensors = write_fused_adapter(adapter, "model.layers.{i}.attention.wqkv", heads.rows, base, r, alpha, seed=3)
    out = tmp_path / "llama-adapter"
    result = cli("convert", adapter, "--to", "peft", "--qkv", "split", "--base", base, "--out", out)
    assert result.exit_code == 0, result.output
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "k_proj", "v_proj"}

    model = transformers.AutoModelForCausalLM.from_pretrained(twin_dir)
    with_adapter = peft.PeftModel.from_pretrained(model, out)
    with_adapter.eval()
    with torch.no_grad():
        got = with_adapter(TOKENS).logits
    merged = dict(twin)
    for i in range(2):
        key = f"base_model.model.model.layers.{i}.attention.wqkv"
        delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (alpha / r)
        for part, d in zip("qkv", split(delta, QKVOrder.GROUPED, heads)):
            merged[f"model.layers.{i}.self_attn.{part}_proj.weight"] = twin[f"model.layers.{i}.self_attn.{part}_proj.weight"] + d
    oracle = transformers.AutoModelForCausalLM.from_pretrained(twin_dir)
    oracle.load_state_dict(merged, strict=False)
    oracle.eval()
    with torch.no_grad():
        want = oracle(TOKENS).logits
    assert exact(got, want)
    with torch.no_grad():
        assert not exact(transformers.AutoModelForCausalLM.from_pretrained(twin_dir)(TOKENS).logits, want)


def test_peft_adapter_on_phi_msft_wqkv_becomes_phi_adapters(tmp_path) -> None:
    """The same for the original Phi-2's sequential mixer.Wqkv -> HF Phi's q/k/v_proj."""
    peft = pytest.importorskip("peft")
    from qkvconv.model.layout import split

    twin_dir, twin, _ = build_twin(tmp_path / "phi", model_type="phi", **PHI_SIZES)
    base = tmp_path / "phi-msft"
    phi_msft_from_phi(twin, base)
    heads, r, alpha = HeadLayout(4, 4, 8), 3, 3
    adapter = tmp_path / "adapter"
    tensors = write_fused_adapter(adapter, "transformer.h.{i}.mixer.Wqkv", heads.rows, base, r, alpha, seed=4)
    out = tmp_path / "phi-adapter"
    result = cli("convert", adapter, "--to", "peft", "--qkv", "split", "--base", base, "--out", out)
    assert result.exit_code == 0, result.output
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(twin_dir), out)
    with_adapter.eval()
    merged = dict(twin)
    for i in range(2):
        key = f"base_model.model.transformer.h.{i}.mixer.Wqkv"
        delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (alpha / r)
        for part, d in zip("qkv", split(delta, QKVOrder.SEQUENTIAL, heads)):
            name = f"model.layers.{i}.self_attn.{part}_proj.weight"
            merged[name] = twin[name] + d
    oracle = transformers.AutoModelForCausalLM.from_pretrained(twin_dir)
    oracle.load_state_dict(merged)
    oracle.eval()
    with torch.no_grad():
        assert exact(with_adapter(TOKENS).logits, oracle(TOKENS).logits)


def test_verify_settles_internlm2_against_its_twin(llama_twin, tmp_path) -> None:
    """`verify` computes the remote original through the table: the twin agrees with it, and a copy whose wqkv
    was fused in the wrong order (sequential, same shapes) is caught."""
    twin_dir, twin, _ = llama_twin
    good, bad = tmp_path / "good", tmp_path / "bad"
    internlm2_from_llama(twin, good)
    tensors = internlm2_from_llama(twin, bad)
    for i in range(2):
        q, k, v = (twin[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv")
        tensors[f"model.layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
    save_file({k: v.contiguous() for k, v in tensors.items()}, bad / "model.safetensors", metadata={"format": "pt"})
    assert cli("verify", twin_dir, good).exit_code == 0
    result = cli("verify", twin_dir, bad)
    assert result.exit_code == 1, result.output


# Remote-code originals inspect names without a twin to convert to: (config.json, the fused tensor's name per layer,
# order, (H, G, hs), a phrase of the evidence, why `convert --to hf` refuses). Tensors are zeros of the shapes the
# layout implies. (JAIS is verified and written --to gguf: tests/test_jais_verify.py.)
INSPECT_ONLY = {
    "jais": ({"architectures": ["JAISLMHeadModel"], "model_type": "jais", "n_embd": 32, "n_head": 4, "n_layer": 2,
              "position_embedding_type": "alibi", "auto_map": {}},
             "transformer.h.{i}.attn.c_attn", "sequential", (4, 4, 8), "stored transposed as [in, out] (Conv1D)",
             "has no litgpt equivalent"),
    "phi3small": ({"architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "hidden_size": 32,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "auto_map": {}},
                  "model.layers.{i}.self_attn.query_key_value", "grouped", (4, 2, 8), "query_key_value",
                  "not converted yet"),
}


@pytest.mark.parametrize("name", sorted(INSPECT_ONLY))
def test_remote_originals_inspect_names_the_layout(name: str, tmp_path) -> None:
    config, tensor, order, (H, G, hs), phrase, refusal = INSPECT_ONLY[name]
    source = tmp_path / name
    source.mkdir()
    rows = (H + 2 * G) * hs
    shape = (32, rows) if name == "jais" else (rows, 32)  # JAIS's c_attn is a Conv1D
    save_file({tensor.format(i=i) + ".weight": torch.zeros(shape) for i in range(2)}, source / "model.safetensors",
              metadata={"format": "pt"})
    (source / "config.json").write_text(json.dumps(config))
    result = cli("inspect", source, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["qkv_order"], report["n_head"], report["n_query_groups"], report["head_size"]) == (order, H, G, hs)
    assert phrase in " | ".join(report["evidence"]) and refusal in report["notes"][0]
    out = tmp_path / "out"
    refused = cli("convert", source, "--to", "hf", "--out", out)
    assert refused.exit_code == 2 and refusal in " ".join(refused.output.split()) and not out.exists()
    (source / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "n_embd": 48}))  # columns do not fit
    assert cli("inspect", source).exit_code == 2
