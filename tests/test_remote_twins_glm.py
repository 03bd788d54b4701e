"""ChatGLM2/3, GLM-4 (remote code) -> GlmForCausalLM, exactly: both rotate the first half of each head in pairs
order, so the rows copy unchanged and the pairs order travels as litgpt's rope_interleave.

Built from a tiny random Glm twin by the layout facts (query_key_value = [q; k; v] with biases, dense_h_to_4h =
[gate; up], the remote config's keys, RoPE base 10000 * rope_ratio); names checked through llama.cpp's gguf-py
name map for its chatglm and glm4 architectures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import LLAMA_SIZES, hf_logits, litgpt_logits
from qkvconv.formats.hf import litgpt_config_from_hf
from test_remote_twins import build_twin, cli, exact, name_maps

transformers = pytest.importorskip("transformers")
TOP = {"model.embed_tokens": "transformer.embedding.word_embeddings", "model.norm": "transformer.encoder.final_layernorm",
       "lm_head": "transformer.output_layer"}
LAYER = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
         "self_attn.o_proj": "self_attention.dense", "mlp.gate_up_proj": "mlp.dense_h_to_4h",
         "mlp.down_proj": "mlp.dense_4h_to_h"}


@pytest.fixture(scope="module")
def glm_twin(tmp_path_factory):
    """A tiny GQA Glm (H=4, G=2, hs=8, rotary on 4 dims in pairs, base 20000, q/k/v biases)."""
    return build_twin(tmp_path_factory.mktemp("glm"), model_type="glm", **{**LLAMA_SIZES, "head_dim": 8},
                      pad_token_id=None, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5})


def chatglm_from_glm(twin: dict, directory: Path, **config) -> dict:
    out = {theirs + ".weight": twin[hf + ".weight"] for hf, theirs in TOP.items()}
    out["transformer.rotary_pos_emb.inv_freq"] = torch.ones(2)  # a buffer the released files carry
    for i in range(2):
        p, q = f"model.layers.{i}", f"transformer.encoder.layers.{i}"
        out.update({f"{q}.{theirs}.weight": twin[f"{p}.{hf}.weight"] for hf, theirs in LAYER.items()})
        for kind in ("weight", "bias"):
            out[f"{q}.self_attention.query_key_value.{kind}"] = torch.cat(
                [twin[f"{p}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4,
        "multi_query_attention": True, "multi_query_group_num": 2, "padded_vocab_size": 96, "seq_length": 64,
        "layernorm_epsilon": 1e-5, "rmsnorm": True, "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True, "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "original_rope": True, "rope_ratio": 2, "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32", **config}))
    return out


def test_chatglm_names_are_llama_cpps() -> None:
    """gguf-py's TensorNameMap sends each ChatGLM name (with "transformer." stripped, as llama.cpp's ChatGLMModel
    does) to the GGUF tensor that the Glm name it is built from gets under glm4; query_key_value to attn_qkv."""
    chatglm, glm4 = name_maps("CHATGLM", "GLM4")
    pairs = {**TOP, **{f"model.layers.1.{hf}": f"transformer.encoder.layers.1.{theirs}" for hf, theirs in LAYER.items()}}
    for hf, theirs in pairs.items():
        got = chatglm.get_name(theirs.removeprefix("transformer."))
        assert got is not None and got == glm4.get_name(hf), (hf, theirs, got, glm4.get_name(hf))
    assert chatglm.get_name("encoder.layers.1.self_attention.query_key_value") == "blk.1.attn_qkv"


def test_chatglm_converts_to_glm_exactly(glm_twin, tmp_path) -> None:
    twin_dir, twin, logits = glm_twin
    source = tmp_path / "chatglm"
    chatglm_from_glm(twin, source)
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["qkv_order"], report["n_head"], report["n_query_groups"], report["head_size"]) == (
        "sequential", 4, 2, 8)
    assert "rotary, pairs order, on the first 4 of 8 dims" in " | ".join(report["evidence"])
    out = tmp_path / "glm"
    result = cli("convert", source, "--to", "hf", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GlmForCausalLM"] and config["rope_parameters"]["rope_theta"] == 20000.0
    assert exact(hf_logits(out), logits)  # no missing, unexpected or mismatched key
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(twin) and all(torch.equal(got[k], twin[k]) for k in twin)  # rows unchanged
    lit = tmp_path / "lit"
    assert cli("convert", source, "--to", "litgpt", "--out", lit).exit_code == 0
    lit_cfg = litgpt_config_from_hf(json.loads((source / "config.json").read_text()))
    assert lit_cfg["rope_interleave"] is True
    assert exact(litgpt_logits(lit_cfg, torch.load(lit / "lit_model.pth")), logits)
    # litgpt (pairs) -> hf again: GlmForCausalLM, the same function
    back = tmp_path / "back"
    assert cli("convert", lit, "--to", "hf", "--out", back).exit_code == 0
    assert exact(hf_logits(back), logits)


def test_chatglm_rope_ratio_and_refusals(glm_twin, tmp_path) -> None:
    """rope_ratio is read (another base is another model); what Glm lacks is refused in one line."""
    _, twin, logits = glm_twin
    plain = tmp_path / "ratio1"
    chatglm_from_glm(twin, plain, rope_ratio=1)
    assert cli("convert", plain, "--to", "hf", "--out", tmp_path / "o1").exit_code == 0
    assert not exact(hf_logits(tmp_path / "o1"), logits)
    for n, (change, why) in enumerate((({"add_bias_linear": True}, "add_bias_linear"), ({"rmsnorm": False}, "rmsnorm"),
                                       ({"apply_residual_connection_post_layernorm": True}, "post_layernorm"))):
        source = tmp_path / f"c{n}"
        chatglm_from_glm(twin, source, **change)
        result = cli("convert", source, "--to", "hf", "--out", tmp_path / "out")
        assert result.exit_code == 2 and why in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
        assert not (tmp_path / "out").exists()


def test_peft_adapter_on_query_key_value(glm_twin, tmp_path) -> None:
    """A PEFT LoRA on ChatGLM's query_key_value becomes q/k/v adapters of the Glm twin, its rows left in pairs
    order (a permutation on the way would be caught: peft's logits are compared with the update merged by hand)."""
    from qkvconv.model.layout import HeadLayout
    from test_remote_twins_mlp import check_fused_adapter

    twin_dir, twin, _ = glm_twin
    chatglm_from_glm(twin, tmp_path / "chatglm")
    check_fused_adapter(twin_dir, twin, tmp_path / "chatglm",
                        "transformer.encoder.layers.{i}.self_attention.query_key_value", HeadLayout(4, 2, 8), tmp_path)


def test_verify_settles_chatglm_against_glm(glm_twin, tmp_path) -> None:
    """`verify` computes the original through the table (pairs rotation on half of each head): the twin agrees,
    and a copy whose Q/K rows were put in half order (same shapes) is caught."""
    from qkvconv.model.rotary import RopeOrder, rope_permutation
    from qkvconv.model.layout import HeadLayout, QKVOrder

    twin_dir, twin, _ = glm_twin
    good, bad = tmp_path / "good", tmp_path / "bad"
    chatglm_from_glm(twin, good)
    tensors = chatglm_from_glm(twin, bad)
    index = rope_permutation(QKVOrder.SEQUENTIAL, HeadLayout(4, 2, 8), 4, RopeOrder.PAIRS, RopeOrder.HALF)
    for i in range(2):
        for kind in ("weight", "bias"):
            name = f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"
            tensors[name] = tensors[name][index]
    save_file({k: v.contiguous() for k, v in tensors.items()}, bad / "model.safetensors", metadata={"format": "pt"})
    assert cli("verify", twin_dir, good).exit_code == 0
    assert cli("verify", twin_dir, bad).exit_code == 1


def test_chatglm_without_multi_query_is_per_head(tmp_path) -> None:
    """Without multi_query_attention the remote SelfAttention views query_key_value's output as
    (heads, 3 * head_dim) and splits each head in three: per-head rows, MHA. Built that way from an MHA Glm, it
    converts to the twin's logits; the same rows read sequentially would not."""
    from qkvconv.model.layout import HeadLayout, QKVOrder, reorder

    twin_dir, twin, logits = build_twin(tmp_path / "glm-mha", model_type="glm", **{**LLAMA_SIZES, "head_dim": 8,
                                        "num_key_value_heads": 4}, pad_token_id=None, eos_token_id=2,
                                        tie_word_embeddings=False, rms_norm_eps=1e-5,
                                        rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                                         "partial_rotary_factor": 0.5})
    heads = HeadLayout(4, 4, 8)
    for order, name in ((QKVOrder.PER_HEAD, "per-head"), (QKVOrder.SEQUENTIAL, "sequential")):
        source = tmp_path / f"chatglm-{name}"
        written = chatglm_from_glm(twin, source, multi_query_attention=False, multi_query_group_num=None)
        for i in range(2):
            for kind in ("weight", "bias"):
                key = f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"
                written[key] = reorder(written[key], QKVOrder.SEQUENTIAL, order, heads)
        save_file({k: v.contiguous() for k, v in written.items()}, source / "model.safetensors",
                  metadata={"format": "pt"})
        assert json.loads(cli("inspect", source, "--json").output)["qkv_order"] == "per-head"
        out = tmp_path / f"glm-from-{name}"
        assert cli("convert", source, "--to", "hf", "--out", out).exit_code == 0
        assert exact(hf_logits(out), logits) == (order is QKVOrder.PER_HEAD)
