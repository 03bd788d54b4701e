"""Remote-code originals (config.json `auto_map`: the model's own Python next to its weights, which qkvconv
never imports or runs) that a transformers class computes exactly: read through the family table like any
architecture, and written by `convert --to hf` as that `twin`. Their config.json keys are the remote
configuration classes' own names.

Each entry's layout facts are cited with the second source they were checked against (llama.cpp's
converter, vendored in llama-cpp-python 0.3.36's sdist; tests/test_remote_twins.py runs its un-fusing code
on the fused tensors qkvconv builds).
"""

from __future__ import annotations

from qkvconv.formats.hf.pieces import IGNORED_EVERYWHERE, llama_style_config
from qkvconv.formats.hf.table import Biases, Block, Family, Fused, HFConfig, Read
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

REMOTE = (INTERNLM2, PHI_MSFT)
