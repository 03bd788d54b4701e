"""Hugging Face model families as data: per architecture, where every tensor lives and what it means.

    family = FAMILIES["FalconForCausalLM"].resolve(json.load(open("config.json")))
    family.qkv        # Fused(name='self_attention.query_key_value', order=<QKVOrder.GROUPED>, ...)
    family.block.norms  # {'ln_attn': 'norm_1', 'ln_mlp': 'norm_2'}

One `Family` entry per `architectures[0]` of a config.json says
- the tensor names: `layer_prefix` ("model.layers.{i}"), where q/k/v live (`Split` into three
  projections, or `Fused` into one matrix whose rows are in a `QKVOrder`) and how many key/value heads
  they hold, the norms (`Block`), the other per-layer modules with their litgpt names, the embedding,
  final norm and output head;
- where config.json keeps each number (`Read`: the first key present; dotted paths reach into nested
  dicts such as `rope_parameters`; else the default of transformers' config class);
- the litgpt Config fields the family implies (norm and MLP classes, residual layout, biases, ...).

A value that depends on config flags is a `Choose`: the first case whose flags all match. Falcon is
the one family that needs it: `new_decoder_architecture` and `multi_query` pick the QKV row order and
head count, `parallel_attn` and `num_ln_in_parallel_attn` the norms and residual layout.

Modules are named without `.weight` / `.bias`: a module's weight and bias (where present) map alike.
config.py and plans.py turn an entry into a litgpt config and into conversion plans; no code here is per family.
Every layout below was checked against transformers 5.3 modeling code (cited per entry), litgpt 0.5.13's
convert_hf_checkpoint.py, and by tests/test_hf_mapping.py on tiny random models of each family.
"""

from __future__ import annotations

from dataclasses import replace

from qkvconv.formats.hf.table import (  # noqa: F401 (the schema, re-exported with the data)
    Biases,
    Block,
    Choose,
    Family,
    Fused,
    HFConfig,
    MoE,
    Not,
    SET,
    Read,
    SlidingWindow,
    Split,
)
from qkvconv.model.layout import QKVOrder

# ---------------------------------------------------------------------------------------------
# shared pieces (pieces.py), re-exported; the entries of families_more.py

from qkvconv.formats.hf.pieces import (  # noqa: F401
    GATED_MLP,
    GELU_APPROXIMATE,
    IGNORED_EVERYWHERE,
    LLAMA_STYLE_QKV,
    PRE_NORMS,
    ROPE_THETA,
    ROTARY_FRACTION,
    SILU,
    llama_style_config,
    partial_rotary,
)
from qkvconv.formats.hf.families_fused import NATIVE_FUSED
from qkvconv.formats.hf.families_remote import REMOTE
from qkvconv.formats.hf.families_more import COHERE, GLM, GRANITE, SMOLLM3, STARCODER2

# ---------------------------------------------------------------------------------------------
# the table

# transformers/models/llama/modeling_llama.py: q/k/v/o_proj (bias=attention_bias), gate/up/down_proj
# (bias=mlp_bias), head_dim = config.head_dim or hidden_size // num_attention_heads.
LLAMA = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    name="Llama",
    layer_prefix="model.layers.{i}",
    qkv=LLAMA_STYLE_QKV,
    block=PRE_NORMS,
    layer_tensors=GATED_MLP,
    embedding="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=11008, vocab=32000,
                              positions=2048, eps=1e-6, act="silu", tied=False),
    biases=Biases(qkv=Read("attention_bias", default=False), attn_out=Read("attention_bias", default=False),
                  mlp=Read("mlp_bias", default=False)),
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    ignored=IGNORED_EVERYWHERE,
)

# mistral/modeling_mistral.py: Llama without biases, plus a sliding window on every layer
# (config.sliding_window, default 4096; null turns it off).
MISTRAL = replace(
    LLAMA,
    architecture="MistralForCausalLM",
    model_type="mistral",
    name="Mistral",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=8)),
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=14336, vocab=32000,
                              positions=4096 * 32, eps=1e-6, act="silu", tied=False),
    biases=Biases(qkv=False, attn_out=False, mlp=False),
    sliding_window=SlidingWindow(Read("sliding_window", default=4096)),
)

# qwen2/modeling_qwen2.py: q/k/v_proj bias=True, o_proj and MLP without; the window applies only when
# use_sliding_window, on the layers `layer_types` marks (default: layers >= max_window_layers).
QWEN2 = replace(
    LLAMA,
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    name="Qwen2",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=32)),
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=22016, vocab=151936,
                              positions=32768, eps=1e-6, act="silu", tied=False),
    biases=Biases(qkv=True, attn_out=False, mlp=False),
    sliding_window=SlidingWindow(
        Read("sliding_window", default=4096),
        enabled=Read("use_sliding_window", default=False),
        layer_types="layer_types",
        first_layer=Read("max_window_layers", default=28),
    ),
)

# qwen3/modeling_qwen3.py: Qwen2 without the q/k/v bias (attention_bias switches every attention
# projection's bias, default False) and with an RMSNorm over head_dim on each query and key head
# (q_norm, k_norm), applied after the split into heads and before RoPE, as litgpt's norm_qk "default";
# head_dim is its own setting (default 128).
QWEN3 = replace(
    QWEN2,
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    name="Qwen3",
    config=llama_style_config(head_size=Read("head_dim", default=128), intermediate=22016, vocab=151936,
                              positions=32768, eps=1e-6, act="silu", tied=False),
    biases=Biases(qkv=Read("attention_bias", default=False), attn_out=Read("attention_bias", default=False), mlp=False),
    layer_tensors={**GATED_MLP, "self_attn.q_norm": "attn.norm_q", "self_attn.k_norm": "attn.norm_k"},
    norm_qk="default",
)

# stablelm/modeling_stablelm.py: Llama's layout with LayerNorm (weight and bias), rotary on the first
# partial_rotary_factor of each head's dims (half order), q/k/v biases by use_qkv_bias; with
# use_parallel_residual one input_layernorm feeds attention and MLP (litgpt's shared_attention_norm).
# qk_layernorm is a LayerNorm per query/key head, each head with its own weights: litgpt has none.
STABLELM = replace(
    LLAMA,
    architecture="StableLmForCausalLM",
    model_type="stablelm",
    name="StableLM",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=32)),
    block=Choose(
        ({"use_parallel_residual": False}, PRE_NORMS),
        ({"use_parallel_residual": True},
         Block({"input_layernorm": "norm_1"}, parallel_residual=True, shared_attention_norm=True)),
    ),
    config=replace(
        llama_style_config(head_size=None, intermediate=6912, vocab=50304, positions=4096, eps=1e-5, act="silu",
                           tied=False,
                           rotary_fraction=partial_rotary(0.25)),
        norm_eps=Read("layer_norm_eps", default=1e-5),
    ),
    biases=Biases(qkv=Read("use_qkv_bias", default=False), attn_out=False, mlp=False),
    norm_class_name="LayerNorm",
    flag_defaults={"use_parallel_residual": False, "qk_layernorm": False},
    unsupported=(({"qk_layernorm": True}, "a LayerNorm per query/key head with its own weights (qk_layernorm)"),),
)

# phi/modeling_phi.py (Phi-1, Phi-1.5, Phi-2): q/k/v and dense with biases; one input_layernorm
# (LayerNorm) feeds attention and MLP in parallel: x + attn(ln(x)) + mlp(ln(x)); the MLP is
# fc2(gelu_new(fc1(x))); rotary on the first partial_rotary_factor of each head's dims (half order);
# final_layernorm; the head has a bias. qk_layernorm is off in every released Phi.
PHI = Family(
    architecture="PhiForCausalLM",
    model_type="phi",
    name="Phi",
    layer_prefix="model.layers.{i}",
    qkv=LLAMA_STYLE_QKV,
    block=Block({"input_layernorm": "norm_1"}, parallel_residual=True, shared_attention_norm=True),
    layer_tensors={"self_attn.dense": "attn.proj", "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj"},
    embedding="model.embed_tokens",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
    config=HFConfig(
        n_embd=Read("hidden_size"),
        n_layer=Read("num_hidden_layers"),
        n_head=Read("num_attention_heads"),
        head_size=None,
        intermediate_size=Read("intermediate_size", default=8192),
        vocab_size=Read("vocab_size", default=51200),
        block_size=Read("max_position_embeddings", default=2048),
        norm_eps=Read("layer_norm_eps", default=1e-5),
        activation=Read("hidden_act", default="gelu_new"),
        tie_embeddings=Read("tie_word_embeddings", default=False),
        rope_theta=ROPE_THETA,
        rotary_fraction=partial_rotary(0.5),
    ),
    biases=Biases(qkv=True, attn_out=True, mlp=True),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    lm_head_bias=True,
    flag_defaults={"qk_layernorm": False},
    unsupported=(({"qk_layernorm": True}, "a LayerNorm over each query/key head (qk_layernorm)"),),
    ignored=IGNORED_EVERYWHERE,
)

# olmo/modeling_olmo.py (OLMo 1): Llama's layout with LayerNorms that have no weight and no bias
# (OlmoLayerNorm), so no norm tensors at all; clip_qkv clamps q/k/v, which litgpt does not.
OLMO = replace(
    LLAMA,
    architecture="OlmoForCausalLM",
    model_type="olmo",
    name="OLMo",
    config=replace(
        llama_style_config(head_size=None, intermediate=11008, vocab=50304, positions=2048, eps=1e-5, act="silu",
                           tied=False),
        norm_eps=Read("layer_norm_eps", default=1e-5),
    ),
    norm_class_name="LayerNorm",
    norm_affine=False,
    flag_defaults={"clip_qkv": None},
    unsupported=(({"clip_qkv": SET}, "q/k/v clipping (clip_qkv)"),),
)

# olmo2/modeling_olmo2.py: Llama's projections and MLP with no input norms: a norm after attention and
# after the MLP (post_attention_layernorm, post_feedforward_layernorm, before each residual add), and
# RMSNorms over all of q and all of k (q_norm: n_heads * head_dim, k_norm: n_kv_heads * head_dim)
# before the split into heads: litgpt's norm_qk "olmo2", norm_1 and norm_2 off.
OLMO2 = replace(
    LLAMA,
    architecture="Olmo2ForCausalLM",
    model_type="olmo2",
    name="OLMo 2",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=None)),
    block=Block({"post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_mlp_norm"},
                parallel_residual=False),
    layer_tensors={**GATED_MLP, "self_attn.q_norm": "attn.norm_q", "self_attn.k_norm": "attn.norm_k"},
    config=llama_style_config(head_size=None, intermediate=11008, vocab=50304, positions=2048, eps=1e-5, act="silu",
                              tied=False),
    norm_qk="olmo2",
)

# gemma/modeling_gemma.py: GemmaRMSNorm computes x * (1 + weight) in float32; embeddings are scaled by
# hidden_size ** 0.5 in the model dtype; head_dim is its own setting (256 in the real models); the
# MLP is gelu(gate) * up; the head is tied by default. transformers >= 5 reads only `hidden_act`:
# a config.json that also has `hidden_activation` (gemma-2b/7b: hidden_act "gelu", hidden_activation
# "gelu_pytorch_tanh") gets exact GELU there, while transformers 4 and litgpt use the tanh
# approximation the model was trained with; qkvconv follows `hidden_activation` where present.
GEMMA = replace(
    LLAMA,
    architecture="GemmaForCausalLM",
    model_type="gemma",
    name="Gemma",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=16)),
    config=replace(
        llama_style_config(head_size=Read("head_dim", default=256), intermediate=24576, vocab=256000,
                           positions=8192, eps=1e-6, act="gelu_pytorch_tanh", tied=True),
        activation=Read("hidden_activation", "hidden_act", default="gelu_pytorch_tanh"),
    ),
    biases=Biases(qkv=Read("attention_bias", default=False), attn_out=Read("attention_bias", default=False), mlp=False),
    mlp_class_name="GemmaMLP",
    norm_unit_offset=True,
    scale_embeddings=True,
    flag_defaults={"use_bidirectional_attention": None},
    unsupported=(({"use_bidirectional_attention": True}, "bidirectional attention (use_bidirectional_attention)"),),
)

# phi3/modeling_phi3.py: qkv_proj rows are sequential (query_pos = num_heads * head_dim; q = rows
# [:query_pos], k = the next num_key_value_heads * head_dim, v = the rest); gate_up_proj holds the
# gate rows then the up rows (`gate, up = up_states.chunk(2, dim=-1)`, up * act(gate)); no biases;
# partial rotary via partial_rotary_factor (Phi-4-mini); a sliding window on every layer when set.
PHI3 = replace(
    LLAMA,
    architecture="Phi3ForCausalLM",
    model_type="phi3",
    name="Phi-3",
    qkv=Fused("self_attn.qkv_proj", QKVOrder.SEQUENTIAL, kv_heads=Read("num_key_value_heads", default=None)),
    layer_tensors={"self_attn.o_proj": "attn.proj", "mlp.down_proj": "mlp.proj"},
    fused_rows={"mlp.gate_up_proj": ("mlp.fc_1", "mlp.fc_2")},
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=8192, vocab=32064,
                              positions=4096, eps=1e-5, act="silu", tied=False, rotary_fraction=ROTARY_FRACTION),
    biases=Biases(qkv=False, attn_out=False, mlp=False),
    sliding_window=SlidingWindow(Read("sliding_window", default=None)),
    rope_types=("default",),  # Phi3Config.validate_rope: "default" or "longrope" (which litgpt lacks)
)

# gpt_neox/modeling_gpt_neox.py: `qkv = query_key_value(x).view(*shape, -1, 3 * head_size)` then
# `chunk(3, dim=-1)`: rows are per head (q_h, k_h, v_h), MHA only. Two LayerNorms; parallel residual
# by use_parallel_residual; rotary on the first int(head_size * rotary_pct) dims. attention_bias
# switches the q/k/v and dense biases; the MLP always has biases. transformers 5.3 reads the rotary
# share only from `rotary_pct` (default 0.25) and overwrites rope_parameters.partial_rotary_factor
# with it, so a config it saved itself without `rotary_pct` reloads as 0.25; qkvconv reads
# `rotary_pct` first, then partial_rotary_factor, and writes both.
GPT_NEOX = Family(
    architecture="GPTNeoXForCausalLM",
    model_type="gpt_neox",
    name="GPT-NeoX",
    layer_prefix="gpt_neox.layers.{i}",
    qkv=Fused("attention.query_key_value", QKVOrder.PER_HEAD, kv_heads=None),
    block=Block(
        {"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"},
        parallel_residual=Read("use_parallel_residual", default=True),
    ),
    layer_tensors={
        "attention.dense": "attn.proj",
        "mlp.dense_h_to_4h": "mlp.fc",
        "mlp.dense_4h_to_h": "mlp.proj",
    },
    embedding="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="embed_out",
    config=HFConfig(
        n_embd=Read("hidden_size"),
        n_layer=Read("num_hidden_layers"),
        n_head=Read("num_attention_heads"),
        head_size=None,
        intermediate_size=Read("intermediate_size", default=24576),
        vocab_size=Read("vocab_size", default=50432),
        block_size=Read("max_position_embeddings", default=2048),
        norm_eps=Read("layer_norm_eps", default=1e-5),
        activation=Read("hidden_act", default="gelu"),
        tie_embeddings=Read("tie_word_embeddings", default=False),
        rope_theta=Read("rope_parameters.rope_theta", "rotary_emb_base", "rope_theta", default=10000.0),
        rotary_fraction=Read("rotary_pct", "rope_parameters.partial_rotary_factor", default=0.25),
    ),
    biases=Biases(qkv=Read("attention_bias", default=True), attn_out=Read("attention_bias", default=True), mlp=True),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    ignored=IGNORED_EVERYWHERE + (r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)$",),
)

# falcon/modeling_falcon.py FalconAttention._split_heads:
# - new_decoder_architecture (40B, 180B, Falcon2-11B): view(..., -1, num_heads // num_kv_heads + 2,
#   head_dim); per KV group its query heads, then K, then V: grouped, G = num_kv_heads.
# - multi_query (7B): view(..., num_heads + 2, head_dim); all Q heads, then one K, one V: sequential,
#   G = 1 (grouped and sequential coincide).
# - neither: view(..., num_heads, 3, head_dim): per head q, k, v: per-head, MHA.
# FalconDecoderLayer: with new_decoder_architecture, ln_attn and ln_mlp (num_ln_in_parallel_attn 2, its
# default) or one input_layernorm (1) feed a parallel residual, and parallel_attn must be true (else
# the layer has no ln_attn and fails); otherwise parallel_attn means one shared input_layernorm, and
# without it input_layernorm and post_attention_layernorm run sequentially. `bias` switches every
# linear's bias (the LayerNorms always have one). head_dim = hidden_size // num_attention_heads.
FALCON_QKV = "self_attention.query_key_value"
FALCON_BIAS = Read("bias", default=False)
FALCON = Family(
    architecture="FalconForCausalLM",
    model_type="falcon",
    name=Choose(
        ({"new_decoder_architecture": True}, "Falcon 40B/180B (new decoder architecture)"),
        ({"multi_query": True}, "Falcon 7B (multi-query)"),
        ({}, "Falcon (per-head multi-head attention)"),
    ),
    layer_prefix="transformer.h.{i}",
    qkv=Choose(
        ({"new_decoder_architecture": True},
         Fused(FALCON_QKV, QKVOrder.GROUPED, kv_heads=Read("num_kv_heads", default=None))),
        ({"multi_query": True}, Fused(FALCON_QKV, QKVOrder.SEQUENTIAL, kv_heads=1)),
        ({}, Fused(FALCON_QKV, QKVOrder.PER_HEAD, kv_heads=None)),
    ),
    block=Choose(
        ({"new_decoder_architecture": True, "parallel_attn": True, "num_ln_in_parallel_attn": 1},
         Block({"input_layernorm": "norm_1"}, parallel_residual=True, shared_attention_norm=True)),
        ({"new_decoder_architecture": True, "parallel_attn": True},
         Block({"ln_attn": "norm_1", "ln_mlp": "norm_2"}, parallel_residual=True)),
        ({"new_decoder_architecture": False, "parallel_attn": True},
         Block({"input_layernorm": "norm_1"}, parallel_residual=True, shared_attention_norm=True)),
        ({"new_decoder_architecture": False, "parallel_attn": False},
         Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False)),
    ),
    layer_tensors={
        "self_attention.dense": "attn.proj",
        "mlp.dense_h_to_4h": "mlp.fc",
        "mlp.dense_4h_to_h": "mlp.proj",
    },
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    config=HFConfig(
        n_embd=Read("hidden_size", "n_embed"),
        n_layer=Read("num_hidden_layers"),
        n_head=Read("num_attention_heads"),
        head_size=None,
        intermediate_size=Read("ffn_hidden_size", default=None),
        vocab_size=Read("vocab_size", default=65024),
        block_size=Read("max_position_embeddings", default=2048),
        norm_eps=Read("layer_norm_epsilon", default=1e-5),
        activation=Read("activation", default="gelu"),
        tie_embeddings=Read("tie_word_embeddings", default=True),
        rope_theta=ROPE_THETA,
        rotary_fraction=1.0,
    ),
    biases=Biases(qkv=FALCON_BIAS, attn_out=FALCON_BIAS, mlp=FALCON_BIAS),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    flag_defaults={
        "new_decoder_architecture": False,
        "multi_query": True,
        "parallel_attn": True,
        "num_ln_in_parallel_attn": None,
        "alibi": False,
    },
    unsupported=(({"alibi": True}, "ALiBi position biases (alibi=true, e.g. falcon-rw-1b/7b)"),),
    ignored=IGNORED_EVERYWHERE,
    positions=Choose(({"alibi": True}, "ALiBi"), ({}, "rotary, half order")),
)

# gemma2/modeling_gemma2.py: Gemma's (1 + w) RMSNorm, scaled embeddings and GELU MLP, plus a norm after
# attention and after the MLP (before each residual add: post_attention_layernorm, post_feedforward_
# layernorm; the MLP's input norm is pre_feedforward_layernorm), attention scores scaled by
# query_pre_attn_scalar ** -0.5 and soft-capped (attn_logit_softcapping), logits soft-capped
# (final_logit_softcapping), the window on the layers layer_types marks "sliding_attention".
GEMMA2 = replace(
    GEMMA,
    architecture="Gemma2ForCausalLM",
    model_type="gemma2",
    name="Gemma 2",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=4)),
    block=Block({"input_layernorm": "norm_1", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "norm_2", "post_feedforward_layernorm": "post_mlp_norm"},
                parallel_residual=False),
    config=replace(
        GEMMA.config,
        intermediate_size=Read("intermediate_size", default=9216),
        block_size=Read("max_position_embeddings", default=8192),
        attention_scores_scalar=Read("query_pre_attn_scalar", default=256),
        attention_softcap=Read("attn_logit_softcapping", default=50.0),
        final_softcap=Read("final_logit_softcapping", default=30.0),
    ),
    sliding_window=SlidingWindow(Read("sliding_window", default=4096), layer_types="layer_types"),
)

# gemma3/modeling_gemma3.py (text: Gemma3ForCausalLM, model_type gemma3_text): Gemma 2's norms and
# scalar, no soft-capping by default, RMSNorms (1 + w) over head_dim on each query and key head (q_norm,
# k_norm), and RoPE per layer type: rope_parameters.sliding_attention (the local base, unscaled) on the
# layers layer_types marks "sliding_attention", rope_parameters.full_attention (its base and scaling) on
# the others.
GEMMA3 = replace(
    GEMMA2,
    architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    name="Gemma 3",
    layer_tensors={**GEMMA2.layer_tensors, "self_attn.q_norm": "attn.norm_q", "self_attn.k_norm": "attn.norm_k"},
    norm_qk="default",
    config=replace(
        GEMMA2.config,
        intermediate_size=Read("intermediate_size", default=6912),
        block_size=Read("max_position_embeddings", default=131072),
        attention_softcap=Read("attn_logit_softcapping", default=None),
        final_softcap=Read("final_logit_softcapping", default=None),
        rope_theta=Read("rope_parameters.full_attention.rope_theta", "rope_theta", default=1000000.0),
        local_rope_theta=Read("rope_parameters.sliding_attention.rope_theta", "rope_local_base_freq",
                              default=10000.0),
    ),
    sliding_window=SlidingWindow(Read("sliding_window", default=4096), layer_types="layer_types"),
    flag_defaults={"use_bidirectional_attention": False},
)

# mixtral/modeling_mixtral.py: Mistral's attention, every layer's MLP a MixtralSparseMoeBlock: a router
# `gate` (no bias; softmax over all experts in float32, top num_experts_per_tok, renormalised over them)
# and num_local_experts SiLU-gated experts of intermediate_size. transformers 5 holds the experts as 3D
# gate_up_proj / down_proj tensors in memory and saves them as the Hub's per-expert w1 (gate), w3 (up),
# w2 (down); the window, when set, applies to every layer. litgpt: LLaMAMoE, whose softmax over the top
# logits is the same renormalised weight.
MIXTRAL = replace(
    MISTRAL,
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    name="Mixtral",
    layer_tensors={"self_attn.o_proj": "attn.proj"},
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=14336, vocab=32000,
                              positions=4096 * 32, eps=1e-5, act="silu", tied=False),
    mlp_class_name="LLaMAMoE",
    moe=MoE(router="block_sparse_moe.gate", experts="block_sparse_moe.experts.{e}",
            expert_tensors={"w1": "fc_1", "w3": "fc_2", "w2": "proj"},
            n_expert=Read("num_local_experts", "num_experts", default=8), per_token=Read("num_experts_per_tok", default=2)),
    sliding_window=SlidingWindow(Read("sliding_window", default=None)),
)

# qwen3_moe/modeling_qwen3_moe.py: Qwen3's attention (q/k norms over head_dim; head_dim from config.json,
# else hidden_size // num_attention_heads), Qwen3MoeSparseMoeBlock on the layers where `layer_idx not in
# mlp_only_layers and (layer_idx + 1) % decoder_sparse_step == 0` (the others are dense: refused, litgpt
# has no such pattern), router `mlp.gate` renormalised only when norm_topk_prob (default false; litgpt
# always renormalises), experts of moe_intermediate_size saved per expert as gate_proj/up_proj/down_proj;
# the window (use_sliding_window) on every layer. The config writes num_experts as num_local_experts.
QWEN3_MOE = replace(
    QWEN3,
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    name="Qwen3-MoE",
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=4)),
    layer_tensors={"self_attn.o_proj": "attn.proj", "self_attn.q_norm": "attn.norm_q", "self_attn.k_norm": "attn.norm_k"},
    config=llama_style_config(head_size=Read("head_dim", default=None), intermediate=6144, vocab=151936,
                              positions=32768, eps=1e-6, act="silu", tied=False),
    mlp_class_name="LLaMAMoE",
    moe=MoE(router="mlp.gate", experts="mlp.experts.{e}",
            expert_tensors={"gate_proj": "fc_1", "up_proj": "fc_2", "down_proj": "proj"},
            n_expert=Read("num_experts", "num_local_experts", default=128), per_token=Read("num_experts_per_tok", default=8),
            expert_size=Read("moe_intermediate_size", default=768), renormalize=Read("norm_topk_prob", default=False)),
    sliding_window=SlidingWindow(Read("sliding_window", default=4096), enabled=Read("use_sliding_window", default=False)),
    flag_defaults={"decoder_sparse_step": 1, "mlp_only_layers": []},
    unsupported=(({"decoder_sparse_step": Not(1)}, "dense MLP layers between the expert layers (decoder_sparse_step)"),
                 ({"mlp_only_layers": Not([])}, "dense MLP layers among the expert layers (mlp_only_layers)")),
)

# Keyed by config.json "architectures"[0]. The order is the preference when a litgpt config alone has
# to pick an architecture (hf_config_from_litgpt): the first whose config can express it. families_more.py's
# come last, then Cohere and the fused native classes of families_fused.py (which litgpt never computes: inspect
# only, never written) at the very end.
FAMILIES: dict[str, Family] = {f.architecture: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, GPT_NEOX, FALCON, PHI3, STABLELM, PHI, OLMO,
                                                                 OLMO2, MIXTRAL, QWEN3_MOE, STARCODER2, GRANITE, SMOLLM3, GLM,
                                                                 *REMOTE, COHERE, *NATIVE_FUSED)}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for a, f in FAMILIES.items() if f.convertible)


def supported() -> str:
    """For messages: the architectures qkvconv maps."""
    return ", ".join(SUPPORTED_ARCHITECTURES)
