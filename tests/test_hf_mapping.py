"""Hugging Face <-> litgpt mapping (families.py, hf_format.py), family by family.

For every family (and every Falcon layout) a tiny random transformers model is saved with
save_pretrained; then
1. plan_hf_to_litgpt, run in memory, must give exactly the tensors litgpt's own
   convert_hf_checkpoint writes (where litgpt's converter covers the layout), load with strict=True
   into litgpt's GPT built from litgpt_config_from_hf, and compute transformers' logits;
2. plan_litgpt_to_hf must give back the original tensors bit for bit, and hf_config_from_litgpt with
   the converted tensors must load in AutoModelForCausalLM with no missing or unexpected keys and
   compute the same logits;
3. legacy=True must write litgpt <= 0.5.4's grouped `attn.attn`, which current litgpt's own legacy
   loader (qkv_reassemble on load) turns back into the same model.

litgpt's converter picks its copy function by the model name and reads the model from its config
registry (Config.from_name), so each case registers litgpt's config of a real model of that family
with the tiny sizes written in here (not derived by qkvconv), under a name that steers litgpt's
dispatch ("falcon-7b-...", "Qwen2.5-...", "Phi-3-..."): monkeypatch.setitem on
litgpt.config.name_to_config, undone after the test. That config is also the reference the
translated config is compared with, field by field, for everything the forward pass uses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf.families import FAMILIES
from qkvconv.formats.hf import (
    detect_family,
    hf_config_from_litgpt,
    litgpt_config_from_hf,
    litgpt_state_names,
    plan_hf_to_litgpt,
    plan_litgpt_to_hf,
)
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder

transformers = pytest.importorskip("transformers")
litgpt = pytest.importorskip("litgpt")
from litgpt import Config  # noqa: E402

from hf_models import (  # noqa: E402
    TOL,
    LLAMA_SIZES,
    FALCON_SIZES,
    CASES,
    BY_ID,
    NATIVE,
    REFUSED,
    litgpt_logits,
    hf_logits,
    assert_same_tensors,
    forward_fields,
    max_diff,
)


# ---------------------------------------------------------------------------------------------
# per family


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_hf_to_litgpt(case_id, built, monkeypatch, tmp_path):
    b = built(case_id)
    case, cfg = b.case, b.config_json
    family = detect_family(cfg)
    assert family is not None and family.architecture == cfg["architectures"][0]
    qkv = family.qkv
    assert getattr(qkv, "order", QKVOrder.SPLIT) == case.expect_order

    lit_cfg = litgpt_config_from_hf(cfg)
    ours = plan_hf_to_litgpt(cfg, list(b.tensors)).apply_in_memory(b.tensors)
    assert sorted(ours) == sorted(litgpt_state_names(lit_cfg))

    if case.litgpt_real is not None:
        reference = {**asdict(Config.from_name(case.litgpt_real)), **case.litgpt_tiny}
        assert forward_fields(lit_cfg) == forward_fields(reference)
    if case.converter:
        from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

        name = case.converter_name or f"{case.litgpt_real}-tiny-qkvconv"
        monkeypatch.setitem(litgpt.config.name_to_config, name, {**reference, "name": name})
        work = tmp_path / "hf"
        shutil.copytree(b.directory, work)
        convert_hf_checkpoint(checkpoint_dir=work, model_name=name)
        theirs = torch.load(work / "lit_model.pth", weights_only=True)
        if "lm_head.weight" not in theirs:
            # litgpt's falcon converter copies lm_head.weight only when the files have it; transformers
            # >= 5 leaves a tied head out, so litgpt's output would not even load (strict=True).
            assert case.id.startswith("falcon") and cfg["tie_word_embeddings"]
            theirs["lm_head.weight"] = theirs["transformer.wte.weight"]
        assert_same_tensors(ours, theirs)

    diff = max_diff(litgpt_logits(lit_cfg, ours), b.logits)
    print(f"{case_id}: litgpt(converted) vs transformers logits max abs diff {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_litgpt_to_hf(case_id, built, tmp_path):
    b = built(case_id)
    cfg = b.config_json
    lit_cfg = litgpt_config_from_hf(cfg)
    lit = plan_hf_to_litgpt(cfg, list(b.tensors)).apply_in_memory(b.tensors)

    back = plan_litgpt_to_hf(lit_cfg, list(lit), cfg).apply_in_memory(lit)
    assert_same_tensors(back, b.tensors)

    architecture = cfg["architectures"][0]
    for wanted in (architecture, None):
        hf_cfg = hf_config_from_litgpt(lit_cfg, wanted)
        assert hf_cfg["architectures"] == [wanted or b.case.inferred or architecture]
        plan = plan_litgpt_to_hf(lit_cfg, list(lit), hf_cfg)
        out = tmp_path / (wanted or "inferred")
        out.mkdir()
        (out / "config.json").write_text(plan.texts["config.json"])
        tensors = {k: v.clone() for k, v in plan.apply_in_memory(lit).items()}  # copies alias their source
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        diff = max_diff(hf_logits(out), b.logits)
        arch = hf_cfg["architectures"][0]
        print(f"{case_id}: transformers({arch}, config from litgpt) logits max abs diff {diff:.2e}")
        assert diff < TOL


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_legacy_grouped(case_id, built):
    b = built(case_id)
    cfg = b.config_json
    lit_cfg = litgpt_config_from_hf(cfg)
    current = plan_hf_to_litgpt(cfg, list(b.tensors)).apply_in_memory(b.tensors)
    legacy = plan_hf_to_litgpt(cfg, list(b.tensors), legacy=True).apply_in_memory(b.tensors)
    assert sorted(legacy) == sorted(litgpt_state_names(lit_cfg, legacy=True))
    heads = HeadLayout(lit_cfg["n_head"], lit_cfg["n_query_groups"], lit_cfg["head_size"])
    for name, t in legacy.items():
        if ".attn.attn." in name:
            sequential = reorder(t, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
            assert torch.equal(sequential, current[name.replace("attn.attn", "attn.qkv")])
        else:
            assert torch.equal(t, current[name])
    # current litgpt re-orders a legacy `attn.attn` on load with its own qkv_reassemble
    assert max_diff(litgpt_logits(lit_cfg, dict(legacy)), b.logits) < TOL
    # and a legacy litgpt checkpoint converts back to the original HF tensors
    assert_same_tensors(plan_litgpt_to_hf(lit_cfg, list(legacy), cfg).apply_in_memory(legacy), b.tensors)


# ---------------------------------------------------------------------------------------------
# real models: config.json as published on the Hub vs litgpt's own config of the same model

REAL_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7b-hf": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                      "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 4096,
                      "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
                      "vocab_size": 32000},
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                     "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                     "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32,
                     "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256},
    "Mistral-7B-v0.1": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
                        "tie_word_embeddings": False, "vocab_size": 32000},
    "Qwen2.5-7B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                   "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 131072,
                   "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
                   "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "tie_word_embeddings": False, "use_sliding_window": False,
                   "vocab_size": 152064},
    "Qwen2.5-0.5B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                     "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
                     "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24,
                     "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                     "sliding_window": 32768, "tie_word_embeddings": True, "use_sliding_window": False,
                     "vocab_size": 151936},
    "Gemma-2b": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 256, "hidden_act": "gelu",
                 "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048, "intermediate_size": 16384,
                 "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 18,
                 "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "vocab_size": 256000},
    "Gemma-7b": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "head_dim": 256, "hidden_act": "gelu",
                 "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3072, "intermediate_size": 24576,
                 "max_position_embeddings": 8192, "num_attention_heads": 16, "num_hidden_layers": 28,
                 "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "vocab_size": 256000},
    "pythia-160m": {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu",
                    "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                    "max_position_embeddings": 2048, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
                    "use_parallel_residual": True, "vocab_size": 50304},
    "falcon-7b": {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
                  "hidden_size": 4544, "layer_norm_epsilon": 1e-05, "multi_query": True,
                  "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
                  "parallel_attn": True, "vocab_size": 65024},
    "falcon-40b": {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
                   "hidden_size": 8192, "layer_norm_epsilon": 1e-05, "multi_query": True,
                   "new_decoder_architecture": True, "num_attention_heads": 128, "num_hidden_layers": 60,
                   "num_kv_heads": 8, "parallel_attn": True, "vocab_size": 65024},
    "falcon-180B": {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": False, "bias": False,
                    "hidden_size": 14848, "layer_norm_epsilon": 1e-05, "multi_query": True,
                    "new_decoder_architecture": True, "num_attention_heads": 232, "num_hidden_layers": 80,
                    "num_kv_heads": 8, "parallel_attn": True, "vocab_size": 65024},
    "Phi-3-mini-4k-instruct": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
                               "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 4096,
                               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                               "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None,
                               "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
                               "vocab_size": 32064},
    "Mixtral-8x7B-v0.1": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                          "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                          "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                          "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
                          "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32000},
    "Qwen3-30B-A3B": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
                      "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                      "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
                      "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
                      "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
                      "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
                      "sliding_window": None, "tie_word_embeddings": False, "use_sliding_window": False,
                      "vocab_size": 151936},
}

# Where litgpt 0.5.13's config of a real model computes something else than its Hub config.json:
KNOWN_LITGPT_DIFFERENCES = {
    # litgpt leaves norm_eps at its default 1e-5; the Hub files say rms_norm_eps 1e-6
    "Gemma-2b": {"norm_eps": (1e-6, 1e-5)},
    "Gemma-7b": {"norm_eps": (1e-6, 1e-5)},
    # transformers 5.3 masks keys with kv_idx > q_idx - sliding_window: 2047 positions; litgpt
    # (and the flash-attn window (2047, 0) the model was trained with) use 2048
    "Phi-3-mini-4k-instruct": {"sliding_window_size": (2047, 2048)},
}


@pytest.mark.parametrize("name", list(REAL_HF_CONFIGS))
def test_real_configs_match_litgpt(name):
    ours = forward_fields(litgpt_config_from_hf(REAL_HF_CONFIGS[name]))
    theirs = forward_fields(asdict(Config.from_name(name)))
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert diff == KNOWN_LITGPT_DIFFERENCES.get(name, {})


INFERRED_ARCHITECTURE = {
    "Llama-2-7b-hf": "LlamaForCausalLM", "Llama-3.1-8B": "LlamaForCausalLM", "Mistral-7B-v0.1": "MistralForCausalLM",
    "Qwen2.5-7B": "Qwen2ForCausalLM", "Gemma-2b": "GemmaForCausalLM", "pythia-160m": "GPTNeoXForCausalLM",
    "falcon-7b": "FalconForCausalLM", "falcon-40b": "FalconForCausalLM",
    "Mixtral-8x22B-v0.1": "MixtralForCausalLM", "Qwen3-235B-A22B": "Qwen3MoeForCausalLM",
    # a litgpt config does not say Phi-3 (fused tensors) from Mistral (split): the same function
    "Phi-3-mini-4k-instruct": "MistralForCausalLM",
}


@pytest.mark.parametrize("name", list(INFERRED_ARCHITECTURE))
def test_hf_config_from_real_litgpt_configs(name):
    lit_cfg = asdict(Config.from_name(name))
    hf_cfg = hf_config_from_litgpt(lit_cfg)
    assert hf_cfg["architectures"] == [INFERRED_ARCHITECTURE[name]]
    loaded = transformers.AutoConfig.for_model(**hf_cfg)  # transformers accepts it
    assert loaded.num_hidden_layers == lit_cfg["n_layer"] and loaded.vocab_size == lit_cfg["padded_vocab_size"]
    assert forward_fields(litgpt_config_from_hf(hf_cfg)) == forward_fields(lit_cfg)


def test_condensed_positions_are_linear_rope_scaling():
    """litgpt's rope_condense_ratio (LLaMA-2-7B-32K: positions / 8) rotates as transformers' linear RoPE
    scaling (inverse frequencies / 8): it was refused ("no supported architecture computes this model");
    now config.json says linear 8, which reads back as rope_adjustments {"factor": 8.0}. With a local
    RoPE base litgpt condenses the local layers' positions too, which no config.json says: refused.
    (tests/test_litgpt_configs.py checks the logits of the whole round trip.)"""
    lit_cfg = asdict(Config.from_name("LLaMA-2-7B-32K"))
    hf_cfg = hf_config_from_litgpt(lit_cfg)
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    assert hf_cfg["rope_parameters"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    back = litgpt_config_from_hf(hf_cfg)
    assert back["rope_adjustments"] == {"factor": 8.0} and "rope_condense_ratio" not in back
    assert forward_fields(back)["rope_condense_ratio"] == 1
    gemma3 = {**asdict(Config.from_name("Gemma-3-4b-it")), "rope_condense_ratio": 2, "rope_adjustments": None}
    with pytest.raises(UnsupportedFamily, match="differs in rope_condense_ratio"):
        hf_config_from_litgpt(gemma3)


def test_neox_rotary_share_survives_transformers(tmp_path):
    """transformers 5.3 re-reads GPT-NeoX's rotary share only from `rotary_pct`; qkvconv writes it."""
    lit_cfg = {**asdict(Config.from_name("pythia-160m")), "rotary_percentage": 0.5}
    hf_cfg = hf_config_from_litgpt(lit_cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters["partial_rotary_factor"] == 0.5


# ---------------------------------------------------------------------------------------------
# refusals and checks


def falcon(**flags: Any) -> dict[str, Any]:
    return {"architectures": ["FalconForCausalLM"], "model_type": "falcon", **FALCON_SIZES, **flags}


def llama(**flags: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA_SIZES, **flags}


def test_falcon_variants_by_flags():
    assert detect_family(falcon()).qkv.order is QKVOrder.SEQUENTIAL  # transformers' default: multi_query
    assert detect_family(falcon(multi_query=False)).qkv.order is QKVOrder.PER_HEAD
    grouped = detect_family(falcon(new_decoder_architecture=True, num_kv_heads=2))
    assert grouped.qkv.order is QKVOrder.GROUPED
    assert dict(grouped.block.norms) == {"ln_attn": "norm_1", "ln_mlp": "norm_2"}
    assert litgpt_config_from_hf(falcon())["n_query_groups"] == 1
    assert litgpt_config_from_hf(falcon(new_decoder_architecture=True, num_kv_heads=2))["n_query_groups"] == 2
    assert litgpt_config_from_hf(falcon(multi_query=False))["n_query_groups"] == 4


def test_alibi_is_refused():
    with pytest.raises(UnsupportedFamily, match=r"ALiBi.*LlamaForCausalLM.*FalconForCausalLM") as e:
        litgpt_config_from_hf(falcon(multi_query=False, parallel_attn=False, bias=True, alibi=True))
    assert e.value.exit_code == 2


def test_falcon_new_decoder_without_parallel_attn_is_refused():
    with pytest.raises(UnsupportedFamily, match="parallel_attn"):
        detect_family(falcon(new_decoder_architecture=True, parallel_attn=False))


def test_unknown_architecture():
    cfg = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    assert detect_family(cfg) is None
    with pytest.raises(QkvconvError, match="MambaForCausalLM.*supported: LlamaForCausalLM"):
        plan_hf_to_litgpt(cfg, [])
    assert detect_family({"model_type": "llama"}).architecture == "LlamaForCausalLM"


QWEN3_MOE = REAL_HF_CONFIGS["Qwen3-30B-A3B"]


@pytest.mark.parametrize(
    "cfg, feature",
    [
        (llama(attention_bias=True), "MLP biases"),
        (llama(mlp_bias=True), "bias on the attention output"),
        (llama(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
        (llama(hidden_act="gelu"), "activation 'gelu'"),
        ({**llama(), "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "use_bidirectional_attention": True},
         "bidirectional"),
        ({**QWEN3_MOE, "norm_topk_prob": False}, r"not renormalised over the chosen experts \(norm_topk_prob false"),
        ({**QWEN3_MOE, "decoder_sparse_step": 2}, r"dense MLP layers between the expert layers \(decoder_sparse_step\)"),
        ({**QWEN3_MOE, "mlp_only_layers": [3]}, r"dense MLP layers among the expert layers \(mlp_only_layers\)"),
        ({k: v for k, v in QWEN3_MOE.items() if k != "norm_topk_prob"}, "norm_topk_prob false"),  # the class default
    ],
)
def test_features_litgpt_lacks_are_refused(cfg, feature):
    with pytest.raises(UnsupportedFamily, match=feature):
        litgpt_config_from_hf(cfg)


def test_unexpected_and_missing_tensors_are_refused(built):
    b = built("qwen2-bias-tied")
    names = list(b.tensors)
    with pytest.raises(UnsupportedFamily, match="model.layers.0.mlp.experts.0.w1.weight"):
        plan_hf_to_litgpt(b.config_json, names + ["model.layers.0.mlp.experts.0.w1.weight"])
    with pytest.raises(QkvconvError, match="q_proj.bias"):
        plan_hf_to_litgpt(b.config_json, [n for n in names if n != "model.layers.1.self_attn.q_proj.bias"])
    # a non-weight buffer of older checkpoints is skipped by rule
    plan = plan_hf_to_litgpt(b.config_json, names + ["model.layers.0.self_attn.rotary_emb.inv_freq"])
    assert any("non-weight" in n for n in plan.notes)


def test_tied_head_must_equal_embedding(built):
    b = built("gemma-head-dim")
    lit_cfg = litgpt_config_from_hf(b.config_json)
    lit = plan_hf_to_litgpt(b.config_json, list(b.tensors)).apply_in_memory(b.tensors)
    lit["lm_head.weight"] = lit["lm_head.weight"] + 1
    plan = plan_litgpt_to_hf(lit_cfg, list(lit), b.config_json)
    with pytest.raises(QkvconvError, match="tie_word_embeddings"):
        plan.apply_in_memory(lit)


def test_config_json_must_describe_the_litgpt_model(built):
    b = built("llama3-gqa")
    lit_cfg = {**litgpt_config_from_hf(b.config_json), "n_query_groups": 4}
    with pytest.raises(QkvconvError, match="n_query_groups"):
        plan_litgpt_to_hf(lit_cfg, litgpt_state_names(lit_cfg), b.config_json)


def test_plans_are_data(built):
    b = built("phi3-fused")
    plan = plan_hf_to_litgpt(b.config_json, list(b.tensors))
    described = {r.output: r.describe() for r in plan.recipes}
    qkv = "transformer.h.0.attn.qkv.weight"
    assert described[qkv] == f"{qkv} <- model.layers.0.self_attn.qkv_proj.weight (rows kept in sequential order)"
    assert "take row block 2 of 2" in described["transformer.h.0.mlp.fc_2.weight"]
    assert "model_config.yaml" in plan.texts
    grouped = plan_hf_to_litgpt(built("falcon-40b-grouped").config_json, list(built("falcon-40b-grouped").tensors))
    assert any("reorder rows grouped -> sequential" in r.describe() for r in grouped.recipes)


@pytest.mark.parametrize("case_id, key, value", [("phi3-fused", "num_key_value_heads", 1),
                                                 ("falcon-7b-mqa", "num_attention_heads", 2)])
def test_fused_rows_must_match_the_head_counts(case_id, key, value, built, tmp_path):
    """Where the fused order needs no re-ordering (Phi-3's sequential rows, Falcon-7B's one K/V head), a
    config.json whose head counts disagree with the tensor is still refused, --no-verify and inspect too."""
    from typer.testing import CliRunner
    from qkvconv.cli import app

    b = built(case_id)
    src = tmp_path / "src"
    shutil.copytree(b.directory, src)
    (src / "config.json").write_text(json.dumps({**b.config_json, key: value}))
    runner = CliRunner()
    for args in (["convert", src, "--to", "litgpt", "--out", tmp_path / "out", "--no-verify"], ["inspect", src]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and "rows for H=" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_every_family_is_covered():
    """Every family litgpt computes (with some flags) has a tiny model here; every family it never computes
    has one in REFUSED or NATIVE (tests/test_refused_families.py, tests/test_fused_native.py: inspect names its
    layout, convert refuses)."""
    assert {c.hf["model_type"] for c in CASES} == {f.model_type for f in FAMILIES.values()
                                                    if f.convertible and not f.remote_code}
    # remote-code originals have no transformers class: tests/test_remote_twins.py builds them from their twin
    assert all(FAMILIES[f.twin].convertible and not FAMILIES[f.twin].remote_code
               for f in FAMILIES.values() if f.remote_code and f.twin)
    assert ({f.model_type for f in FAMILIES.values() if not f.convertible and not f.remote_code}
            <= {c.hf["model_type"] for c in REFUSED + NATIVE})
