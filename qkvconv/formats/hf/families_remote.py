"""Remote-code originals (config.json `auto_map`: the model's own Python next to its weights, which qkvconv
never imports or runs) that a transformers class computes exactly: read through the family table like any
architecture, and written by `convert --to hf` as that `twin`. Their config.json keys are the remote
configuration classes' own names.

Each entry's layout facts are cited with the second source they were checked against (llama.cpp's
converter, vendored in llama-cpp-python 0.3.36's sdist; tests/test_remote_twins.py runs its un-fusing code
on the fused tensors qkvconv builds).
"""

from __future__ import annotations

from dataclasses import replace

from qkvconv.formats.hf.pieces import GATED_MLP, IGNORED_EVERYWHERE, PRE_NORMS, llama_style_config
from qkvconv.formats.hf.table import SET, Biases, Block, Choose, Family, Fused, HFConfig, Not, Read
from qkvconv.model.layout import QKVOrder

# InternLM2 / 2.5 (`InternLM2ForCausalLM`, model_type internlm2). llama.cpp conversion/internlm.py
# InternLM2Model.modify_tensors: `attention.wqkv` reshaped (num_groups, q_per_kv + 2, head_dim, n_embd), the
# first q_per_kv heads of each group Q, then K, then V: grouped, with num_key_value_heads groups and head_dim
# = hidden_size // num_attention_heads; Q and K then go through LlamaModel.permute (half -> pairs, as for HF
# Llama), so the file is in half order. gguf-py tensor_mapping.py names the rest as Llama's:
# model.tok_embeddings, attention_norm, attention.wo, ffn_norm, feed_forward.w1 (gate), w3 (up), w2 (down),
# model.norm, output. The config's `bias` (the remote class's default true) puts a bias on wqkv and wo,
# none on the MLP; released checkpoints set it false. rope_scaling "dynamic" (InternLM2.5) is refused.
INTERNLM2 = Family(
    architecture="InternLM2ForCausalLM",
    model_type="internlm2",
    name="InternLM2 (remote code)",
    layer_prefix="model.layers.{i}",
    qkv=Fused("attention.wqkv", QKVOrder.GROUPED, kv_heads=Read("num_key_value_heads", "num_attention_heads")),
    block=Block({"attention_norm": "norm_1", "ffn_norm": "norm_2"}, parallel_residual=False),
    layer_tensors={"attention.wo": "attn.proj", "feed_forward.w1": "mlp.fc_1", "feed_forward.w3": "mlp.fc_2",
                   "feed_forward.w2": "mlp.proj"},
    embedding="model.tok_embeddings",
    final_norm="model.norm",
    lm_head="output",
    config=llama_style_config(head_size=None, intermediate=11008, vocab=103168, positions=2048, eps=1e-6,
                              act="silu", tied=False),
    biases=Biases(qkv=Read("bias", default=True), attn_out=Read("bias", default=True), mlp=False),
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    rope_types=("default", "linear"),
    ignored=IGNORED_EVERYWHERE,
    remote_code=True,
    twin="LlamaForCausalLM",
)


# Phi-1.5 / Phi-2 as first released (`model_type` phi-msft, `architectures` PhiForCausalLM, auto_map to its own
# modeling_phi.py). gguf-py tensor_mapping.py (llama.cpp) names its tensors beside HF Phi's for the same GGUF
# tensors: transformer.embd.wte, transformer.h.N.ln, mixer.Wqkv (ggml's attn_qkv: Q, K, V rows one after the
# other, sequential), mixer.out_proj, mlp.fc1, mlp.fc2, lm_head.ln (final norm), lm_head.linear (head, with
# bias); llama.cpp's PhiModel reads n_embd/n_head beside hidden_size/num_attention_heads. The config keys are
# GPT-2's (n_embd, n_layer, n_head, n_head_kv, n_inner, n_positions, layer_norm_epsilon, activation_function)
# and rotary_dim, a count of the rotating dims per head (half order, at the start of the head). One LayerNorm
# feeds attention and MLP in parallel, as in HF Phi.
PHI_MSFT = Family(
    architecture="PhiForCausalLM (phi-msft)",
    model_type="phi-msft",
    name="Phi-1.5/2 original (remote code)",
    layer_prefix="transformer.h.{i}",
    qkv=Fused("mixer.Wqkv", QKVOrder.SEQUENTIAL, kv_heads=Read("n_head_kv", "n_head")),
    block=Block({"ln": "norm_1"}, parallel_residual=True, shared_attention_norm=True),
    layer_tensors={"mixer.out_proj": "attn.proj", "mlp.fc1": "mlp.fc", "mlp.fc2": "mlp.proj"},
    embedding="transformer.embd.wte",
    final_norm="lm_head.ln",
    lm_head="lm_head.linear",
    config=HFConfig(n_embd=Read("n_embd"), n_layer=Read("n_layer"), n_head=Read("n_head"), head_size=None,
                    intermediate_size=Read("n_inner", default=None), vocab_size=Read("vocab_size", default=50304),
                    block_size=Read("n_positions", default=2048), norm_eps=Read("layer_norm_epsilon", default=1e-5),
                    activation=Read("activation_function", default="gelu_new"),
                    tie_embeddings=Read("tie_word_embeddings", default=False), rope_theta=10000.0,
                    rotary_fraction=1.0, rotary_dims=Read("rotary_dim", default=None)),
    biases=Biases(qkv=True, attn_out=True, mlp=True),
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    lm_head_bias=True,
    ignored=IGNORED_EVERYWHERE,
    remote_code=True,
    twin="PhiForCausalLM",
)



# Baichuan / Baichuan 2 (model_type baichuan; Baichuan-7B's files say BaiChuanForCausalLM). llama.cpp
# conversion/baichuan.py: `self_attn.W_pack` cut into three equal thirds Q, K, V (sequential; run on our tensor
# by tests/test_remote_twins_baichuan.py), Q and K then permuted half -> pairs as HF Llama's are, so the file is
# in half order; the other names are Llama's. The 7B models rotate (base 10000, the remote code's constant), the
# 13B ones use ALiBi, with the same config keys; Baichuan 2 normalises the head's rows at run time (NormHead:
# F.normalize(lm_head.weight), as lmdeploy's Baichuan2Reader also does on reading), Baichuan 1 does not.
# config.json tells neither apart (vLLM guesses: hidden_size 4096 means rotary, vocab_size 125696 Baichuan 2),
# so the user names the model (--variant); ALiBi is refused for litgpt (Llama and litgpt have none). The 13B's ALiBi
# (modeling_baichuan.py _gen_alibi_mask): slopes _get_interleave(n_head), Bloom's build_alibi_tensor's for any
# head count, times the key position (Baichuan 2: key minus query position, the same softmax), added to the
# scores after their 1/sqrt(head_dim) scaling, no RoPE: `verify` computes it (alibi "bloom") and GGUF holds it.
_BAICHUAN_CONFIG = replace(llama_style_config(head_size=None, intermediate=11008, vocab=64000, positions=4096, eps=1e-6,
                                              act="silu", tied=False),
                           block_size=Read("max_position_embeddings", "model_max_length", default=4096),
                           rope_theta=10000.0)
BAICHUAN = Family(
    architecture="BaichuanForCausalLM", model_type="baichuan", name="Baichuan / Baichuan 2 (remote code)",
    layer_prefix="model.layers.{i}",
    qkv=Fused("self_attn.W_pack", QKVOrder.SEQUENTIAL, kv_heads=None),
    block=PRE_NORMS,
    layer_tensors=GATED_MLP, embedding="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    config=Choose(({"qkvconv_positions": "alibi"}, replace(_BAICHUAN_CONFIG, rotary_fraction=0.0)),
                  ({}, _BAICHUAN_CONFIG)),
    alibi=Choose(({"qkvconv_positions": "alibi"}, "bloom"), ({}, None)),
    verifiable=True,
    biases=Biases(qkv=False, attn_out=False, mlp=False), norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
    positions=Choose(({"qkvconv_positions": "alibi"}, "ALiBi"), ({"qkvconv_positions": "rotary"}, "rotary, half order"),
                     ({}, "rotary, half order in the 7B models, ALiBi in the 13B ones (config.json does not say "
                          "which: --variant)")),
    unsupported=(({"qkvconv_positions": "alibi"}, "ALiBi (the 13B models; Llama and litgpt have none)"),),
    ignored=IGNORED_EVERYWHERE,
    remote_code=True,
    twin="LlamaForCausalLM",
    variants={"baichuan-7b": {"qkvconv_positions": "rotary", "qkvconv_normalized_head": False},
              "baichuan2-7b": {"qkvconv_positions": "rotary", "qkvconv_normalized_head": True},
              "baichuan-13b": {"qkvconv_positions": "alibi", "qkvconv_normalized_head": False},
              "baichuan2-13b": {"qkvconv_positions": "alibi", "qkvconv_normalized_head": True}},
    undecided="7B (rotary) from 13B (ALiBi) nor Baichuan 1 from 2 (a head normalised at run time)",
    normalized_head=Read("qkvconv_normalized_head", default=False),
)


# Remote-code originals that `inspect` names but qkvconv does not convert yet (an `unsupported` entry with no
# flags): only what inspect reads is meaningful (the fused tensor, the head keys, the layer count); the other
# modules are named as llama.cpp's gguf-py tensor_mapping.py lists them, for the reader.
def _inspect_only(n_embd: Read, n_layer: Read, n_head: Read, head_size: Read | None, rotary: Read | float) -> HFConfig:
    return HFConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head, head_size=head_size,
                    intermediate_size=Read("intermediate_size", default=None), vocab_size=Read("vocab_size", default=0),
                    block_size=Read("seq_length", "max_position_embeddings", default=0), norm_eps=1e-6,
                    activation="silu", tie_embeddings=Read("tie_word_embeddings", default=False), rope_theta=10000.0,
                    rotary_fraction=rotary)


NOT_YET = "not converted yet: {}"

# Qwen-1 (QWenLMHeadModel, model_type qwen), from its remote modeling_qwen.py (read through a public copy, never
# run) and llama.cpp conversion/qwen.py: QwenModel has no tensor hook, so c_attn goes to ggml's sequential attn_qkv
# as it is (tensor_mapping.py "transformer.h.{bid}.attn.c_attn  # gpt2 qwen"); the remote attention splits it with
# `split(hidden_size, dim=2)` into heads of hidden_size // num_attention_heads (MHA, with a bias; c_proj without).
# The MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection (tensor_mapping.py: mlp.w2 ->
# ffn_gate, mlp.w1 -> ffn_up), each intermediate_size // 2 wide. RMSNorms ln_1, ln_2, ln_f (layer_norm_epsilon);
# rotary in half order on the first rotary_pct of each head, base rotary_emb_base.
# use_dynamic_ntk and use_logn_attn (on in the released configs) act only past seq_length: logn scales queries
# where the key length exceeds seq_length, and the NTK alpha max(2 ** ceil(log2(L / seq_length) + 1) - 1, 1) is
# 1 for L <= seq_length. Qwen2 has neither, so the twin is the same function up to seq_length, which becomes its
# max_position_embeddings (docs/layouts.md section 8 says why this converts rather than refuses).
QWEN1 = Family(
    architecture="QWenLMHeadModel", model_type="qwen", name="Qwen-1 (remote code)",
    layer_prefix="transformer.h.{i}",
    qkv=Fused("attn.c_attn", QKVOrder.SEQUENTIAL, kv_heads=None),
    block=Block({"ln_1": "norm_1", "ln_2": "norm_2"}, parallel_residual=False),
    layer_tensors={"attn.c_proj": "attn.proj", "mlp.w2": "mlp.fc_1", "mlp.w1": "mlp.fc_2", "mlp.c_proj": "mlp.proj"},
    embedding="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    config=HFConfig(n_embd=Read("hidden_size"), n_layer=Read("num_hidden_layers"), n_head=Read("num_attention_heads"),
                    head_size=None, intermediate_size=Read("intermediate_size", default=22016, divisor=2),
                    vocab_size=Read("vocab_size", default=151936), block_size=Read("seq_length", default=8192),
                    norm_eps=Read("layer_norm_epsilon", default=1e-6), activation="silu",
                    tie_embeddings=Read("tie_word_embeddings", default=False),
                    rope_theta=Read("rotary_emb_base", default=10000.0),
                    rotary_fraction=Read("rotary_pct", default=1.0)),
    biases=Biases(qkv=True, attn_out=False, mlp=False), norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
    flag_defaults={"no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True},
    unsupported=(({"no_bias": False}, "biases on c_proj and the MLP (no_bias false; Qwen2 has q/k/v biases only)"),),
    caveats=tuple(({flag: True}, f"{flag} acts only past seq_length ({{block_size}} tokens, the twin's "
                                 "max_position_embeddings): exact up to it; Qwen2 has no such switch")
                  for flag in ("use_dynamic_ntk", "use_logn_attn")),
    ignored=IGNORED_EVERYWHERE,
    remote_code=True,
    twin="Qwen2ForCausalLM",
)

# The original OLMo 1 (`hf_olmo`: OLMoForCausalLM, model_type hf_olmo, auto_map to its own hf_olmo package).
# transformers 4.40's models/olmo/convert_olmo_weights_to_hf.py (downloaded from the package index, read):
# transformer.blocks.N.att_proj split [d_model, kv, kv] rows (sequential; K/V heads n_kv_heads, else 1 with
# multi_query_attention, else n_heads), ff_proj chunked into up rows then gate rows, attn_out -> o_proj, ff_out ->
# down_proj, transformer.wte, transformer.ff_out -> lm_head (absent with weight_tying); intermediate_size
# mlp_hidden_size // 2, else d_model * mlp_ratio // 2; vocab_size embedding_size (the rows), else vocab_size;
# rope_theta 10000. The hf_olmo wrapper keeps that model as `model`, so its files prefix "model." (from memory
# of the released files, not checked against one). The LayerNorms have no weights when layer_norm_with_affine is
# false, as in OlmoForCausalLM; everything else the remote config can switch on is refused. A missing flag takes
# the remote ModelConfig's default as remembered (not checked; rope off, include_bias and affine norms on, so a
# config.json without them is refused, never guessed): released config.json files list every key.
OLMO_HF = Family(
    architecture="OLMoForCausalLM", model_type="hf_olmo", name="OLMo original (remote code)",
    layer_prefix="model.transformer.blocks.{i}",
    qkv=Choose(({"n_kv_heads": SET}, Fused("att_proj", QKVOrder.SEQUENTIAL, kv_heads=Read("n_kv_heads"))),
               ({"multi_query_attention": True}, Fused("att_proj", QKVOrder.SEQUENTIAL, kv_heads=1)),
               ({}, Fused("att_proj", QKVOrder.SEQUENTIAL, kv_heads=None))),
    block=Block({"attn_norm": "norm_1", "ff_norm": "norm_2"}, parallel_residual=False),
    layer_tensors={"attn_out": "attn.proj", "ff_out": "mlp.proj"},
    fused_rows={"ff_proj": ("mlp.fc_2", "mlp.fc_1")},  # up rows, then gate rows
    embedding="model.transformer.wte", final_norm="model.transformer.ln_f", lm_head="model.transformer.ff_out",
    config=HFConfig(n_embd=Read("d_model"), n_layer=Read("n_layers"), n_head=Read("n_heads"), head_size=None,
                    intermediate_size=Read("mlp_hidden_size", default=None, divisor=2),
                    mlp_ratio=Read("mlp_ratio", default=4),
                    vocab_size=Read("embedding_size", "vocab_size"), block_size=Read("max_sequence_length", default=1024),
                    norm_eps=Read("layer_norm_eps", default=1e-5), activation="silu",
                    tie_embeddings=Read("weight_tying", default=True), rope_theta=Read("rope_theta", default=10000.0),
                    rotary_fraction=1.0),
    biases=Biases(qkv=False, attn_out=False, mlp=False), norm_class_name="LayerNorm", mlp_class_name="LLaMAMLP",
    norm_affine=False,
    flag_defaults={"rope": False, "alibi": False, "include_bias": True, "layer_norm_with_affine": True,
                   "attention_layer_norm": False, "clip_qkv": None, "block_type": "sequential",
                   "activation_type": "swiglu", "layer_norm_type": "default", "scale_logits": False,
                   "embedding_layer_norm": False, "norm_after": False, "multi_query_attention": False},
    unsupported=(({"rope": False}, "no rotary positions (rope false)"), ({"alibi": True}, "ALiBi"),
                 ({"include_bias": True}, "biases on every linear layer (include_bias)"),
                 ({"layer_norm_with_affine": True}, "LayerNorm weights (layer_norm_with_affine; OlmoForCausalLM's "
                                                    "have none)"),
                 ({"attention_layer_norm": True}, "q/k LayerNorms (attention_layer_norm)"),
                 ({"clip_qkv": SET}, "q/k/v clipping (clip_qkv)"),
                 ({"block_type": Not("sequential")}, "a block_type other than sequential"),
                 ({"activation_type": Not("swiglu")}, "an activation_type other than swiglu"),
                 ({"layer_norm_type": Not("default")}, "a layer_norm_type other than default"),
                 ({"scale_logits": True}, "scaled logits (scale_logits)"),
                 ({"embedding_layer_norm": True}, "a LayerNorm on the embeddings (embedding_layer_norm)"),
                 ({"norm_after": True}, "norms after attention and MLP (norm_after)")),
    ignored=IGNORED_EVERYWHERE,
    remote_code=True,
    twin="OlmoForCausalLM",
)

# ChatGLM2/3, GLM-4 (ChatGLMModel / ChatGLMForConditionalGeneration, model_type chatglm). llama.cpp
# conversion/chatglm.py: K/V heads multi_query_group_num (with multi_query_attention), the rotating dims half of
# each head, RoPE base 10000 * rope_ratio, query_key_value kept as ggml's sequential attn_qkv (tensor_mapping.py
# "encoder.layers.{bid}.self_attention.query_key_value  # chatglm", after the converter strips "transformer."),
# dense_h_to_4h as ggml's ffn_up holding gate then up rows (swiglu: chunk(2), silu(first) * second),
# dense_4h_to_h, output_layer. The remote code rotates the first kv_channels // 2 dims of each head in pairs
# (x.reshape(..., rot_dim // 2, 2)), as GlmForCausalLM does (partial_rotary_factor 0.5, pairs): the rows copy
# unchanged. Its query_key_layer_scaling divides the scores by the layer number and multiplies them back before
# an fp32 softmax: the same function. Checkpoints carry transformer.rotary_pos_emb.inv_freq, a buffer.
_CHATGLM_QKV = "self_attention.query_key_value"
CHATGLM = Family(
    architecture="ChatGLMModel", model_type="chatglm", name="ChatGLM2/3, GLM-4 (remote code)",
    layer_prefix="transformer.encoder.layers.{i}",
    qkv=Choose(({"multi_query_attention": True},
                Fused(_CHATGLM_QKV, QKVOrder.SEQUENTIAL, kv_heads=Read("multi_query_group_num"))),
               # without multi_query_attention the remote code views the output as (heads, 3 * head_dim) and
               # splits each head's part in three (Megatron's layout): per head, MHA
               ({}, Fused(_CHATGLM_QKV, QKVOrder.PER_HEAD, kv_heads=None))),
    block=Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False),
    layer_tensors={"self_attention.dense": "attn.proj", "mlp.dense_4h_to_h": "mlp.proj"},
    fused_rows={"mlp.dense_h_to_4h": ("mlp.fc_1", "mlp.fc_2")},
    embedding="transformer.embedding.word_embeddings",
    final_norm="transformer.encoder.final_layernorm", lm_head="transformer.output_layer",
    config=HFConfig(n_embd=Read("hidden_size"), n_layer=Read("num_layers"), n_head=Read("num_attention_heads"),
                    head_size=Read("kv_channels", default=None), intermediate_size=Read("ffn_hidden_size"),
                    vocab_size=Read("padded_vocab_size", "vocab_size"), block_size=Read("seq_length", default=2048),
                    norm_eps=Read("layernorm_epsilon", default=1e-5), activation="silu",
                    tie_embeddings=Read("tie_word_embeddings", default=False),
                    rope_theta=Read("rope_ratio", default=1, times=10000.0), rotary_fraction=0.5),
    biases=Biases(qkv=Read("add_qkv_bias", default=False), attn_out=False, mlp=False), norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    positions="rotary, pairs order",
    rotary_order="pairs",
    flag_defaults={"multi_query_attention": False, "rmsnorm": True, "add_bias_linear": False, "post_layer_norm": True,
                   "apply_residual_connection_post_layernorm": False, "original_rope": True},
    unsupported=(({"rmsnorm": False}, "LayerNorms (rmsnorm false)"),
                 ({"add_bias_linear": True}, "biases on dense and the MLP (add_bias_linear)"),
                 ({"post_layer_norm": False}, "no final norm (post_layer_norm false)"),
                 ({"apply_residual_connection_post_layernorm": True},
                  "residuals taken after the norms (apply_residual_connection_post_layernorm)"),
                 ({"original_rope": False}, "original_rope false")),
    ignored=(*IGNORED_EVERYWHERE, r"^transformer\.rotary_pos_emb\.inv_freq$"),
    remote_code=True,
    twin="GlmForCausalLM",
)

# JAIS (JAISLMHeadModel, model_type jais), as its modeling_jais.py computes it (read through vLLM's port,
# models/jais.py, "adapted from inceptionai/jais-30b-chat-v3"): GPT-2's names and keys (n_embd, n_head, n_layer,
# n_inner, n_positions), every linear a Conv1D ([in, out]) with a bias, LayerNorms with biases; c_attn sequential
# (`qkv.chunk(3)`), MHA; scores scaled by head_dim ** -1 where mup_scale_qk_dot_by_d (or scale_qk_dot_by_d), else
# ** -0.5, plus ALiBi of the standard slopes (_get_alibi_slopes: Bloom's) where position_embedding_type is "alibi"
# (else a learned wpe: refused, llama.cpp's converter asserts ALiBi); SwiGLU `c_fc(x) * silu(c_fc2(x))`, so c_fc2
# is litgpt's activated fc_1 and c_fc its fc_2; embeddings (plus wpe) times mup_embeddings_scale (or
# embeddings_scale), logits times width_scale, else mup_output_alpha * mup_width_scale. The relative_pe.slopes
# buffer some checkpoints hold is skipped: the slopes are computed from the head count.
JAIS = Family(
    architecture="JAISLMHeadModel", model_type="jais", name="JAIS (remote code)",
    layer_prefix="transformer.h.{i}",
    qkv=Fused("attn.c_attn", QKVOrder.SEQUENTIAL, kv_heads=None, transposed=True),
    block=Block({"ln_1": "norm_1", "ln_2": "norm_2"}, parallel_residual=False),
    layer_tensors={"attn.c_proj": "attn.proj", "mlp.c_fc2": "mlp.fc_1", "mlp.c_fc": "mlp.fc_2", "mlp.c_proj": "mlp.proj"},
    conv1d=("attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"),
    embedding="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    config=HFConfig(n_embd=Read("n_embd"), n_layer=Read("n_layer"), n_head=Read("n_head"), head_size=None,
                    intermediate_size=Read("n_inner", default=None), vocab_size=Read("vocab_size", default=84992),
                    block_size=Read("n_positions", default=2048), norm_eps=Read("layer_norm_epsilon", default=1e-5),
                    activation="silu", tie_embeddings=Read("tie_word_embeddings", default=True), rope_theta=10000.0,
                    rotary_fraction=0.0),
    biases=Biases(qkv=True, attn_out=True, mlp=True), norm_class_name="LayerNorm", mlp_class_name="LLaMAMLP",
    positions="ALiBi",
    flag_defaults={"position_embedding_type": "learned", "activation_function": "gelu_new"},
    unsupported=(({}, "ALiBi and embeddings, scores and logits scaled by its mup_* settings"),),
    verifiable=True,
    unverifiable=(({"position_embedding_type": Not("alibi")}, "learned absolute positions (position_embedding_type)"),
                  ({"activation_function": Not("swiglu")}, "an MLP other than SwiGLU (activation_function)")),
    alibi="bloom",
    embedding_scale=Read("mup_embeddings_scale", "embeddings_scale", default=1.0),
    logit_scale=Choose(({"width_scale": SET}, (Read("width_scale"),)),
                       ({}, (Read("mup_output_alpha", default=1.0), Read("mup_width_scale", default=1.0)))),
    qk_dot_by_d=Read("mup_scale_qk_dot_by_d", "scale_qk_dot_by_d", default=False),
    ignored=(*IGNORED_EVERYWHERE, r"relative_pe\.slopes$", r"\.attn\.(masked_)?bias$"),
    remote_code=True,
)

# Phi-3-small (Phi3SmallForCausalLM, model_type phi3small), from sglang's models/phi3_small.py (read through a public
# copy): `qkv.view(..., -1, num_q_per_kv + 2, head_dim).split([num_q_per_kv, 1, 1], dim=-2)` on
# self_attn.query_key_value (with a bias), loaded by default_weight_loader (no re-ordering): grouped, GQA
# (num_key_value_heads); head_dim = hidden_size // num_attention_heads; rotary over the whole head
# (rope_embedding_base). Block-sparse attention on all but every dense_attention_every_n_layers-th layer, a
# "gegelu" MLP on interleaved columns of mlp.up_proj, and muP multipliers: nothing litgpt computes.
PHI3_SMALL = Family(
    architecture="Phi3SmallForCausalLM", model_type="phi3small", name="Phi-3-small (remote code)",
    layer_prefix="model.layers.{i}",
    qkv=Fused("self_attn.query_key_value", QKVOrder.GROUPED, kv_heads=Read("num_key_value_heads")),
    block=Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False),
    layer_tensors={"self_attn.dense": "attn.proj"}, embedding="model.embed_tokens", final_norm="model.final_layernorm",
    lm_head="lm_head",
    config=_inspect_only(Read("hidden_size"), Read("num_hidden_layers"), Read("num_attention_heads"), None, 1.0),
    biases=Biases(qkv=True, attn_out=True, mlp=True), norm_class_name="LayerNorm", mlp_class_name="LLaMAMLP",
    unsupported=(({}, NOT_YET.format("block-sparse attention, the gegelu MLP and muP multipliers")),),
    remote_code=True,
)

REMOTE = (INTERNLM2, PHI_MSFT, QWEN1, OLMO_HF, BAICHUAN, CHATGLM, JAIS, PHI3_SMALL)
