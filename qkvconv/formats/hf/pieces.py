"""Pieces the family table's entries share (families.py, families_more.py): where transformers keeps
RoPE settings, the activations litgpt's MLPs compute, Llama's q/k/v, norm and MLP names and its config.json
keys. Data and one helper; the schema is table.py."""

from __future__ import annotations

from qkvconv.formats.hf.table import Block, HFConfig, Read, Split

# transformers >= 5 standardizes RoPE settings into `rope_parameters`; older files have `rope_theta`
# at the top level and scaling in `rope_scaling`. Most classes default to theta 10000 (SmolLM3 and Cohere
# have their own `default_theta`).
ROPE_THETA = Read("rope_parameters.rope_theta", "rope_scaling.rope_theta", "rope_theta", default=10000.0)
def partial_rotary(default: float) -> Read:
    """The share of each head's dims that rotate, where transformers keeps it (and its class default)."""
    return Read("rope_parameters.partial_rotary_factor", "partial_rotary_factor", default=default)


ROTARY_FRACTION = partial_rotary(1.0)

# HF activation name -> litgpt gelu_approximate (GemmaMLP, GptNeoxMLP); LLaMAMLP is SiLU only.
GELU_APPROXIMATE = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}
SILU = ("silu", "swish")
# HF activation name -> the reference pass's (mlp_activation, gelu_approximate), each as transformers 5.3 computes
# it (activations.py ACT2CLS): gelu_new is NewGELUActivation's tanh formula written out (litgpt's torch tanh GELU
# differs in the last bits), gelu_pytorch_tanh torch's; "gelu_bloom" stands for Bloom's bloom_gelu_forward
REFERENCE_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_new": ("gelu_new", "none"),
                         "gelu_bloom": ("gelu_bloom", "none"), "relu2": ("relu2", "none")}

# Non-weight buffers that older checkpoints saved: RoPE inverse frequencies, GPT-NeoX's causal mask.
IGNORED_EVERYWHERE = (r"\.rotary_emb\.inv_freq$",)

LLAMA_STYLE_QKV = Split(
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", kv_heads=Read("num_key_value_heads", default=None)
)
PRE_NORMS = Block({"input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}, parallel_residual=False)
GATED_MLP = {
    "self_attn.o_proj": "attn.proj",
    "mlp.gate_proj": "mlp.fc_1",  # the activated half: down(act(gate(x)) * up(x))
    "mlp.up_proj": "mlp.fc_2",
    "mlp.down_proj": "mlp.proj",
}


def llama_style_config(*, head_size: Read | None, intermediate: int, vocab: int, positions: int,
                       eps: float, act: str, tied: bool, rotary_fraction: Read | float = 1.0) -> HFConfig:
    """The config.json keys of Llama and the families modelled on it; the defaults differ per class."""
    return HFConfig(
        n_embd=Read("hidden_size"),
        n_layer=Read("num_hidden_layers"),
        n_head=Read("num_attention_heads"),
        head_size=head_size,
        intermediate_size=Read("intermediate_size", default=intermediate),
        vocab_size=Read("vocab_size", default=vocab),
        block_size=Read("max_position_embeddings", default=positions),
        norm_eps=Read("rms_norm_eps", default=eps),
        activation=Read("hidden_act", default=act),
        tie_embeddings=Read("tie_word_embeddings", default=tied),
        rope_theta=ROPE_THETA,
        rotary_fraction=rotary_fraction,
    )
