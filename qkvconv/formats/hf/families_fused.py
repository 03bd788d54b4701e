"""Transformers-native classes with one fused QKV matrix that litgpt 0.5.13 cannot compute: GPT-2, GPT-BigCode,
Bloom, MPT, DBRX, Persimmon and CodeGen. They are in the family table so that `inspect` names their layout (the
tensor, its row order, key/value heads, transposed storage, how positions enter, which config key decided);
each has an `unsupported` entry with no flags (`convertible` false), so `convert` refuses them with the reason.
`verify` computes all (`verifiable`): the reference pass has their features as fields (learned positions,
ALiBi, Conv1D storage read as a Linear, an embedding norm, LayerNorms without bias, clip_qkv, q/k LayerNorms, the
squared ReLU, CodeGen's parallel block with attention-output and MLP biases apart), set from the entries below
(formats/hf/reference.py); `unverifiable` names the settings it does not compute. `convert --to gguf` reads them
as verify does (llama.cpp's gpt2, starcoder, bloom and mpt hold these features: formats/gguf/writing.py choose_arch
refuses the others), every other target refuses them.

Every entry was read off transformers 5.3's modeling code (cited per entry), and tests/test_fused_native.py
checks each order numerically on a tiny random model: scaling the rows the order calls head h's V (and Q
against K) and undoing it in the output projection leaves transformers' logits unchanged, and does not under
any other order. Only what inspect reads is meaningful beyond the layout (heads, layers, the QKV tensor); the
other fields name the modules as transformers does, for the reader.
"""

from __future__ import annotations

from qkvconv.formats.hf.pieces import ROPE_THETA, partial_rotary
from qkvconv.formats.hf.table import Biases, Block, Choose, Family, Fused, HFConfig, MoE, Not, Read
from qkvconv.model.layout import QKVOrder

NO_BIAS = Biases(qkv=False, attn_out=False, mlp=False)
ALL_BIASES = Biases(qkv=True, attn_out=True, mlp=True)


def gpt2_style_config(*, positions: int, act: str, tied: bool, rotary_fraction: float = 0.0,
                      rotary_dims: Read | None = None) -> HFConfig:
    """GPT2Config's keys (n_embd, n_layer, n_head, n_inner, n_positions), which GPT-BigCode and CodeGen share."""
    return HFConfig(n_embd=Read("n_embd", "hidden_size"), n_layer=Read("n_layer", "num_hidden_layers"),
                    n_head=Read("n_head", "num_attention_heads"), head_size=None,
                    intermediate_size=Read("n_inner", default=None), vocab_size=Read("vocab_size", default=50257),
                    block_size=Read("n_positions", default=positions),
                    norm_eps=Read("layer_norm_epsilon", default=1e-5),
                    activation=Read("activation_function", default=act),
                    tie_embeddings=Read("tie_word_embeddings", default=tied), rope_theta=10000.0,
                    rotary_fraction=rotary_fraction, rotary_dims=rotary_dims)


GPT2_BLOCK = Block({"ln_1": "norm_1", "ln_2": "norm_2"}, parallel_residual=False)
GPT2_NAMES = dict(layer_prefix="transformer.h.{i}", embedding="transformer.wte", final_norm="transformer.ln_f",
                  lm_head="lm_head")
GPT2_TENSORS = {"attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
# GPT2Attention's eager_attention_forward: scores / sqrt(head_dim) only where scale_attn_weights, and / (layer + 1)
# where scale_attn_by_inverse_layer_idx (GPTBigCodeAttention: scaling 1.0 without scale_attn_weights)
UNSCALED = ({"scale_attn_weights": False}, "unscaled attention scores (scale_attn_weights false)")
GPT2_FLAGS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}

# gpt2/modeling_gpt2.py GPT2Attention: `self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)` (Conv1D keeps
# its weight as [in, out], so the file holds the transpose of a Linear's), `query, key, value =
# self.c_attn(hidden_states).split(self.split_size, dim=2)`: sequential, MHA, with a bias. Positions: the
# learned `transformer.wpe`.
GPT2 = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    name="GPT-2",
    **GPT2_NAMES,
    qkv=Fused("attn.c_attn", QKVOrder.SEQUENTIAL, kv_heads=None, transposed=True),
    block=GPT2_BLOCK,
    layer_tensors=GPT2_TENSORS,
    config=gpt2_style_config(positions=1024, act="gelu_new", tied=True),
    biases=ALL_BIASES,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    positions="learned absolute positions",
    unsupported=(({}, "learned absolute position embeddings (transformer.wpe)"),),
    flag_defaults=GPT2_FLAGS,
    verifiable=True,
    unverifiable=(UNSCALED, ({"scale_attn_by_inverse_layer_idx": True},
                             "attention scores divided by the layer number (scale_attn_by_inverse_layer_idx)")),
    position_embedding="transformer.wpe",
    # GPT2MLP and GPT2Attention: c_fc, c_proj are Conv1D too ([in, out]: x @ W + b)
    conv1d=("attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    # the Hub's GPT-2 files: base-model names (`h.0...`) and each layer's causal-mask buffer attn.bias (transformers'
    # warning "Some weights of GPT2LMHeadModel were not initialized from the model checkpoint at gpt2 and are newly
    # initialized: ['h.0.attn.masked_bias', ...]" names them so; older files hold attn.masked_bias too, which
    # llama.cpp's GPT-2 converter skips with attn.bias): read through search, not from a Hub file
    base_model_prefix="transformer",
    ignored=(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$",),
)

# gpt_bigcode/modeling_gpt_bigcode.py GPTBigCodeAttention: an nn.Linear c_attn (not Conv1D) of
# embed_dim + 2 * kv_dim rows. multi_query: `.split((embed_dim, kv_dim, kv_dim))`, all Q heads then one K and
# one V (sequential, G = 1; StarCoder, SantaCoder). Otherwise `.view(..., num_heads, 3 * head_dim)` then
# `.split(3 * [head_dim])`: per head. llama.cpp's converter (conversion/starcoder.py StarCoderModel) passes
# c_attn through unchanged as ggml's sequential attn_qkv with head_count_kv fixed at 1, so it reads an MHA
# file as sequential: the same shapes, two readings, and nothing in the file to say which software wrote it.
GPT_BIGCODE = Family(
    architecture="GPTBigCodeForCausalLM",
    model_type="gpt_bigcode",
    name=Choose(({"multi_query": True}, "GPT-BigCode (multi-query)"), ({}, "GPT-BigCode (multi-head)")),
    **GPT2_NAMES,
    qkv=Choose(
        ({"multi_query": True}, Fused("attn.c_attn", QKVOrder.SEQUENTIAL, kv_heads=1)),
        ({}, Fused("attn.c_attn", QKVOrder.PER_HEAD, kv_heads=None, also_read_as=(
            (QKVOrder.SEQUENTIAL, "llama.cpp's StarCoderModel converter (c_attn kept as a sequential attn_qkv)"),))),
    ),
    block=GPT2_BLOCK,
    layer_tensors=GPT2_TENSORS,
    config=gpt2_style_config(positions=1024, act="gelu_pytorch_tanh", tied=True),
    biases=ALL_BIASES,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    positions="learned absolute positions",
    flag_defaults={"multi_query": True, "scale_attn_weights": True},
    unsupported=(({}, "learned absolute position embeddings (transformer.wpe)"),),
    verifiable=True,
    unverifiable=(UNSCALED,),
    position_embedding="transformer.wpe",
    base_model_prefix="transformer",
)

# bloom/modeling_bloom.py BloomAttention._reshape: `fused_qkv.view(batch, seq, num_heads, 3, head_dim)`, then
# [..., 0, :], [..., 1, :], [..., 2, :]: per head, MHA, with a bias. ALiBi (build_alibi_tensor), a LayerNorm
# on the embeddings (word_embeddings_layernorm), BloomGelu (bloom_gelu_forward), BloomMLP always 4 * hidden_size.
# BloomBlock takes the residual after the input norm where apply_residual_connection_post_layernorm, and with
# pretraining_tp > 1 and slow_but_exact its dense layers sum slices without the bias: neither is computed here.
BLOOM = Family(
    architecture="BloomForCausalLM",
    model_type="bloom",
    name="Bloom",
    layer_prefix="transformer.h.{i}",
    qkv=Fused("self_attention.query_key_value", QKVOrder.PER_HEAD, kv_heads=None),
    block=Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False),
    layer_tensors={"self_attention.dense": "attn.proj", "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"},
    embedding="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    config=HFConfig(n_embd=Read("hidden_size", "n_embed"), n_layer=Read("n_layer", "num_hidden_layers"),
                    n_head=Read("n_head", "num_attention_heads"), head_size=None,
                    intermediate_size=Read("intermediate_size", default=None),
                    vocab_size=Read("vocab_size", default=250880), block_size=Read("seq_length", default=2048),
                    norm_eps=Read("layer_norm_epsilon", default=1e-5), activation="gelu_bloom",
                    tie_embeddings=Read("tie_word_embeddings", default=True), rope_theta=10000.0, rotary_fraction=0.0),
    biases=ALL_BIASES,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    positions="ALiBi",
    unsupported=(({}, "ALiBi position biases and a LayerNorm on the embeddings"),),
    flag_defaults={"apply_residual_connection_post_layernorm": False, "slow_but_exact": False, "pretraining_tp": 1},
    verifiable=True,
    unverifiable=(({"apply_residual_connection_post_layernorm": True},
                   "the residual taken after the input norm (apply_residual_connection_post_layernorm)"),
                  ({"slow_but_exact": True, "pretraining_tp": Not(1)},
                   "dense layers summed in pretraining_tp slices without their bias (slow_but_exact)")),
    embedding_norm="transformer.word_embeddings_layernorm",
    alibi="bloom",
    # bigscience's files hold base-model names (`h.0...`, `word_embeddings`): other projects' Bloom loaders add the
    # `transformer.` prefix (read through search, not from a Hub file)
    base_model_prefix="transformer",
)

# mpt/modeling_mpt.py MptAttention: `Wqkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)`, `mixed_qkv.
# chunk(3, dim=2)` after an optional clamp to attn_config.clip_qkv (`if self.clip_qkv`: 0 is none): sequential,
# MHA; scores times attn_config.softmax_scale (null: 1/sqrt(head_dim)). MptModel always adds its ALiBi tensor
# (build_mpt_alibi_tensor), whatever attn_config.alibi says, and passes no alibi_bias_max (so 8). Every LayerNorm
# has its bias set to None and every linear bias=False, MptMLP is 4 * hidden_size with exact GELU, whatever
# no_bias, expansion_ratio, logit_scale or qk_ln say: transformers reads none of them, and neither does verify.
MPT = Family(
    architecture="MptForCausalLM",
    model_type="mpt",
    name="MPT",
    layer_prefix="transformer.blocks.{i}",
    qkv=Fused("attn.Wqkv", QKVOrder.SEQUENTIAL, kv_heads=None),
    block=Block({"norm_1": "norm_1", "norm_2": "norm_2"}, parallel_residual=False),
    layer_tensors={"attn.out_proj": "attn.proj", "ffn.up_proj": "mlp.fc", "ffn.down_proj": "mlp.proj"},
    embedding="transformer.wte",
    final_norm="transformer.norm_f",
    lm_head="lm_head",
    config=HFConfig(n_embd=Read("d_model", "hidden_size"), n_layer=Read("n_layers", "num_hidden_layers"),
                    n_head=Read("n_heads", "num_attention_heads"), head_size=None,
                    intermediate_size=Read("intermediate_size", default=None),
                    vocab_size=Read("vocab_size", default=50368), block_size=Read("max_seq_len", default=2048),
                    norm_eps=Read("layer_norm_epsilon", default=1e-5), activation="gelu",
                    tie_embeddings=Read("tie_word_embeddings", default=True), rope_theta=10000.0, rotary_fraction=0.0,
                    attention_scale=Read("attn_config.softmax_scale", default=None)),
    biases=NO_BIAS,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    positions="ALiBi",
    unsupported=(({}, "ALiBi position biases and LayerNorms without a bias (no_bias)"),),
    verifiable=True,
    alibi="mpt",
    norm_bias=False,
    base_model_prefix="transformer",
    clip_qkv=Read("attn_config.clip_qkv", default=None),
)

# dbrx/modeling_dbrx.py DbrxAttention: `Wqkv` of hidden_size + 2 * kv_n_heads * head_dim rows without bias,
# clamped to attn_config.clip_qkv, then `.split([hidden_size, kv_heads * head_dim, kv_heads * head_dim])`:
# sequential, GQA (attn_config.kv_n_heads, DbrxAttentionConfig default 1); rotary over the whole head in
# half order (rotate_half). norm_attn_norm.norm_1 before attention, norm_2 before the MoE, LayerNorms without bias.
# The MoE as DBRX's own code computes it, and transformers 4.57's DbrxForCausalLM: a router ffn.router.layer
# (d_model -> moe_num_experts), softmax, the top moe_top_k divided by their p-norm for p = moe_normalize_expert_weights
# (1: their sum, litgpt's renormalisation; None: not divided); each expert x.matmul(w1[e].t()) gated by SiLU times
# x.matmul(v1[e].t()), then .matmul(w2[e]), where w1 / v1 / w2 stack the experts' [ffn_hidden_size, d_model] blocks
# (MoE.stacked). transformers 5.3's DbrxForCausalLM computes another function: its DbrxExpertGLU multiplies by w1[e]
# and v1[e] untransposed (x.matmul(expert_w1)), and its router is nn.Linear(ffn_hidden_size, ...), so it runs only
# where ffn_hidden_size equals d_model; the tests take 4.57's, in llama.cpp's converter environment
# (fixtures/venv_transformers_model.py), and llama.cpp's runtime, as the oracles.
DBRX = Family(
    architecture="DbrxForCausalLM",
    model_type="dbrx",
    name="DBRX",
    layer_prefix="transformer.blocks.{i}",
    qkv=Fused("norm_attn_norm.attn.Wqkv", QKVOrder.SEQUENTIAL,
              kv_heads=Read("attn_config.kv_n_heads", "num_key_value_heads", default=1)),
    block=Block({"norm_attn_norm.norm_1": "norm_1", "norm_attn_norm.norm_2": "norm_2"}, parallel_residual=False),
    layer_tensors={"norm_attn_norm.attn.out_proj": "attn.proj"},
    embedding="transformer.wte",
    final_norm="transformer.norm_f",
    lm_head="lm_head",
    config=HFConfig(n_embd=Read("d_model", "hidden_size"), n_layer=Read("n_layers", "num_hidden_layers"),
                    n_head=Read("n_heads", "num_attention_heads"), head_size=None,
                    intermediate_size=Read("ffn_config.ffn_hidden_size", default=3584),
                    vocab_size=Read("vocab_size", default=32000), block_size=Read("max_seq_len", default=2048),
                    norm_eps=1e-5, activation="silu", tie_embeddings=Read("tie_word_embeddings", default=False),
                    rope_theta=Read("rope_parameters.rope_theta", "attn_config.rope_theta", default=10000.0),
                    rotary_fraction=1.0),
    biases=NO_BIAS,
    norm_class_name="LayerNorm",
    mlp_class_name="LLaMAMoE",
    moe=MoE(router="ffn.router.layer", experts="ffn.experts.mlp", expert_tensors={"w1": "fc_1", "v1": "fc_2", "w2": "proj"},
            n_expert=Read("ffn_config.moe_num_experts", default=4), per_token=Read("ffn_config.moe_top_k", default=1),
            stacked=True),
    norm_bias=False,
    base_model_prefix="transformer",
    clip_qkv=Read("attn_config.clip_qkv", default=None),
    flag_defaults={"ffn_config.moe_normalize_expert_weights": 1},
    unsupported=(({}, "LayerNorms without a bias (litgpt's LayerNorm always has one)"),),
    verifiable=True,
    unverifiable=(({"ffn_config.moe_normalize_expert_weights": Not(1)},
                   "the chosen experts' weights divided by other than their sum (moe_normalize_expert_weights not 1)"),),
)

# persimmon/modeling_persimmon.py PersimmonAttention._split_heads: `fused_qkv.view(batch, seq, num_heads, 3,
# head_dim)`: per head, MHA, with a bias; q_layernorm/k_layernorm (qk_layernorm, default true) over head_dim,
# then rotary (rotate_half) on the first int(head_dim * partial_rotary_factor) dims (default 0.5).
PERSIMMON_TENSORS = {"self_attn.dense": "attn.proj", "mlp.dense_h_to_4h": "mlp.fc", "mlp.dense_4h_to_h": "mlp.proj"}
PERSIMMON = Family(
    architecture="PersimmonForCausalLM",
    model_type="persimmon",
    name="Persimmon",
    layer_prefix="model.layers.{i}",
    qkv=Fused("self_attn.query_key_value", QKVOrder.PER_HEAD, kv_heads=None),
    block=Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False),
    layer_tensors=Choose(({"qk_layernorm": True}, {**PERSIMMON_TENSORS, "self_attn.q_layernorm": "attn.norm_q",
                                                   "self_attn.k_layernorm": "attn.norm_k"}), ({}, PERSIMMON_TENSORS)),
    embedding="model.embed_tokens",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
    config=HFConfig(n_embd=Read("hidden_size"), n_layer=Read("num_hidden_layers"), n_head=Read("num_attention_heads"),
                    head_size=None, intermediate_size=Read("intermediate_size", default=16384),
                    vocab_size=Read("vocab_size", default=262144),
                    block_size=Read("max_position_embeddings", default=16384),
                    norm_eps=Read("layer_norm_eps", default=1e-5), activation=Read("hidden_act", default="relu2"),
                    tie_embeddings=Read("tie_word_embeddings", default=False), rope_theta=ROPE_THETA,
                    rotary_fraction=partial_rotary(0.5)),
    biases=ALL_BIASES,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    flag_defaults={"qk_layernorm": True},
    unsupported=(({}, "the squared-ReLU MLP (relu2)"),
                 ({"qk_layernorm": True}, "LayerNorms with biases on each query/key head (qk_layernorm)")),
    verifiable=True,
    base_model_prefix="model",
    norm_qk=Choose(({"qk_layernorm": True}, "default"), ({}, None)),
)

# codegen/modeling_codegen.py CodeGenAttention.forward: `qkv_proj` (no bias) reshaped into mp_num = 4 blocks,
# each split into `query, value, key` (in that order), heads numbered block by block (_split_heads):
# codegen-mp4, MHA. Rotary in pairs order (rotate_every_two) on the first rotary_dim dims of each head
# (CodeGenConfig's default 64; null builds sinusoids over all of n_embd, which fit no head); a parallel block with
# one ln_1 (CodeGenBlock: attn + mlp + residual); lm_head with a bias; MLP biases but none on q/k/v or out_proj.
CODEGEN = Family(
    architecture="CodeGenForCausalLM",
    model_type="codegen",
    name="CodeGen",
    **GPT2_NAMES,
    qkv=Fused("attn.qkv_proj", QKVOrder.CODEGEN_MP4, kv_heads=None),
    block=Block({"ln_1": "norm_1"}, parallel_residual=True, shared_attention_norm=True),
    layer_tensors={"attn.out_proj": "attn.proj", "mlp.fc_in": "mlp.fc", "mlp.fc_out": "mlp.proj"},
    config=gpt2_style_config(positions=2048, act="gelu_new", tied=False, rotary_dims=Read("rotary_dim", default=64)),
    biases=Biases(qkv=False, attn_out=False, mlp=True),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    lm_head_bias=True,
    positions="rotary, pairs order",
    rotary_order="pairs",
    unsupported=(({}, "no bias on the attention output but MLP biases (litgpt's `bias` switches both together)"),),
    flag_defaults={"rotary_dim": 64},
    verifiable=True,
    unverifiable=(({"rotary_dim": None}, "rotary_dim null (sinusoids over all of n_embd, which fit no head)"),),
    base_model_prefix="transformer",
    # Salesforce's files hold each layer's causal-mask buffer attn.causal_mask (transformers: "Some weights of the
    # model checkpoint at Salesforce/codegen-350M-mono were not used ...: ['transformer.h.0.attn.causal_mask', ...]")
    ignored=(r"^transformer\.h\.\d+\.attn\.causal_mask$",),
)

NATIVE_FUSED = (GPT2, GPT_BIGCODE, BLOOM, MPT, DBRX, PERSIMMON, CODEGEN)
