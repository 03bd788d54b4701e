"""Tiny random transformers models of every family qkvconv maps, shared by the test modules: each is
saved with save_pretrained (nonzero random weights, norms and biases included) with the logits it
computes. The `built` fixture (conftest.py) builds them on demand, once per test module."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qkvconv.model.architecture import Architecture
from qkvconv.model.layout import QKVOrder

transformers = pytest.importorskip("transformers")
litgpt = pytest.importorskip("litgpt")
from litgpt import Config  # noqa: E402
from litgpt.model import GPT  # noqa: E402

TOL = 1e-5
VOCAB, POSITIONS = 96, 64
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class Case:
    id: str
    hf: dict[str, Any]  # config.json settings for AutoConfig.for_model
    expect_order: QKVOrder  # where transformers keeps q/k/v
    litgpt_real: str | None = None  # litgpt's config of a real model of this family (None: litgpt has none)
    litgpt_tiny: dict[str, Any] = field(default_factory=dict)  # its sizes, for the tiny model
    converter: bool = True  # litgpt's convert_hf_checkpoint covers this layout
    inferred: str | None = None  # what hf_config_from_litgpt picks without an architecture (default: the same)
    converter_name: str | None = None  # name to register for litgpt's converter (default: "<litgpt_real>-tiny-qkvconv")
    refused: str | None = None  # REFUSED: the reason convert gives ("X with FEATURE has no litgpt equivalent")


def attention_of(model_type: str) -> dict[str, Any]:
    """transformers' SDPA path drops Gemma 2's attention soft-capping (its docs ask for eager for Gemma 2
    and 3): the oracle computes what the model is, eagerly."""
    return {"attn_implementation": "eager"} if model_type in ("gemma2", "gemma3_text") else {}


def tiny(**kw: Any) -> dict[str, Any]:
    """litgpt sizes of the tiny models: 2 layers, 4 query heads."""
    return {"n_layer": 2, "vocab_size": VOCAB, "padded_vocab_size": VOCAB, "block_size": POSITIONS, "n_head": 4, **kw}


LLAMA_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=POSITIONS)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
NEOX_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=POSITIONS)
FALCON_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                    max_position_embeddings=POSITIONS)

CASES = [
    Case("llama3-gqa", {"model_type": "llama", **LLAMA_SIZES, "rms_norm_eps": 1e-5, "rope_parameters": LLAMA3_ROPE},
         QKVOrder.SPLIT, "Llama-3.1-8B", tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48)),
    Case("mistral-window", {"model_type": "mistral", **LLAMA_SIZES, "rms_norm_eps": 1e-5, "sliding_window": 4},
         QKVOrder.SPLIT, "Mistral-7B-v0.1",
         tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48, sliding_window_size=4,
              sliding_window_indices=[1, 1])),
    # q/k/v biases; the window on layer 1 only (max_window_layers); tied head (as Qwen2.5-0.5B)
    Case("qwen2-bias-tied", {"model_type": "qwen2", **LLAMA_SIZES, "rope_parameters": {"rope_theta": 1e6},
                             "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
                             "tie_word_embeddings": True},
         QKVOrder.SPLIT, "Qwen2.5-0.5B",
         tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48, sliding_window_size=4,
              sliding_window_indices=[0, 1])),
    # RMSNorm over head_dim on each query and key head (q_norm, k_norm -> attn.norm_q/norm_k); head_dim
    # 16 != hidden / heads; no q/k/v bias
    Case("qwen3-qk-norm", {"model_type": "qwen3", **LLAMA_SIZES, "head_dim": 16, "rope_parameters": {"rope_theta": 1e6}},
         QKVOrder.SPLIT, "Qwen3-0.6B", tiny(n_embd=32, n_query_groups=2, head_size=16, intermediate_size=48)),
    # LayerNorm with biases, a quarter of each head's dims rotating, q/k/v biases (stablelm-2's use_qkv_bias)
    Case("stablelm-partial", {"model_type": "stablelm", **LLAMA_SIZES, "use_qkv_bias": True},
         QKVOrder.SPLIT, "stablelm-3b-4e1t",
         tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48, attn_bias=True), converter=False),
    # use_parallel_residual: one input_layernorm feeds attention and MLP
    Case("stablelm-parallel", {"model_type": "stablelm", **LLAMA_SIZES, "use_parallel_residual": True},
         QKVOrder.SPLIT, converter=False),
    # Phi-2's layout: biases everywhere (the head too), one LayerNorm feeding attention and MLP in parallel,
    # half of each head's dims rotating; GQA here (the released Phis are MHA)
    Case("phi-parallel", {"model_type": "phi", **LLAMA_SIZES, "partial_rotary_factor": 0.5},
         QKVOrder.SPLIT, "phi-2", tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48,
                                       rotary_percentage=0.5)),
    # head_dim 16 != hidden / heads; (1 + w) RMSNorm; scaled and tied embeddings. litgpt's Gemma
    # configs use norm_eps 1e-5 where the HF files say 1e-6 (see test_real_configs): set here.
    Case("gemma-head-dim", {"model_type": "gemma", **LLAMA_SIZES, "head_dim": 16},
         QKVOrder.SPLIT, "Gemma-2b",
         tiny(n_embd=32, n_query_groups=2, head_size=16, intermediate_size=48, norm_eps=1e-6),
         # "Gemma-2b-..." would send litgpt's converter to its Gemma-2 code (name.lower().startswith("gemma-2"))
         converter_name="Gemma-tiny-qkvconv"),
    # Gemma 2: norms after attention and MLP, attention and final logit soft-capping, a window on every
    # other layer, query_pre_attn_scalar != head_dim (caps small enough to matter)
    Case("gemma2-softcap", {"model_type": "gemma2", **LLAMA_SIZES, "head_dim": 16, "sliding_window": 4,
                            "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                            "query_pre_attn_scalar": 20},
         QKVOrder.SPLIT, "Gemma-2-2b",
         tiny(n_embd=32, n_query_groups=2, head_size=16, intermediate_size=48, norm_eps=1e-6, sliding_window_size=4,
              sliding_window_indices=[1, 0], attention_logit_softcapping=5.0, final_logit_softcapping=3.0,
              attention_scores_scalar=20)),
    # Gemma 3 (text): (1 + w) query/key norms, RoPE per layer type (the local base on the sliding layers,
    # the global base with linear scaling on the others), norms after attention and MLP
    Case("gemma3-local-rope", {"model_type": "gemma3_text", **LLAMA_SIZES, "num_hidden_layers": 3, "head_dim": 16,
                               "sliding_window": 4, "query_pre_attn_scalar": 20,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                               "rope_parameters": {
                                   "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
         QKVOrder.SPLIT, "Gemma-3-4b-it",
         tiny(n_layer=3, n_embd=32, n_query_groups=2, head_size=16, intermediate_size=48, norm_eps=1e-6,
              sliding_window_size=4, sliding_window_indices=[1, 0, 1], rope_indices=[1, 0, 1],
              attention_scores_scalar=20)),
    # OLMo 1: LayerNorms without weight or bias (no norm tensors at all; litgpt knows by "OLMo" in the name)
    Case("olmo-no-norm-weights", {"model_type": "olmo", **LLAMA_SIZES, "num_key_value_heads": 4},
         QKVOrder.SPLIT, "OLMo-1B-hf", tiny(n_embd=32, n_query_groups=4, head_size=8, intermediate_size=48)),
    # OLMo 2: RMSNorms over all of q and all of k, no input norms, norms after attention and MLP
    Case("olmo2-qk-norm", {"model_type": "olmo2", **LLAMA_SIZES, "rms_norm_eps": 1e-6,
                           "rope_parameters": {"rope_theta": 500000.0}},
         QKVOrder.SPLIT, "OLMo-2-1124-7B", tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48)),
    # mixture of experts: a router and 4 SiLU-gated experts per layer, 2 per token, renormalised; a window
    Case("mixtral-moe", {"model_type": "mixtral", **LLAMA_SIZES, "num_local_experts": 4, "num_experts_per_tok": 2,
                         "sliding_window": 4},
         QKVOrder.SPLIT, "Mixtral-8x7B-v0.1",
         tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48, n_expert=4, n_expert_per_token=2,
              sliding_window_size=4, sliding_window_indices=[1, 1])),
    # experts of their own size (moe_intermediate_size), query/key norms, renormalised top-k (norm_topk_prob)
    Case("qwen3-moe", {"model_type": "qwen3_moe", **LLAMA_SIZES, "head_dim": 16, "num_experts": 4,
                       "num_experts_per_tok": 2, "moe_intermediate_size": 24, "norm_topk_prob": True,
                       "rope_parameters": {"rope_theta": 1e6}},
         QKVOrder.SPLIT, "Qwen3-30B-A3B",
         tiny(n_embd=32, n_query_groups=2, head_size=16, intermediate_size=48, moe_intermediate_size=24, n_expert=4,
              n_expert_per_token=2)),
    Case("neox-parallel", {"model_type": "gpt_neox", **NEOX_SIZES, "rotary_pct": 0.25},
         QKVOrder.PER_HEAD, "pythia-160m", tiny(n_embd=64, n_query_groups=4, head_size=16, intermediate_size=96)),
    Case("neox-sequential",
         {"model_type": "gpt_neox", **NEOX_SIZES, "rotary_pct": 0.25, "use_parallel_residual": False},
         QKVOrder.PER_HEAD, "pythia-160m",
         tiny(n_embd=64, n_query_groups=4, head_size=16, intermediate_size=96, parallel_residual=False)),
    Case("falcon-7b-mqa", {"model_type": "falcon", **FALCON_SIZES, "multi_query": True, "parallel_attn": True},
         QKVOrder.SEQUENTIAL, "falcon-7b", tiny(n_embd=32, n_query_groups=1, head_size=8, intermediate_size=128)),
    Case("falcon-40b-grouped",
         {"model_type": "falcon", **FALCON_SIZES, "new_decoder_architecture": True, "num_kv_heads": 2},
         QKVOrder.GROUPED, "falcon-40b", tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=128)),
    # falcon-rw's layout (per-head MHA, two sequential norms, biases) without its ALiBi. litgpt has no
    # such config and its falcon converter knows only the 7b/40b norm names. The same function is a
    # GPT-NeoX with full rotary and no parallel residual, which hf_config_from_litgpt prefers.
    Case("falcon-rw-per-head", {"model_type": "falcon", **FALCON_SIZES, "multi_query": False, "parallel_attn": False,
                                "bias": True},
         QKVOrder.PER_HEAD, converter=False, inferred="GPTNeoXForCausalLM"),
    # Falcon2-11B's layout: grouped GQA, one shared norm (num_ln_in_parallel_attn = 1); not in litgpt.
    Case("falcon2-shared-norm", {"model_type": "falcon", **FALCON_SIZES, "new_decoder_architecture": True,
                                 "num_kv_heads": 2, "num_ln_in_parallel_attn": 1},
         QKVOrder.GROUPED, converter=False),
    # fused sequential qkv_proj, fused gate_up_proj, partial rotary (as Phi-4-mini), a sliding window
    Case("phi3-fused", {"model_type": "phi3", **LLAMA_SIZES, "original_max_position_embeddings": POSITIONS,
                        "sliding_window": 5, "partial_rotary_factor": 0.5, "pad_token_id": 0, "bos_token_id": 1,
                        "eos_token_id": 2},
         QKVOrder.SEQUENTIAL, "Phi-3-mini-4k-instruct",
         tiny(n_embd=32, n_query_groups=2, head_size=8, intermediate_size=48, rotary_percentage=0.5,
              sliding_window_size=5, sliding_window_indices=[1, 1])),
    # StarCoder2: LayerNorms, GELU MLP c_fc/c_proj, biases everywhere (use_bias), sequential residual, GQA,
    # a window on every layer, tied head. litgpt has no such config and its converter no such layout.
    Case("starcoder2-window", {"model_type": "starcoder2", **LLAMA_SIZES, "sliding_window": 4, "norm_epsilon": 1e-2,
                               "rope_parameters": {"rope_theta": 1e5}},
         QKVOrder.SPLIT, converter=False),
    # ... without biases and MHA: the same function as a Falcon with per-head MHA and two sequential norms,
    # which hf_config_from_litgpt prefers (it comes first)
    Case("starcoder2-no-bias", {"model_type": "starcoder2", **LLAMA_SIZES, "num_key_value_heads": 4, "use_bias": False,
                                "hidden_act": "gelu"},
         QKVOrder.SPLIT, converter=False, inferred="FalconForCausalLM"),
    # GLM-4 (Glm): rotary in pairs order on half of each head (litgpt rope_interleave), gate_up_proj, q/k/v biases
    Case("glm-pairs", {"model_type": "glm", **LLAMA_SIZES, "head_dim": 8, "pad_token_id": None, "eos_token_id": 2},
         QKVOrder.SPLIT, converter=False),
    # Granite with neutral residual and logits multipliers: Llama with the scores scaled by
    # attention_multiplier (litgpt attention_scores_scalar 256) and the embeddings by sqrt(hidden_size)
    # (litgpt scale_embeddings); biases everywhere
    Case("granite-neutral", {"model_type": "granite", **LLAMA_SIZES, "attention_multiplier": 0.0625,
                             "embedding_multiplier": 32 ** 0.5, "attention_bias": True, "mlp_bias": True},
         QKVOrder.SPLIT, converter=False),
    # SmolLM3 with RoPE in every layer (no_rope_layers all 1): Llama, tied, with a window on layer 1
    Case("smollm3-all-rope", {"model_type": "smollm3", **LLAMA_SIZES, "no_rope_layers": [1, 1], "pad_token_id": None,
                              "use_sliding_window": True, "sliding_window": 4,
                              "layer_types": ["full_attention", "sliding_attention"]},
         QKVOrder.SPLIT, converter=False),
]
BY_ID = {c.id: c for c in CASES}

# Families (or flags of families) litgpt has no equivalent of: `inspect` names their layout, `convert`
# refuses with exactly this reason.
REFUSED = [
    # no no_rope_layers: SmolLM3Config derives [1, 1, 1, 0] (every fourth layer without RoPE)
    Case("smollm3-nope", {"model_type": "smollm3", **LLAMA_SIZES, "num_hidden_layers": 4, "pad_token_id": None},
         QKVOrder.SPLIT,
         refused="SmolLM3ForCausalLM with layers without rotary (no_rope_layers) has no litgpt equivalent"),
    Case("smollm3-window-flash-only",
         {"model_type": "smollm3", **LLAMA_SIZES, "no_rope_layers": [1, 1], "pad_token_id": None, "sliding_window": 4,
          "layer_types": ["full_attention", "sliding_attention"]},
         QKVOrder.SPLIT, refused="SmolLM3ForCausalLM with a window that transformers' eager and SDPA attention apply "
                                 "and flash attention does not (sliding layers in layer_types, use_sliding_window "
                                 "false) has no litgpt equivalent"),
    # Granite 3-like multipliers (values as remembered from the Hub, not read here)
    Case("granite-3-multipliers", {"model_type": "granite", **LLAMA_SIZES, "embedding_multiplier": 12.0,
                                   "attention_multiplier": 0.0078125, "residual_multiplier": 0.22,
                                   "logits_scaling": 8.0},
         QKVOrder.SPLIT, refused="GraniteForCausalLM with residual branches scaled by residual_multiplier, logits "
                                 "divided by logits_scaling and embeddings scaled by embedding_multiplier=12.0 (litgpt "
                                 "scales them by sqrt(n_embd) or not at all) has no litgpt equivalent"),
    # CohereConfig's defaults: logit_scale 0.0625, tied head; MHA here
    Case("cohere", {"model_type": "cohere", **LLAMA_SIZES, "num_key_value_heads": 4},
         QKVOrder.SPLIT, refused="CohereForCausalLM with logits scaled by logit_scale and LayerNorms without a bias "
                                 "(CohereLayerNorm; litgpt's LayerNorm always has one) has no litgpt equivalent"),
    # per-head query/key norms (q_norm, k_norm tensors), GQA, logits not scaled
    Case("cohere-qk-norm", {"model_type": "cohere", **LLAMA_SIZES, "use_qk_norm": True, "logit_scale": 1.0},
         QKVOrder.SPLIT, refused="CohereForCausalLM with a LayerNorm per query/key head with its own weights "
                                 "(use_qk_norm) and LayerNorms without a bias (CohereLayerNorm; litgpt's LayerNorm "
                                 "always has one) has no litgpt equivalent"),
]
REFUSED_BY_ID = {c.id: c for c in REFUSED}

# Transformers-native classes with a fused QKV matrix that litgpt cannot compute (families_fused.py): inspect
# names their layout, convert refuses (tests/test_fused_native.py). Settings that would make the scaling oracle
# inexact are off: DBRX's clip_qkv (a clamp) far above any value (transformers 5.3's DbrxAttention fails on a
# null clip_qkv: `clamp(min=None, max=None)`), Persimmon's LayerNorm eps on q/k (1e-12).
GPT2_SIZES = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS)
NATIVE = [
    Case("gpt2", {"model_type": "gpt2", **GPT2_SIZES}, QKVOrder.SEQUENTIAL,
         refused="GPT2LMHeadModel with learned absolute position embeddings (transformer.wpe) has no litgpt equivalent"),
    Case("gpt-bigcode-mqa", {"model_type": "gpt_bigcode", **GPT2_SIZES, "multi_query": True}, QKVOrder.SEQUENTIAL,
         refused="GPTBigCodeForCausalLM with learned absolute position embeddings (transformer.wpe) has no litgpt "
                 "equivalent"),
    Case("gpt-bigcode-mha", {"model_type": "gpt_bigcode", **GPT2_SIZES, "multi_query": False}, QKVOrder.PER_HEAD,
         refused="GPTBigCodeForCausalLM with learned absolute position embeddings (transformer.wpe) has no litgpt "
                 "equivalent"),
    Case("bloom", {"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB},
         QKVOrder.PER_HEAD, refused="BloomForCausalLM with ALiBi position biases and a LayerNorm on the embeddings "
                                    "has no litgpt equivalent"),
    Case("mpt", {"model_type": "mpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB,
                 "max_seq_len": POSITIONS}, QKVOrder.SEQUENTIAL,
         refused="MptForCausalLM with ALiBi position biases and LayerNorms without a bias (no_bias) has no litgpt "
                 "equivalent"),
    Case("dbrx-gqa", {"model_type": "dbrx", "d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB,
                      "max_seq_len": POSITIONS, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 1e4},
                      "ffn_config": {"ffn_hidden_size": 32, "hidden_size": 32, "moe_num_experts": 2, "moe_top_k": 1}},
         QKVOrder.SEQUENTIAL, refused="DbrxForCausalLM with LayerNorms without a bias (litgpt's LayerNorm always has "
                                      "one) has no litgpt equivalent"),
    Case("persimmon", {"model_type": "persimmon", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 48, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
                       "layer_norm_eps": 1e-12},
         QKVOrder.PER_HEAD, refused="PersimmonForCausalLM with the squared-ReLU MLP (relu2) and LayerNorms with biases "
                                    "on each query/key head (qk_layernorm) has no litgpt equivalent"),
    # 8 heads: two per mp_num block; head size 6 with 4 rotating dims
    Case("codegen", {"model_type": "codegen", "n_embd": 48, "n_layer": 2, "n_head": 8, "vocab_size": VOCAB,
                     "n_positions": POSITIONS, "rotary_dim": 4},
         QKVOrder.CODEGEN_MP4, refused="CodeGenForCausalLM with no bias on the attention output but MLP biases "
                                       "(litgpt's `bias` switches both together) has no litgpt equivalent"),
]
NATIVE_BY_ID = {c.id: c for c in NATIVE}


@dataclass
class Built:
    case: Case
    directory: Path  # save_pretrained output
    config_json: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor


def saved_random_model(settings: dict[str, Any], directory: Path, seed: int = 0, **from_config: Any
                       ) -> tuple[Any, torch.Tensor]:
    """A tiny transformers model of `settings` (AutoConfig.for_model), every parameter random and nonzero (norms
    and biases too, so a wrong one shows), saved to `directory`; the model and its logits on TOKENS."""
    config = transformers.AutoConfig.for_model(**settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, **from_config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.eval()
    model.save_pretrained(directory)
    with torch.no_grad():
        return model, model(TOKENS).logits


def _build(case: Case, directory: Path) -> Built:
    _, logits = saved_random_model(case.hf, directory, **attention_of(case.hf["model_type"]))
    config_json = json.loads((directory / "config.json").read_text())
    return Built(case, directory, config_json, load_file(directory / "model.safetensors"), logits)


def litgpt_logits(litgpt_cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = GPT(Config(**litgpt_cfg))
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(TOKENS)


def hf_logits(directory: Path) -> torch.Tensor:
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    **attention_of(model_type))
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def forward_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    fields = asdict(Architecture.from_litgpt_config(cfg))
    del fields["name"]
    return fields


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
