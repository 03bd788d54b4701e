"""More Hugging Face families for the table in families.py (which imports them and keeps the order):
StarCoder2, which litgpt computes exactly though it ships no config of it; Granite and SmolLM3, which
it computes only where their extra settings are neutral; Cohere, which it cannot compute at all (`verify`'s
reference pass does, and GGUF holds it). Every
family here is in the table so that `inspect` names its layout; `unsupported` says, feature by feature,
what litgpt 0.5.13 (litgpt/model.py, litgpt/config.py) has no twin of, and `convert` refuses exactly that.

Each entry was checked against transformers 5.3's modeling and configuration code (cited per entry) and
by tests/test_hf_mapping.py, tests/test_convert.py, tests/test_peft.py and tests/test_refused_families.py
on tiny random models.
"""

from __future__ import annotations

from dataclasses import replace

from qkvconv.formats.hf.pieces import (
    GATED_MLP,
    IGNORED_EVERYWHERE,
    LLAMA_STYLE_QKV,
    PRE_NORMS,
    ROPE_THETA,
    llama_style_config,
    partial_rotary,
)
from qkvconv.formats.hf.table import (
    SET,
    Biases,
    Block,
    Choose,
    Contains,
    Family,
    HFConfig,
    Not,
    NotAll,
    Read,
    SlidingWindow,
)

# transformers' names of the Llama-style models' embedding, final norm and head
LLAMA_NAMES = dict(layer_prefix="model.layers.{i}", embedding="model.embed_tokens", final_norm="model.norm",
                   lm_head="lm_head")
ATTENTION_BIAS = Read("attention_bias", default=False)  # q/k/v/o_proj
LLAMA_BIASES = Biases(qkv=ATTENTION_BIAS, attn_out=ATTENTION_BIAS, mlp=Read("mlp_bias", default=False))

# starcoder2/modeling_starcoder2.py: Starcoder2Attention q/k/v/o_proj with bias=use_bias, head_dim =
# config.head_dim or hidden_size // num_attention_heads, scores scaled by head_dim ** -0.5, RoPE over all
# of head_dim in half order (rotate_half); Starcoder2MLP c_proj(act(c_fc(x))) with bias=use_bias (litgpt's
# GptNeoxMLP: fc, GELU, proj); nn.LayerNorm (weight and bias, eps=norm_epsilon) before attention and before
# the MLP, sequential residuals (Starcoder2DecoderLayer); a final nn.LayerNorm `model.norm`; lm_head
# without bias, tied by default (Starcoder2Config: tie_word_embeddings True, num_key_value_heads 2,
# hidden_act gelu_pytorch_tanh); the window (sliding_window, default null) on every layer. Its dropouts
# (embedding_dropout, residual_dropout, attention_dropout) act only in training. litgpt ships no StarCoder2
# config, but each piece is a litgpt field: LayerNorm, GptNeoxMLP, bias, parallel_residual false, GQA.
USE_BIAS = Read("use_bias", default=True)
STARCODER2 = Family(
    architecture="Starcoder2ForCausalLM",
    model_type="starcoder2",
    name="StarCoder2",
    **LLAMA_NAMES,
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=2)),
    block=PRE_NORMS,
    layer_tensors={"self_attn.o_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"},
    config=HFConfig(
        n_embd=Read("hidden_size"),
        n_layer=Read("num_hidden_layers"),
        n_head=Read("num_attention_heads"),
        head_size=Read("head_dim", default=None),
        intermediate_size=Read("intermediate_size", default=12288),
        vocab_size=Read("vocab_size", default=49152),
        block_size=Read("max_position_embeddings", default=4096),
        norm_eps=Read("norm_epsilon", default=1e-5),
        activation=Read("hidden_act", default="gelu_pytorch_tanh"),
        tie_embeddings=Read("tie_word_embeddings", default=True),
        rope_theta=ROPE_THETA,
        rotary_fraction=1.0,
    ),
    biases=Biases(qkv=USE_BIAS, attn_out=USE_BIAS, mlp=USE_BIAS),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    sliding_window=SlidingWindow(Read("sliding_window", default=None)),
    ignored=IGNORED_EVERYWHERE,
)

# granite/modeling_granite.py: Llama's modules and RMSNorms (q/k/v/o_proj bias=attention_bias,
# gate/up/down_proj bias=mlp_bias, head_dim = config.head_dim or hidden_size // num_attention_heads) with
# four multipliers: GraniteModel `inputs_embeds * embedding_multiplier`, GraniteAttention `scaling =
# attention_multiplier` (default 1.0, not head_dim ** -0.5), GraniteDecoderLayer `residual + hidden_states
# * residual_multiplier` after attention and after the MLP, GraniteForCausalLM `logits / logits_scaling`.
# litgpt has the first two where embedding_multiplier is 1 or sqrt(hidden_size) (scale_embeddings) and
# attention_multiplier 1/sqrt of an integer (attention_scores_scalar: 1.0 is 1, 0.0078125 is 16384); it
# scales no residual branch and no logits. With those two at 1.0, Granite is Llama with scale_embeddings and
# attention_scores_scalar; otherwise refused (the Granite 3 configs on the Hub set both, as remembered: not
# read here).
GRANITE = Family(
    architecture="GraniteForCausalLM",
    model_type="granite",
    name="Granite",
    **LLAMA_NAMES,
    qkv=LLAMA_STYLE_QKV,
    block=PRE_NORMS,
    layer_tensors=GATED_MLP,
    config=replace(
        llama_style_config(head_size=Read("head_dim", default=None), intermediate=11008, vocab=32000,
                           positions=2048, eps=1e-6, act="silu", tied=False),
        attention_scale=Read("attention_multiplier", default=1.0),
        embedding_scale=Read("embedding_multiplier", default=1.0),
    ),
    biases=LLAMA_BIASES,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    flag_defaults={"residual_multiplier": 1.0, "logits_scaling": 1.0},
    unsupported=(({"residual_multiplier": Not(1.0)}, "residual branches scaled by residual_multiplier"),
                 ({"logits_scaling": Not(1.0)}, "logits divided by logits_scaling")),
    ignored=IGNORED_EVERYWHERE,
)

# smollm3/modeling_smollm3.py: Llama's modules and RMSNorms (q/k/v/o_proj bias=attention_bias,
# gate/up/down_proj bias=mlp_bias, head_dim = config.head_dim or hidden_size // num_attention_heads, head
# tied by default), RoPE (SmolLM3Config.default_theta 2000000) only in the layers whose no_rope_layers entry
# is 1 (SmolLM3Attention: `if self.use_rope:`). Where config.json has no no_rope_layers, SmolLM3Config
# derives a layer without RoPE every no_rope_layer_interval (4) layers. litgpt rotates in every layer: a 0
# anywhere, or no list, is refused (a list-less model with fewer layers than the interval too); all 1 is
# Llama. The window: SmolLM3Model picks each layer's mask by layer_types
# (sliding where "sliding_attention"; without the list, SmolLM3Config marks only layers without RoPE), while
# SmolLM3Attention hands flash attention the window only with use_sliding_window: where the two disagree,
# refused.
SMOLLM3 = Family(
    architecture="SmolLM3ForCausalLM",
    model_type="smollm3",
    name="SmolLM3",
    **LLAMA_NAMES,
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=4)),
    block=PRE_NORMS,
    layer_tensors=GATED_MLP,
    config=replace(
        llama_style_config(head_size=Read("head_dim", default=None), intermediate=11008, vocab=128256,
                           positions=32768, eps=1e-6, act="silu", tied=True),
        rope_theta=Read(*ROPE_THETA.keys, default=2000000.0),
    ),
    biases=LLAMA_BIASES,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    sliding_window=SlidingWindow(Read("sliding_window", default=None),
                                 enabled=Read("use_sliding_window", default=False), layer_types="layer_types",
                                 untyped=False),
    flag_defaults={"no_rope_layers": None, "use_sliding_window": False, "sliding_window": None, "layer_types": None},
    unsupported=(
        ({"no_rope_layers": NotAll(1)}, "layers without rotary (no_rope_layers)"),
        ({"use_sliding_window": False, "sliding_window": SET, "layer_types": Contains("sliding_attention")},
         "a window that transformers' eager and SDPA attention apply and flash attention does not (sliding layers "
         "in layer_types, use_sliding_window false)"),
    ),
    ignored=IGNORED_EVERYWHERE,
)

# cohere/modeling_cohere.py (Command R): one CohereLayerNorm (a weight and no bias; mean and variance in
# float32) feeds attention and the MLP in parallel (CohereDecoderLayer: `residual + hidden_states_attention
# + hidden_states_mlp`); RoPE in pairs order (rotate_half on x[..., ::2] and x[..., 1::2], frequencies
# repeat_interleave'd; CohereConfig.default_theta 500000); q/k/v/o_proj bias=attention_bias, gate/up/down
# without bias; use_qk_norm: a CohereLayerNorm over (num_heads, head_dim) of q and (num_kv_heads, head_dim) of
# k, a weight per head; CohereForCausalLM `logits * logit_scale` (default 0.0625); the head tied by default.
# litgpt has the parallel block (shared_attention_norm) and pairs rotary (rope_interleave), but its
# LayerNorm always has a bias, its query/key norms share one weight across heads, and it scales no logits.
# `verify` computes it (norm_bias False, logit_scale, norm_qk "per_head": q_norm (num_heads, head_dim) and k_norm
# (num_kv_heads, head_dim), each head normalised over its dims with its own weight; tests/test_cohere_verify.py).
COHERE = Family(
    architecture="CohereForCausalLM",
    model_type="cohere",
    name="Cohere",
    **LLAMA_NAMES,
    qkv=LLAMA_STYLE_QKV,
    block=Block({"input_layernorm": "norm_1"}, parallel_residual=True, shared_attention_norm=True),
    layer_tensors=Choose(({"use_qk_norm": True}, {**GATED_MLP, "self_attn.q_norm": "attn.norm_q",
                                                   "self_attn.k_norm": "attn.norm_k"}), ({}, GATED_MLP)),
    config=replace(
        llama_style_config(head_size=Read("head_dim", default=None), intermediate=22528, vocab=256000,
                           positions=8192, eps=1e-5, act="silu", tied=True),
        norm_eps=Read("layer_norm_eps", default=1e-5),
        rope_theta=Read(*ROPE_THETA.keys, default=500000.0),
    ),
    biases=Biases(qkv=ATTENTION_BIAS, attn_out=ATTENTION_BIAS, mlp=False),
    norm_class_name="LayerNorm",
    mlp_class_name="LLaMAMLP",
    flag_defaults={"logit_scale": 0.0625, "use_qk_norm": False},
    unsupported=(
        ({"logit_scale": Not(1.0)}, "logits scaled by logit_scale"),
        ({"use_qk_norm": True}, "a LayerNorm per query/key head with its own weights (use_qk_norm)"),
        ({}, "LayerNorms without a bias (CohereLayerNorm; litgpt's LayerNorm always has one)"),
    ),
    ignored=IGNORED_EVERYWHERE,
    positions="rotary, pairs order",
    rotary_order="pairs",
    verifiable=True,
    norm_qk=Choose(({"use_qk_norm": True}, "per_head"), ({}, None)),
    norm_bias=False,
    logit_scale=Read("logit_scale", default=0.0625),
)


# glm/modeling_glm.py (GLM-4 as transformers has it): q/k/v_proj with bias=attention_bias (default true), o_proj
# without; GlmMLP gate_up_proj (gate rows, then up rows: `gate, up_states = chunk(2)`; down(up * act(gate))) and
# down_proj without biases; GlmRMSNorm input_layernorm / post_attention_layernorm, sequential residuals; rotary on
# the first partial_rotary_factor of each head (the config class sets 0.5 by default) in pairs order: its
# `rotate_half` takes x[..., 0::2] and x[..., 1::2] and cos/sin are repeat_interleave(2), so dims 2i and 2i + 1
# rotate together at frequency i, which is litgpt's rope_interleave on rope_n_elem dims.
GLM = Family(
    architecture="GlmForCausalLM",
    model_type="glm",
    name="GLM-4 (Glm)",
    **LLAMA_NAMES,
    qkv=replace(LLAMA_STYLE_QKV, kv_heads=Read("num_key_value_heads", default=2)),
    block=PRE_NORMS,
    layer_tensors={"self_attn.o_proj": "attn.proj", "mlp.down_proj": "mlp.proj"},
    fused_rows={"mlp.gate_up_proj": ("mlp.fc_1", "mlp.fc_2")},
    config=llama_style_config(head_size=Read("head_dim", default=128), intermediate=13696, vocab=151552,
                              positions=131072, eps=1.5625e-07, act="silu", tied=False,
                              rotary_fraction=partial_rotary(0.5)),
    biases=Biases(qkv=Read("attention_bias", default=True), attn_out=False, mlp=False),
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    positions="rotary, pairs order",
    rotary_order="pairs",
    rope_types=("default",),  # scaled RoPE with partial pairs rotation is not tested here: refused
    ignored=IGNORED_EVERYWHERE,
)
