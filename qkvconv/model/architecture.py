"""What the reference forward pass needs to know of a model, read once from a litgpt config.

`Architecture.from_litgpt_config(cfg)` applies litgpt.Config's defaults (a hand-written dict means what
it means to litgpt) and refuses, naming the feature, what the forward pass does not implement. A few fields
beyond litgpt's (REFERENCE_DEFAULTS: ALiBi, learned positions, ...) describe transformers classes that litgpt
cannot express, which `verify` reads; a litgpt config leaves them at the values that mean litgpt's model. The
format modules use it too, to tell whether two configs compute the same function. Pure data: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from qkvconv.errors import UnsupportedFamily


# litgpt.Config's defaults for the fields read here, so a hand-written config dict that omits
# a field means what it means to litgpt (a saved model_config.yaml holds every field).
_LITGPT_DEFAULTS: dict[str, Any] = {
    "name": "",
    "n_layer": 16,
    "n_embd": 4096,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "padded_vocab_size": None,
    "norm_class_name": "LayerNorm",
    "norm_eps": 1e-5,
    "norm_qk": False,
    "norm_qk_type": "default",
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "parallel_residual": True,
    "shared_attention_norm": False,
    "n_head": 32,
    "head_size": None,
    "n_query_groups": None,
    "attn_bias": False,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "sliding_window_indices": None,
    "attention_logit_softcapping": None,
    "rope_base": 10000,
    "rotary_percentage": 0.25,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "rope_interleave": False,
    "bias": True,
    "mlp_class_name": "GptNeoxMLP",
    "gelu_approximate": "none",
    "n_expert": 0,
    "n_expert_per_token": 0,
    "n_shared_expert": None,
    "n_expert_groups": None,
    "routed_scaling_factor": 1.0,
    "first_k_dense_replace": None,
    "scale_embeddings": False,
    "lm_head_bias": False,
    "final_logit_softcapping": None,
    "norm_1": True,
    "norm_2": True,
    "latent_attention": None,
    "rope_local_base_freq": None,
    "rope_indices": None,
}

# qkvconv's own fields beyond litgpt's, with the values that mean "as litgpt computes": only the reading of a
# transformers class that litgpt cannot express (formats/hf/reference.py, for `verify`) sets them, so a litgpt
# config never holds one and means what it always meant.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "learned_positions": False,  # a learned table of absolute positions added to the embeddings (GPT-2 wpe)
    "embedding_norm": False,  # a norm on the embeddings (Bloom's word_embeddings_layernorm)
    "alibi": None,  # ALiBi slopes: "bloom" (build_alibi_tensor) or "mpt" (build_mpt_alibi_tensor)
    "alibi_bias_max": 8.0,  # build_mpt_alibi_tensor's alibi_bias_max
    "norm_bias": True,  # False: LayerNorms without a bias (MPT, DBRX)
    "clip_qkv": None,  # the fused QKV output clamped to [-c, c] (MPT, DBRX attn_config.clip_qkv)
    "mlp_activation": "gelu",  # the MLP's activation: see Architecture.mlp_activation
    "mlp_bias": None,  # the MLP's linears have biases; None: as litgpt's `bias` says (CodeGen: MLP only)
    "attention_scale": None,  # scores times this float (MPT softmax_scale); None: 1/sqrt(attention_scores_scalar)
    "logit_scale": 1.0,  # the logits times this float (Cohere's CohereForCausalLM logit_scale)
    "embedding_scale": 1.0,  # the embeddings (positions added) times this float (JAIS's mup_embeddings_scale)
}
ALIBI = ("bloom", "mpt")
NORM_QK_TYPES = ("default", "olmo2", "per_head")
MLP_ACTIVATIONS = ("gelu", "gelu_new", "gelu_bloom", "relu2")


def _refuse(name: str, feature: str) -> UnsupportedFamily:
    """One line: what the config asks for, and what is covered instead."""
    who = repr(name) if name else "this model"
    return UnsupportedFamily(f"{who} uses {feature}, which qkvconv's reference forward pass does not implement",
                             reason=feature)


@dataclass(frozen=True)
class Architecture:
    """Everything the forward pass needs, read once from a litgpt config (model_config.yaml)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int  # query heads
    n_query_groups: int  # key/value heads
    head_size: int
    padded_vocab_size: int
    norm_class_name: str  # "LayerNorm" | "RMSNorm"
    norm_eps: float
    norm_unit_offset: bool  # Gemma's RMSNorm scales by (1 + weight)
    norm_affine: bool  # False: litgpt's OLMo LayerNorm, no weight and no bias
    parallel_residual: bool
    shared_attention_norm: bool  # parallel residual: MLP reuses norm_1's output (Falcon-7B)
    mlp_class_name: str  # "GptNeoxMLP" | "LLaMAMLP" | "GemmaMLP" | "LLaMAMoE" (experts that are LLaMAMLPs)
    gelu_approximate: str  # "none" | "tanh"
    qkv_bias: bool
    proj_bias: bool  # attn.proj (mlp_bias: the MLP's linears; both litgpt's `bias`)
    lm_head_bias: bool
    scale_embeddings: bool
    attention_scale: float  # multiplies q @ k^T
    rope_n_elem: int  # leading dims of each Q/K head that rotate
    rope_base: float
    rope_condense_ratio: float
    rope_interleave: bool  # True: dims (2i, 2i+1) rotate together; False: (i, i + n/2)
    rope_scaling: str  # "none" | "linear" | "llama3"
    rope_factor: float
    rope_low_freq_factor: float
    rope_high_freq_factor: float
    rope_original_max_seq_len: int
    sliding_window_size: int | None
    sliding_window_layers: tuple[bool, ...]  # per layer: does the window apply
    # query/key norms: None; "default": one norm over head_size, shared by every head, applied after the
    # split into heads and before RoPE (Qwen3, Gemma 3); "olmo2": one norm over all of q and one over all
    # of k, before the split (OLMo 2); "per_head": after the split, a weight of its own for each head ((heads,
    # head_size) tensors: Cohere's use_qk_norm; not litgpt's: only transformers' Cohere reading sets it)
    norm_qk: str | None = None
    norm_1: bool = True  # the input norms (OLMo 2 has neither: only norms after attention and MLP)
    norm_2: bool = True
    post_attention_norm: bool = False  # a norm on the attention's output before the residual add (Gemma 2)
    post_mlp_norm: bool = False  # and on the MLP's
    attention_logit_softcapping: float | None = None  # scores -> c * tanh(scores / c) before the softmax
    final_logit_softcapping: float | None = None  # the same on the logits
    rope_local_base: float | None = None  # Gemma 3: the layers rope_local_layers marks rotate with this base,
    rope_local_layers: tuple[bool, ...] = ()  # unscaled; the others with rope_base and the scaling
    n_expert: int = 0  # LLaMAMoE: experts per layer,
    n_expert_per_token: int = 0  # and how many each token is routed to
    # Beyond litgpt (REFERENCE_DEFAULTS): what verify needs of transformers classes litgpt cannot express
    learned_positions: bool = False  # + a learned position table (names.POSITION_EMBEDDING) row per position
    embedding_norm: bool = False  # the embeddings normed (names.EMBEDDING_NORM) before the first layer
    alibi: str | None = None  # ALiBi biases on the scores: "bloom" or "mpt" slopes (reference/positions.py)
    alibi_bias_max: float = 8.0
    norm_bias: bool = True  # False: LayerNorms with a weight and no bias
    clip_qkv: float | None = None  # the QKV projection's output clamped to [-clip_qkv, clip_qkv]
    # GptNeoxMLP's activation: "gelu" (torch's, approximated per gelu_approximate), "gelu_new" (transformers'
    # NewGELUActivation: the tanh formula written out), "gelu_bloom" (Bloom's bloom_gelu_forward, constant
    # 0.79788456), "relu2" (squared ReLU)
    mlp_activation: str = "gelu"
    mlp_bias: bool = True  # the MLP's linears (proj_bias: the attention output's)
    logit_scale: float = 1.0  # the head's output multiplied by it (CohereForCausalLM `logits * logit_scale`)
    embedding_scale: float = 1.0  # the embeddings, positions added, multiplied by it (JAIS: `hidden *= scale`)

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    def function_fields(self) -> dict[str, Any]:
        """The fields that decide the function, without the name, one spelling per function: positions
        condensed by c (litgpt's rope_condense_ratio, LLaMA-2-7B-32K) rotate as linear RoPE scaling by c
        (every inverse frequency / c), config.json's way to say it, so where nothing else scales the RoPE
        and there is no local base (litgpt condenses the local layers' positions too) both read as linear."""
        out = asdict(self)
        out.pop("name")
        condense = out["rope_condense_ratio"]
        if condense != 1 and out["rope_scaling"] == "none" and out["rope_local_base"] is None:
            out.update(rope_condense_ratio=1, rope_scaling="linear", rope_factor=float(condense))
        return out

    @classmethod
    def from_litgpt_config(cls, cfg: Mapping[str, Any]) -> Architecture:
        """Derive the architecture the way litgpt.Config.__post_init__ and GPT.__init__ do.

        Raises UnsupportedFamily for any config feature this pass does not compute, so that
        `verify` never reports a match or mismatch from a model it silently mis-computed.
        """
        c = {**_LITGPT_DEFAULTS, **{k: v for k, v in cfg.items() if k in _LITGPT_DEFAULTS}}
        # A yaml `null` means the litgpt default as well.
        c = {k: (_LITGPT_DEFAULTS[k] if v is None else v) for k, v in c.items()}
        x = {**REFERENCE_DEFAULTS, **{k: v for k, v in cfg.items() if k in REFERENCE_DEFAULTS}}
        name: str = c["name"]

        def refuse_if(condition: Any, feature: str) -> None:
            if condition:
                raise _refuse(name, feature)

        refuse_if(c["latent_attention"], "multi-head latent attention (latent_attention, DeepSeek)")
        moe = c["mlp_class_name"] == "LLaMAMoE"
        refuse_if(c["first_k_dense_replace"] is not None, "dense layers before the experts (first_k_dense_replace)")
        refuse_if(moe and c["n_shared_expert"], "shared experts (n_shared_expert)")
        refuse_if(moe and c["n_expert_groups"], "grouped expert routing (n_expert_groups)")
        refuse_if(moe and c["routed_scaling_factor"] != 1.0, "scaled expert weights (routed_scaling_factor)")
        refuse_if(moe and not 0 < c["n_expert_per_token"] <= c["n_expert"],
                  f"{c['n_expert_per_token']} experts per token of {c['n_expert']}")
        refuse_if(
            c["mlp_class_name"] not in ("GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"),
            f"the MLP class {c['mlp_class_name']!r}",
        )
        refuse_if(c["norm_class_name"] not in ("LayerNorm", "RMSNorm"), f"the norm {c['norm_class_name']!r}")
        refuse_if(c["norm_qk"] and c["norm_qk_type"] not in NORM_QK_TYPES,
                  f"query/key norms of type {c['norm_qk_type']!r}")
        refuse_if((not c["norm_1"] or not c["norm_2"]) and c["parallel_residual"],
                  "a parallel residual without an input norm (norm_1/norm_2 = False)")
        refuse_if(x["alibi"] not in (None, *ALIBI), f"ALiBi slopes {x['alibi']!r}")
        refuse_if(x["mlp_activation"] not in MLP_ACTIVATIONS, f"the MLP activation {x['mlp_activation']!r}")
        refuse_if(c["rope_local_base_freq"] is not None and c["rope_indices"] is None,
                  "a local RoPE base without rope_indices (which layers use it)")
        # litgpt's Block raises NotImplementedError on this combination itself.
        refuse_if(
            not c["parallel_residual"] and c["shared_attention_norm"],
            "a shared attention norm without parallel residual",
        )

        n_head: int = c["n_head"]
        head_size: int = c["head_size"] or c["n_embd"] // n_head
        n_query_groups: int = c["n_query_groups"] or n_head
        if n_head % n_query_groups:
            raise _refuse(name, f"n_head={n_head} not divisible by n_query_groups={n_query_groups}")
        rope_n_elem = int(c["rotary_percentage"] * head_size)
        # litgpt's rotary for an odd n_elem concatenates halves of unequal size: no real model does it.
        refuse_if(rope_n_elem % 2, f"an odd number of rotary dims ({rope_n_elem})")

        rope_scaling, factor, low, high, original = _rope_scaling(name, c["rope_adjustments"])

        padded_vocab_size = c["padded_vocab_size"]
        if padded_vocab_size is None:
            multiple = c["padding_multiple"]
            padded_vocab_size = -(-c["vocab_size"] // multiple) * multiple

        window = c["sliding_window_size"]
        if window is None:
            window_layers = (False,) * c["n_layer"]
        else:
            indices = c["sliding_window_indices"] or [1] * c["n_layer"]
            if len(indices) < c["n_layer"]:
                raise _refuse(name, f"sliding_window_indices shorter than n_layer ({len(indices)})")
            window_layers = tuple(bool(i) for i in indices[: c["n_layer"]])

        return cls(
            name=name,
            n_layer=c["n_layer"],
            n_embd=c["n_embd"],
            n_head=n_head,
            n_query_groups=n_query_groups,
            head_size=head_size,
            padded_vocab_size=padded_vocab_size,
            norm_class_name=c["norm_class_name"],
            norm_eps=c["norm_eps"],
            # litgpt.Config.norm_class decides this by name: partial(RMSNorm, add_unit_offset="Gemma" in name).
            norm_unit_offset=c["norm_class_name"] == "RMSNorm" and "Gemma" in name,
            # and partial(torch.nn.LayerNorm, elementwise_affine=False) for a LayerNorm when "OLMo" is in it.
            norm_affine=not (c["norm_class_name"] == "LayerNorm" and "OLMo" in name),
            parallel_residual=c["parallel_residual"],
            shared_attention_norm=c["shared_attention_norm"],
            mlp_class_name=c["mlp_class_name"],
            gelu_approximate=c["gelu_approximate"],
            qkv_bias=bool(c["bias"] or c["attn_bias"]),
            proj_bias=bool(c["bias"]),
            lm_head_bias=bool(c["lm_head_bias"]),
            scale_embeddings=bool(c["scale_embeddings"]),
            attention_scale=(float(x["attention_scale"]) if x["attention_scale"] is not None
                             else 1.0 / math.sqrt(c["attention_scores_scalar"] or head_size)),
            rope_n_elem=rope_n_elem,
            rope_base=c["rope_base"],
            rope_condense_ratio=c["rope_condense_ratio"],
            rope_interleave=bool(c["rope_interleave"]),
            rope_scaling=rope_scaling,
            rope_factor=factor,
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            rope_original_max_seq_len=original,
            sliding_window_size=window,
            sliding_window_layers=window_layers,
            norm_qk=c["norm_qk_type"] if c["norm_qk"] else None,
            norm_1=bool(c["norm_1"]),
            norm_2=bool(c["norm_2"]),
            post_attention_norm=bool(c["post_attention_norm"]),
            post_mlp_norm=bool(c["post_mlp_norm"]),
            attention_logit_softcapping=c["attention_logit_softcapping"],
            final_logit_softcapping=c["final_logit_softcapping"],
            rope_local_base=c["rope_local_base_freq"],
            rope_local_layers=tuple(bool(i) for i in c["rope_indices"] or ()),
            n_expert=c["n_expert"] if moe else 0,
            n_expert_per_token=c["n_expert_per_token"] if moe else 0,
            learned_positions=bool(x["learned_positions"]),
            embedding_norm=bool(x["embedding_norm"]),
            alibi=x["alibi"],
            alibi_bias_max=float(x["alibi_bias_max"]),
            norm_bias=bool(x["norm_bias"]),
            clip_qkv=None if x["clip_qkv"] is None else float(x["clip_qkv"]),
            mlp_activation=x["mlp_activation"],
            mlp_bias=bool(c["bias"] if x["mlp_bias"] is None else x["mlp_bias"]),
            logit_scale=float(x["logit_scale"]),
            embedding_scale=float(x["embedding_scale"]),
        )


def _rope_scaling(name: str, adj: Mapping[str, Any] | None) -> tuple[str, float, float, float, int]:
    """Classify `rope_adjustments` the way litgpt's GPT.rope_cache does: Llama-3, linear, or none."""
    if not adj:
        return "none", 1.0, 0.0, 0.0, 0
    if "beta_fast" in adj or "beta_slow" in adj:
        raise _refuse(name, "YaRN RoPE scaling (rope_adjustments with beta_fast/beta_slow)")
    if "low_freq_factor" in adj or "high_freq_factor" in adj:
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len") if k not in adj]
        if missing:
            raise _refuse(name, f"Llama-3 RoPE scaling without {', '.join(missing)}")
        return (
            "llama3",
            float(adj["factor"]),
            float(adj["low_freq_factor"]),
            float(adj["high_freq_factor"]),
            int(adj["original_max_seq_len"]),
        )
    if "factor" in adj:
        return "linear", float(adj["factor"]), 0.0, 0.0, 0
    return "none", 1.0, 0.0, 0.0, 0
