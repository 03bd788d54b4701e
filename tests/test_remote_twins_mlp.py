"""Qwen-1 -> Qwen2ForCausalLM and the original OLMo (`hf_olmo`) -> OlmoForCausalLM: remote-code originals whose
config counts the gated MLP's rows of both halves (Read's divisor) and, for OLMo, whose up and gate rows share one
tensor (`ff_proj`, up rows first).

As in test_remote_twins.py no remote code runs: each original is built from a tiny random transformers twin by
the layout facts, checked against a second source (transformers 4.40's own OLMo conversion script, run on our
checkpoint; llama.cpp's gguf-py name map for Qwen-1), and `convert --to hf` must give the twin's class with no
missing or unexpected key and the twin's logits (1e-5 of their scale, float32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import TOKENS, hf_logits, litgpt_logits
from qkvconv.formats.hf import litgpt_config_from_hf
from test_remote_twins import build_twin, cli, exact, name_maps, write_fused_adapter

transformers = pytest.importorskip("transformers")
OLMO_SCRIPT = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
               / "qkvconv/transformers-4.40.0-scripts/convert_olmo_weights_to_hf.py")


def olmo_script() -> Path | None:
    """transformers 4.40's OLMo conversion script (5.3 no longer ships it), taken from that release's wheel on
    the package index into the cache on first use; None where the index cannot be reached."""
    if OLMO_SCRIPT.is_file():
        return OLMO_SCRIPT
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                              "transformers==4.40.0", "-d", tmp], capture_output=True)
        wheels = list(Path(tmp).glob("transformers-4.40.0-*.whl"))
        if got.returncode or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as wheel:
            text = wheel.read("transformers/models/olmo/convert_olmo_weights_to_hf.py")
    OLMO_SCRIPT.parent.mkdir(parents=True, exist_ok=True)
    partial = OLMO_SCRIPT.with_suffix(".partial")
    partial.write_bytes(text)
    partial.rename(OLMO_SCRIPT)
    return OLMO_SCRIPT
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
             max_position_embeddings=64, tie_word_embeddings=False)


def save(tensors: dict, config: dict, directory: Path) -> None:
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------
# Qwen-1

QWEN1_LAYER = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
               "mlp.gate_proj": "mlp.w2", "mlp.up_proj": "mlp.w1", "mlp.down_proj": "mlp.c_proj"}
QWEN1_TOP = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}


def qwen1_from_qwen2(twin: dict, directory: Path, **config) -> dict:
    """Qwen-1's file layout (c_attn = [q; k; v] rows with their biases, w2 the gate, w1 up) and its remote config
    keys (intermediate_size twice the MLP width), from the Qwen2 twin's tensors."""
    out = {theirs + ".weight": twin[hf + ".weight"] for hf, theirs in QWEN1_TOP.items()}
    for i in range(2):
        p, q = f"model.layers.{i}", f"transformer.h.{i}"
        out.update({f"{q}.{theirs}.weight": twin[f"{p}.{hf}.weight"] for hf, theirs in QWEN1_LAYER.items()})
        for kind in ("weight", "bias"):
            out[f"{q}.attn.c_attn.{kind}"] = torch.cat([twin[f"{p}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    save(out, {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
               "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
               "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 8,
               "intermediate_size": 96, "vocab_size": 96, "seq_length": 64, "max_position_embeddings": 64,
               "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "no_bias": True,
               "use_dynamic_ntk": True, "use_logn_attn": True, "tie_word_embeddings": False, "bf16": False,
               "fp16": False, "fp32": False, "torch_dtype": "float32", "eos_token_id": 5, **config}, directory)
    return out


@pytest.fixture(scope="module")
def qwen2_twin(tmp_path_factory):
    """A tiny MHA Qwen2 (q/k/v biases, none elsewhere), Qwen-1's shape."""
    return build_twin(tmp_path_factory.mktemp("qwen2-twin"), model_type="qwen2", **{**SIZES, "num_key_value_heads": 4},
                      rms_norm_eps=1e-6)


def test_qwen1_names_are_llama_cpps() -> None:
    """gguf-py's TensorNameMap (llama.cpp) sends each Qwen-1 name to the GGUF tensor of the Qwen2 name it is built
    from here: w2 to ffn_gate and w1 to ffn_up (the remote MLP is c_proj(w1(x) * silu(w2(x)))), c_attn to attn_qkv."""
    qwen, qwen2 = name_maps("QWEN", "QWEN2")
    pairs = {**QWEN1_TOP, **{f"model.layers.1.{hf}": f"transformer.h.1.{theirs}" for hf, theirs in QWEN1_LAYER.items()}}
    for hf, theirs in pairs.items():
        assert qwen.get_name(theirs) is not None and qwen.get_name(theirs) == qwen2.get_name(hf), (hf, theirs)
    assert qwen.get_name("transformer.h.1.attn.c_attn") == "blk.1.attn_qkv"


def test_qwen1_converts_to_qwen2_exactly(qwen2_twin, tmp_path) -> None:
    twin_dir, twin, logits = qwen2_twin
    source = tmp_path / "qwen1"
    qwen1_from_qwen2(twin, source)
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["naming"], report["qkv_order"], report["n_head"], report["n_query_groups"]) == (
        "fused attn.c_attn", "sequential", 4, 4)
    out = tmp_path / "qwen2"
    result = cli("convert", source, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "use_logn_attn acts only past seq_length (64 tokens" in said and "use_dynamic_ntk acts only past" in said
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["intermediate_size"], config["max_position_embeddings"]) == (
        ["Qwen2ForCausalLM"], 48, 64)
    assert config["eos_token_id"] == 5 and "auto_map" not in config and "use_logn_attn" not in config
    assert exact(hf_logits(out), logits)  # no missing, unexpected or mismatched key
    assert sorted(load_file(out / "model.safetensors")) == sorted(twin)
    lit = tmp_path / "lit"
    assert cli("convert", source, "--to", "litgpt", "--out", lit).exit_code == 0
    lit_cfg = litgpt_config_from_hf(json.loads((source / "config.json").read_text()))
    assert exact(litgpt_logits(lit_cfg, torch.load(lit / "lit_model.pth")), logits)


def test_qwen1_refusals(qwen2_twin, tmp_path) -> None:
    """Biases beyond c_attn (no_bias false), an intermediate_size that is no MLP's twice, and partial rotary
    (rotary_pct < 1, which Qwen2's attention does not apply): one line, exit 2, nothing written; w1 and w2 swapped (the same shapes) are another model."""
    _, twin, logits = qwen2_twin
    for n, (change, why) in enumerate((({"no_bias": False}, "no_bias false"),
                                       ({"intermediate_size": 97}, "intermediate_size must be an integer multiple of 2"),
                                       ({"rotary_pct": 0.5}, "differs in rope_n_elem"))):
        source = tmp_path / f"qwen1-{n}"
        qwen1_from_qwen2(twin, source, **change)
        result = cli("convert", source, "--to", "hf", "--out", tmp_path / "out")
        assert result.exit_code == 2 and why in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
        assert not (tmp_path / "out").exists()
    swapped = dict(twin)
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        swapped[f"{p}.gate_proj.weight"], swapped[f"{p}.up_proj.weight"] = twin[f"{p}.up_proj.weight"], twin[f"{p}.gate_proj.weight"]
    qwen1_from_qwen2(swapped, tmp_path / "swapped")
    assert cli("convert", tmp_path / "swapped", "--to", "hf", "--out", tmp_path / "wrong").exit_code == 0
    assert not exact(hf_logits(tmp_path / "wrong"), logits)


# ---------------------------------------------------------------------------------------------
# the original OLMo (hf_olmo)

OLMO_CONFIG = {"architectures": ["OLMoForCausalLM"], "model_type": "hf_olmo",
               "auto_map": {"AutoConfig": "configuration_olmo.OLMoConfig",
                            "AutoModelForCausalLM": "modeling_olmo.OLMoForCausalLM"},
               "d_model": 32, "n_heads": 4, "n_kv_heads": None, "n_layers": 2, "mlp_ratio": 4, "mlp_hidden_size": 96,
               "activation_type": "swiglu", "block_type": "sequential", "alibi": False, "rope": True,
               "rope_theta": 10000, "rope_full_precision": True, "multi_query_attention": False,
               "attention_layer_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": False,
               "bias_for_layer_norm": False, "include_bias": False, "clip_qkv": None, "scale_logits": False,
               "max_sequence_length": 64, "vocab_size": 90, "embedding_size": 96, "weight_tying": False,
               "eos_token_id": 7, "pad_token_id": 1, "embedding_layer_norm": False, "norm_after": False}


def olmo_from_twin(twin: dict, directory: Path, **config) -> dict:
    """hf_olmo's file layout (att_proj = [q; k; v], ff_proj = [up; gate]) from the OlmoForCausalLM twin."""
    out = {"model.transformer.wte.weight": twin["model.embed_tokens.weight"],
           "model.transformer.ff_out.weight": twin["lm_head.weight"]}
    for i in range(2):
        p, q = f"model.layers.{i}", f"model.transformer.blocks.{i}"
        out[f"{q}.att_proj.weight"] = torch.cat([twin[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv"])
        out[f"{q}.attn_out.weight"] = twin[f"{p}.self_attn.o_proj.weight"]
        out[f"{q}.ff_proj.weight"] = torch.cat([twin[f"{p}.mlp.up_proj.weight"], twin[f"{p}.mlp.gate_proj.weight"]])
        out[f"{q}.ff_out.weight"] = twin[f"{p}.mlp.down_proj.weight"]
    save(out, {**OLMO_CONFIG, **config}, directory)
    return out


@pytest.fixture(scope="module")
def olmo_twin(tmp_path_factory):
    """A tiny GQA OlmoForCausalLM (norms without weights, no biases)."""
    return build_twin(tmp_path_factory.mktemp("olmo-twin"), model_type="olmo", **{**SIZES, "num_key_value_heads": 2})


def test_olmo_layout_agrees_with_transformers_script(olmo_twin, tmp_path) -> None:
    """transformers 4.40's convert_olmo_weights_to_hf.py (someone else's reading of att_proj and ff_proj) turns our
    original checkpoint (as the OLMo trainer's model.pt: no "model." prefix) into the twin's tensors."""
    if olmo_script() is None:
        pytest.skip("transformers 4.40's convert_olmo_weights_to_hf.py is neither cached nor downloadable here")
    _, twin, _ = olmo_twin
    ours = olmo_from_twin(twin, tmp_path / "olmo", n_kv_heads=2)
    spec = importlib.util.spec_from_file_location("convert_olmo_440", OLMO_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    # its tokenizer import (unused here) is gone from transformers 5
    stub = type(sys)("tokenization_gpt_neox_fast")
    stub.GPTNeoXTokenizerFast = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "transformers.models.gpt_neox.tokenization_gpt_neox_fast", stub)
        spec.loader.exec_module(script)
    native = tmp_path / "native"
    native.mkdir()
    torch.save({k.removeprefix("model."): v for k, v in ours.items()}, native / "model.pt")
    import yaml
    (native / "config.yaml").write_text(yaml.safe_dump({"model": {**OLMO_CONFIG, "n_kv_heads": 2}}))
    script.write_model(str(tmp_path / "theirs"), str(native), safe_serialization=True)
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(theirs) == sorted(twin)
    assert all(torch.equal(theirs[k], twin[k]) for k in twin)
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["intermediate_size"] == 48


def test_olmo_original_converts_to_olmo_exactly(olmo_twin, tmp_path) -> None:
    twin_dir, twin, logits = olmo_twin
    source = tmp_path / "olmo"
    olmo_from_twin(twin, source, n_kv_heads=2)
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["family"], report["naming"], report["qkv_order"], report["n_query_groups"]) == (
        "OLMo original (remote code)", "fused att_proj", "sequential", 2)
    out = tmp_path / "hf"
    result = cli("convert", source, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["intermediate_size"], config["vocab_size"], config["pad_token_id"]) == (
        ["OlmoForCausalLM"], 48, 96, 1)
    assert exact(hf_logits(out), logits)
    assert sorted(load_file(out / "model.safetensors")) == sorted(twin)
    # mlp_hidden_size absent: d_model * mlp_ratio // 2 (here 32 * 3 // 2 = 48)
    ratio = tmp_path / "ratio"
    olmo_from_twin(twin, ratio, n_kv_heads=2, mlp_hidden_size=None, mlp_ratio=3)
    assert cli("convert", ratio, "--to", "hf", "--out", tmp_path / "hf-ratio").exit_code == 0
    assert exact(hf_logits(tmp_path / "hf-ratio"), logits)
    lit = tmp_path / "lit"
    assert cli("convert", source, "--to", "litgpt", "--out", lit).exit_code == 0
    lit_cfg = litgpt_config_from_hf(json.loads((source / "config.json").read_text()))
    assert exact(litgpt_logits(lit_cfg, torch.load(lit / "lit_model.pth")), logits)


@pytest.mark.parametrize("change, why", [
    ({"clip_qkv": 8.0}, "clip_qkv"), ({"layer_norm_with_affine": True}, "layer_norm_with_affine"),
    ({"include_bias": True}, "include_bias"), ({"rope": False}, "rope false"), ({"alibi": True}, "ALiBi"),
    ({"attention_layer_norm": True}, "attention_layer_norm"), ({"block_type": "llama"}, "block_type"),
])
def test_olmo_original_refusals(olmo_twin, tmp_path, change, why) -> None:
    _, twin, _ = olmo_twin
    source = tmp_path / "olmo"
    olmo_from_twin(twin, source, n_kv_heads=2, **change)
    result = cli("convert", source, "--to", "hf", "--out", tmp_path / "out")
    assert result.exit_code == 2 and why in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_olmo_multi_query_and_wrong_halves(olmo_twin, tmp_path) -> None:
    """multi_query_attention (n_kv_heads null) means one K/V head, so these GQA rows do not fit it (and n_kv_heads
    wins over it, as in transformers' script); ff_proj with gate rows first is another model."""
    _, twin, logits = olmo_twin
    source = tmp_path / "mqa"
    olmo_from_twin(twin, source, n_kv_heads=None, multi_query_attention=True)
    assert cli("inspect", source).exit_code == 2
    (source / "config.json").write_text(json.dumps({**OLMO_CONFIG, "multi_query_attention": True, "n_kv_heads": 2}))
    assert json.loads(cli("inspect", source, "--json").output)["n_query_groups"] == 2
    wrong = tmp_path / "wrong"
    tensors = olmo_from_twin(twin, wrong, n_kv_heads=2)
    for i in range(2):
        p = f"model.layers.{i}.mlp"
        tensors[f"model.transformer.blocks.{i}.ff_proj.weight"] = torch.cat(
            [twin[f"{p}.gate_proj.weight"], twin[f"{p}.up_proj.weight"]])
    save_file(tensors, wrong / "model.safetensors", metadata={"format": "pt"})
    assert cli("convert", wrong, "--to", "hf", "--out", tmp_path / "hf-wrong").exit_code == 0
    assert not exact(hf_logits(tmp_path / "hf-wrong"), logits)


# ---------------------------------------------------------------------------------------------
# PEFT adapters on the fused modules -> q/k/v adapters of the twin


def check_fused_adapter(twin_dir: Path, twin: dict, base: Path, module: str, heads, tmp_path: Path,
                        *options: str) -> None:
    """A PEFT LoRA on the original's fused module `module` (per layer "{i}") converts with --to peft --qkv split
    --base ORIGINAL: peft loads it on the twin, whose logits are the twin's with the fused update un-fused
    sequentially (the order checked against a second source above) merged in by hand."""
    peft = pytest.importorskip("peft")
    from qkvconv.model.layout import QKVOrder, split

    r, alpha = 2, 4
    adapter = tmp_path / "adapter"
    tensors = write_fused_adapter(adapter, module, heads.rows, base, r, alpha, seed=3)
    out = tmp_path / "split-adapter"
    result = cli("convert", adapter, "--to", "peft", "--qkv", "split", "--base", base, "--out", out, *options)
    assert result.exit_code == 0, result.output
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(twin_dir), out)
    merged = dict(twin)
    for i in range(2):
        key = f"base_model.model.{module.format(i=i)}"
        delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * (alpha / r)
        for part, d in zip("qkv", split(delta, QKVOrder.SEQUENTIAL, heads)):
            name = f"model.layers.{i}.self_attn.{part}_proj.weight"
            merged[name] = twin[name] + d
    oracle = transformers.AutoModelForCausalLM.from_pretrained(twin_dir)
    oracle.load_state_dict(merged)
    with torch.no_grad():
        assert exact(with_adapter.eval()(TOKENS).logits, oracle.eval()(TOKENS).logits)


def test_peft_adapter_on_qwen1_c_attn(qwen2_twin, tmp_path) -> None:
    from qkvconv.model.layout import HeadLayout

    twin_dir, twin, _ = qwen2_twin
    qwen1_from_qwen2(twin, tmp_path / "qwen1")
    check_fused_adapter(twin_dir, twin, tmp_path / "qwen1", "transformer.h.{i}.attn.c_attn", HeadLayout(4, 4, 8),
                        tmp_path)


def test_peft_adapter_on_olmo_att_proj(olmo_twin, tmp_path) -> None:
    from qkvconv.model.layout import HeadLayout

    twin_dir, twin, _ = olmo_twin
    olmo_from_twin(twin, tmp_path / "olmo", n_kv_heads=2)
    check_fused_adapter(twin_dir, twin, tmp_path / "olmo", "model.transformer.blocks.{i}.att_proj",
                        HeadLayout(4, 2, 8), tmp_path)
