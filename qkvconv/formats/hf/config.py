"""config.json <-> litgpt config for the architectures of the family table (families.py), and the rules
that pick an architecture for a model: pure data and dict work, no torch, so `inspect` of an HF
directory needs none.

    cfg = json.load(open("hf_model/config.json"))
    family = detect_family(cfg)                # None: an architecture qkvconv cannot interpret
    lit_cfg = litgpt_config_from_hf(cfg)       # litgpt.Config(**lit_cfg) builds the same model
    hf_cfg = hf_config_from_litgpt(lit_cfg)    # a config.json when the source has none

Anything the family table does not cover is refused with an UnsupportedFamily that says what and
names the supported architectures (its `reason` without the list). A family in the table can still be
refused: every `unsupported` feature it has is named ("X with A and B has no litgpt equivalent").
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Mapping
from typing import Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf.families import FAMILIES, GELU_APPROXIMATE, SILU, supported
from qkvconv.formats.hf.reading import _divided, _int, _lookup, _read, _write  # noqa: F401 (re-exported)
from qkvconv.formats.hf.table import NOTHING, VARIANT_KEY, Block, Choose, Family, Fused, Matcher, Read, Split
from qkvconv.model.architecture import Architecture
from qkvconv.model.layout import HeadLayout, LayoutError

HF_CONFIG = "config.json"


def _architecture_name(config_json: Mapping[str, Any]) -> str | None:
    archs = config_json.get("architectures") or []
    # a remote-code original is known by its model_type first: some name a transformers class in
    # `architectures` (phi-2's original config says PhiForCausalLM with model_type phi-msft)
    remote = [f.architecture for f in FAMILIES.values() if f.remote_code and f.model_type == config_json.get("model_type")]
    if remote:
        return remote[0]
    for a in archs:
        if a in FAMILIES:
            return a
    if archs:
        return None
    by_type = [f.architecture for f in FAMILIES.values() if f.model_type == config_json.get("model_type")]
    return by_type[0] if by_type else None


def detect_family(config_json: Mapping[str, Any]) -> Family | None:
    """The family config.json describes, with its flag-dependent fields resolved; None when unknown.

    The architecture comes from `architectures` (the first one qkvconv knows), else from `model_type`.
    A known architecture whose flags make a layout transformers cannot run raises UnsupportedFamily.
    """
    if not isinstance(config_json, Mapping):
        raise QkvconvError("config.json does not hold a mapping of settings")
    architecture = _architecture_name(config_json)
    if architecture is None:
        return None
    return FAMILIES[architecture].resolve(config_json)


def with_variant(config_json: Mapping[str, Any], name: str | None) -> dict[str, Any]:
    """config.json with the flags of the variant `name` of its family added; an error naming the family's
    variants when it has no such one. A family whose config.json decides by itself ignores the name: one command
    may read several models (verify's two sides, an adapter's base), and the name is about the one that needs it."""
    family = detect_family(config_json) if name is not None else None
    if name is None or family is None or not family.variants:
        return dict(config_json)
    if name not in family.variants:
        raise QkvconvError(f"--variant {name}: {family.architecture} has {', '.join(family.variants)}")
    return {**config_json, **family.variants[name], VARIANT_KEY: name}


def require_family(config_json: Mapping[str, Any]) -> Family:
    family = detect_family(config_json)
    if family is None:
        what = config_json.get("architectures") or config_json.get("model_type") or "no architecture"
        reason = f"config.json describes {what}, which qkvconv cannot map"
        raise UnsupportedFamily(f"{reason}; supported: {supported()}", reason=reason)
    return family


def _features(features: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(filter(None, (", ".join(features[:-1]), features[-1])))


def _refuse(family: Family, feature: str) -> UnsupportedFamily:
    reason = f"{family.architecture} with {feature} has no litgpt equivalent"
    return UnsupportedFamily(f"{reason}; qkvconv maps: {supported()}", reason=reason)


def _heads(family: Family, cfg: Mapping[str, Any]) -> tuple[int, HeadLayout]:
    """n_embd and the attention heads, as transformers derives them for this family."""
    n_embd = _int(cfg, family.config.n_embd, "hidden_size")
    n_head = _int(cfg, family.config.n_head, "num_attention_heads")
    qkv = family.qkv
    assert isinstance(qkv, (Split, Fused))
    kv = qkv.kv_heads
    n_query_groups = _int(cfg, kv, "the number of key/value heads") if isinstance(kv, Read) else kv
    head_size = _read(cfg, family.config.head_size) if family.config.head_size is not None else None
    if head_size is None:
        if n_embd % n_head:
            raise QkvconvError(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
        head_size = n_embd // n_head
    try:
        return n_embd, HeadLayout(n_head, n_query_groups or n_head, int(head_size))
    except LayoutError as e:
        raise QkvconvError(f"config.json: invalid head configuration: {e}") from None


def _rope(family: Family, cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and litgpt rope_adjustments from rope_parameters (transformers >= 5) or rope_scaling."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise _refuse(family, f"rope_parameters {params!r}")
    if any(isinstance(v, Mapping) for v in params.values()):  # per layer type (Gemma 3)
        if family.config.local_rope_theta is None or set(params) - {"full_attention", "sliding_attention"}:
            raise _refuse(family, "separate RoPE settings per layer type")
        local = params.get("sliding_attention") or {}
        if (local.get("rope_type") or "default") != "default":
            raise _refuse(family, "RoPE scaling on the sliding layers (litgpt scales the global ones only)")
        params = params.get("full_attention") or {}
    theta = float(_read(cfg, family.config.rope_theta))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in family.rope_types and kind in ("linear", "llama3"):
        raise UnsupportedFamily(f"{family.architecture} does not accept RoPE scaling {kind!r} (transformers' "
                                f"config class refuses it)")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"factor": float(params["factor"])}
    if kind == "llama3":
        original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if original is None:
            original = _read(cfg, family.config.block_size)
        return theta, {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_seq_len": int(original),
        }
    raise _refuse(family, f"RoPE scaling {kind!r} (litgpt conversions cover default, linear and llama3)")


def _sliding_window(family: Family, cfg: Mapping[str, Any], n_layer: int) -> tuple[int | None, list[int] | None]:
    sw = family.sliding_window
    if sw is None:
        return None, None
    if any(key in cfg and cfg[key] is None for key in sw.size.keys):  # an explicit null: no window (Mistral v0.2)
        return None, None
    size = _read(cfg, sw.size)
    if size is None or not _read(cfg, sw.enabled):
        return None, None
    types = cfg.get(sw.layer_types) if sw.layer_types else None
    if types:
        if len(types) != n_layer:
            raise QkvconvError(f"config.json: {sw.layer_types} has {len(types)} entries for {n_layer} layers")
        layers = [int(t == "sliding_attention") for t in types]
    elif sw.first_layer is not None:
        first = _read(cfg, sw.first_layer)
        layers = [int(i >= first) for i in range(n_layer)]
    else:
        layers = [int(sw.untyped)] * n_layer
    if not any(layers):
        return None, None
    return int(size), layers


def _litgpt_name(family: Family) -> str:
    """litgpt reads two facts off a config's name: Gemma's (1 + w) RMSNorm ("Gemma" in it) and OLMo's
    LayerNorm without weights ("OLMo" in it). The architecture's name says the first by itself."""
    return family.architecture if family.norm_affine else f"OLMo ({family.architecture})"


def litgpt_config_from_hf(config_json: Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """The litgpt Config fields (a dict `litgpt.Config(**d)` accepts) of the model config.json describes.

    The vocabulary is not padded further: litgpt's padded_vocab_size is the embedding's row count.
    `name` defaults to the architecture ("LlamaForCausalLM"); litgpt decides Gemma's (1 + weight) RMSNorm
    by "Gemma" in the name, so a name that disagrees with the family is refused.
    """
    family = require_family(config_json)
    cfg = config_json
    if not family.convertible:  # inspect-only: refused before any number is read
        raise _refuse(family, _features(family.refused_features(cfg)))
    return model_config(family, cfg, name=name)


def model_config(family: Family, cfg: Mapping[str, Any], *, name: str | None = None, litgpt: bool = True
                 ) -> dict[str, Any]:
    """litgpt_config_from_hf's fields. `litgpt` False (verify's reading, formats/hf/reference.py): what litgpt
    cannot express is not refused but left for the caller to describe in the reference pass's own fields.
    A family whose config.json cannot tell its models apart is refused without the user's --variant, either way."""
    if family.variants and VARIANT_KEY not in cfg:  # never guessed
        reason = (f"{family.architecture}: config.json cannot tell {family.undecided}; name the model with "
                  f"--variant {' | '.join(family.variants)}")
        raise UnsupportedFamily(reason, reason=reason)
    n_embd, heads = _heads(family, cfg)
    scale_embeddings, scores_scalar, off_scales = _scales(family, cfg, n_embd, heads.head_size)
    features = family.refused_features(cfg) + off_scales
    if features and litgpt:
        raise _refuse(family, _features(features))

    n_layer = _int(cfg, family.config.n_layer, "num_hidden_layers")
    intermediate = _read(cfg, family.config.intermediate_size)
    if intermediate is None:  # the family's ratio to n_embd, in the config's units as intermediate_size
        rule = family.config.intermediate_size
        intermediate = _divided(rule, "the MLP size (hidden size times its ratio)",
                                int(_read(cfg, family.config.mlp_ratio) * n_embd))
    intermediate = int(intermediate)
    vocab = _int(cfg, family.config.vocab_size, "vocab_size")

    act = _read(cfg, family.config.activation)
    if family.mlp_class_name in ("LLaMAMLP", "LLaMAMoE"):
        if act not in SILU:
            raise _refuse(family, f"the activation {act!r} (litgpt's LLaMAMLP is SiLU-gated)")
        gelu_approximate = "none"
    else:
        if act not in GELU_APPROXIMATE and litgpt:
            raise _refuse(family, f"the activation {act!r} (litgpt's {family.mlp_class_name} uses GELU)")
        gelu_approximate = GELU_APPROXIMATE.get(act, "none")

    qkv_bias, out_bias, mlp_bias = (bool(_read(cfg, getattr(family.biases, g))) for g in ("qkv", "attn_out", "mlp"))
    if out_bias != mlp_bias and litgpt:
        raise _refuse(
            family,
            f"{'a' if out_bias else 'no'} bias on the attention output but {'' if mlp_bias else 'no '}MLP biases "
            "(litgpt's `bias` switches both together)",
        )
    if mlp_bias and not qkv_bias and litgpt:
        raise _refuse(family, "biases everywhere but on q/k/v (litgpt's `bias` includes the q/k/v bias)")

    block = family.block
    assert isinstance(block, Block)
    rope_base, rope_adjustments = _rope(family, cfg)
    dims = _read(cfg, family.config.rotary_dims) if family.config.rotary_dims is not None else None
    rotary = dims / heads.head_size if dims is not None else float(_read(cfg, family.config.rotary_fraction))
    window, window_layers = _sliding_window(family, cfg, n_layer)

    name = name or _litgpt_name(family)
    olmo = family.norm_class_name == "LayerNorm" and not family.norm_affine
    if ("Gemma" in name) != family.norm_unit_offset or (family.norm_class_name == "LayerNorm" and ("OLMo" in name) != olmo):
        raise QkvconvError(
            f"litgpt name {name!r}: litgpt applies Gemma's (1 + weight) RMSNorm exactly when the name contains "
            f"'Gemma', and drops LayerNorm weights exactly when it contains 'OLMo'; {family.architecture} needs "
            f"{'a' if family.norm_unit_offset else 'no'} 'Gemma' and {'an' if olmo else 'no'} 'OLMo' in the name"
        )

    return {
        "name": name,
        "block_size": _int(cfg, family.config.block_size, "max_position_embeddings"),
        "n_layer": n_layer,
        "n_embd": n_embd,
        "vocab_size": vocab,
        "padded_vocab_size": vocab,
        "norm_class_name": family.norm_class_name,
        "norm_eps": float(_read(cfg, family.config.norm_eps)),
        "parallel_residual": bool(_read(cfg, block.parallel_residual)),
        "shared_attention_norm": block.shared_attention_norm,
        "n_head": heads.n_head,
        "head_size": heads.head_size,
        "n_query_groups": heads.n_query_groups,
        "bias": mlp_bias,
        "attn_bias": qkv_bias and not mlp_bias,
        "lm_head_bias": family.lm_head_bias,
        "sliding_window_size": window,
        "sliding_window_indices": window_layers,
        "rope_base": int(rope_base) if rope_base.is_integer() else rope_base,
        "rotary_percentage": rotary,
        "rope_adjustments": rope_adjustments,
        "intermediate_size": intermediate,
        "mlp_class_name": family.mlp_class_name,
        "gelu_approximate": gelu_approximate,
        "scale_embeddings": scale_embeddings,
        **({"norm_qk": True, "norm_qk_type": family.norm_qk} if family.norm_qk else {}),
        **({"rope_interleave": True} if family.rotary_order == "pairs" else {}),
        **_moe_fields(family, cfg),
        **({"attention_scores_scalar": scores_scalar} if scores_scalar is not None else {}),
        **_extra_fields(family, cfg, block, window_layers, n_layer),
    }


def _moe_fields(family: Family, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """litgpt's LLaMAMoE fields: experts, experts per token, the experts' hidden size where it has its own
    key (else intermediate_size is theirs, as in litgpt's Mixtral configs)."""
    moe = family.moe
    if moe is None:
        return {}
    if moe.renormalize is not None and not _read(cfg, moe.renormalize):
        raise _refuse(family, f"router weights not renormalised over the chosen experts ({moe.renormalize.keys[0]} "
                              "false; litgpt's LLaMAMoE always renormalises)")
    out = {"n_expert": _int(cfg, moe.n_expert, "the number of experts"),
           "n_expert_per_token": _int(cfg, moe.per_token, "the number of experts per token")}
    if moe.expert_size is not None:
        out["moe_intermediate_size"] = _int(cfg, moe.expert_size, "the experts' intermediate size")
    return out


def _extra_fields(family: Family, cfg: Mapping[str, Any], block: Block, window_layers: list[int] | None,
                  n_layer: int) -> dict[str, Any]:
    """The litgpt fields of input norms left out, norms after attention and MLP, soft-capping, the scores'
    scalar and a local RoPE base, where the family has them (only then: other families' model_config.yaml
    stays as litgpt writes it)."""
    out: dict[str, Any] = {}
    for lit in ("norm_1", "norm_2"):  # OLMo 2 has no input norms (a shared norm_1 serves as norm_2: Falcon-7B)
        shared = lit == "norm_2" and block.shared_attention_norm
        if lit not in block.norms.values() and family.norm_affine and not shared:
            out[lit] = False
    if family.config.local_rope_theta is not None:
        local = float(_read(cfg, family.config.local_rope_theta))
        out["rope_local_base_freq"] = int(local) if local.is_integer() else local
        out["rope_indices"] = list(window_layers or [0] * n_layer)  # litgpt: 1 = the local cache
    for lit in ("post_attention_norm", "post_mlp_norm"):
        if lit in block.norms.values():
            out[lit] = True
    c = family.config
    if c.attention_scores_scalar is not None:
        out["attention_scores_scalar"] = int(_read(cfg, c.attention_scores_scalar))
    for rule, lit in ((c.attention_softcap, "attention_logit_softcapping"), (c.final_softcap, "final_logit_softcapping")):
        if rule is None:
            continue
        # an explicit null turns soft-capping off; only an absent key means the class default
        value = cfg[rule.keys[0]] if rule.keys[0] in cfg else _read(cfg, rule)
        if value is not None:
            out[lit] = float(value)
    return out


def _float32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


def _scales(family: Family, cfg: Mapping[str, Any], n_embd: int, head_size: int
            ) -> tuple[bool, int | None, list[str]]:
    """litgpt's scale_embeddings and attention_scores_scalar (None: head_size's) for the family's embedding
    and attention scales (Granite's multipliers), and the values of those that litgpt has no twin of.

    Embeddings: transformers multiplies by the float32 of the config value, litgpt (scale_embeddings) by the
    float32 of n_embd ** 0.5: 1 and that are litgpt's. Scores: litgpt multiplies by 1 / sqrt(scalar), an
    integer scalar (to double precision: one rounding of the config value's decimal digits)."""
    c, off = family.config, []
    scale_embeddings = family.scale_embeddings
    if c.embedding_scale is not None:
        scale = float(_read(cfg, c.embedding_scale))
        scale_embeddings = scale != 1.0
        if scale_embeddings and _float32(scale) != _float32(n_embd ** 0.5):
            off.append(f"embeddings scaled by {c.embedding_scale.keys[0]}={scale!r} (litgpt scales them by "
                       "sqrt(n_embd) or not at all)")
    scalar = None
    if c.attention_scale is not None and _read(cfg, c.attention_scale) is not None:
        scale = float(_read(cfg, c.attention_scale))
        scalar = round(1.0 / (scale * scale)) if scale > 2 ** -26 else 0  # below: no scalar under 2 ** 52
        if scalar < 1 or not math.isclose(1.0 / math.sqrt(scalar), scale, rel_tol=1e-12):
            off.append(f"attention scores scaled by {c.attention_scale.keys[0]}={scale!r}, not 1/sqrt of an integer "
                       "(litgpt's attention_scores_scalar)")
        if scalar == head_size:  # litgpt's default: other litgpt configs leave it out
            scalar = None
    return scale_embeddings, scalar, off


def _forward_fields(litgpt_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the forward pass computes with (qkvconv.forward), one spelling per function (see
    Architecture.function_fields)."""
    return Architecture.from_litgpt_config(litgpt_cfg).function_fields()


# ---------------------------------------------------------------------------------------------
# writing config.json


def _flag_choices(family: Family) -> list[dict[str, Any]]:
    """Every combination of `Choose` cases, as the flags a config.json must hold to select it."""
    chooses = [getattr(family, f) for f in ("name", "qkv", "block") if isinstance(getattr(family, f), Choose)]
    keys: dict[str, bool] = {}  # flag -> whether all its case values are booleans
    for choose in chooses:
        for flags, _ in choose.cases:
            for k, v in flags.items():
                keys[k] = keys.get(k, True) and isinstance(v, bool)
    combos: list[dict[str, Any]] = []
    for cases in itertools.product(*(c.cases for c in chooses)):
        merged: dict[str, Any] = {}
        if any(merged.setdefault(k, v) != v for flags, _ in cases for k, v in flags.items()):
            continue  # contradictory cases
        # A flag no case of this combination sets is written false (booleans) or left out, so that an
        # earlier case ("multi_query": true, transformers' default) does not capture the config.
        flags = {k: merged.get(k, False) for k, boolean in keys.items() if k in merged or boolean}
        if flags not in combos:
            combos.append(flags)
    return combos or [{}]


def _hf_config_for(family: Family, litgpt_cfg: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json of `family` (with these flags) for the model litgpt_cfg describes; unchecked."""
    arch = Architecture.from_litgpt_config(litgpt_cfg)  # litgpt's defaults and derived values applied
    # Token ids belong to the tokenizer (litgpt's config has none); a class default pad id would become
    # an Embedding padding_idx, which must lie inside the vocabulary (Phi-3's 32000 does not always).
    cfg: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                           "pad_token_id": None, **flags}
    concrete = family.resolve(cfg)
    c = concrete.config
    assert isinstance(concrete.qkv, (Split, Fused)) and isinstance(concrete.block, Block)
    _write(cfg, c.n_embd, arch.n_embd)
    _write(cfg, c.n_layer, arch.n_layer)
    _write(cfg, c.n_head, arch.n_head)
    _write(cfg, concrete.qkv.kv_heads, arch.n_query_groups)
    if c.head_size is not None:
        _write(cfg, c.head_size, arch.head_size)
    # litgpt.Config: intermediate_size defaults to 4 * n_embd, block_size to 4096, rotary_percentage to 0.25
    intermediate = int(litgpt_cfg.get("intermediate_size") or 4 * arch.n_embd)
    moe = concrete.moe
    if moe is not None:
        experts = int(litgpt_cfg.get("moe_intermediate_size") or intermediate)  # litgpt: None means intermediate_size
        _write(cfg, moe.n_expert, arch.n_expert)
        _write(cfg, moe.per_token, arch.n_expert_per_token)
        _write(cfg, moe.renormalize, True)
        if moe.expert_size is None:
            intermediate = experts
        else:
            _write(cfg, moe.expert_size, experts)
    _write(cfg, c.intermediate_size, intermediate)
    _write(cfg, c.vocab_size, arch.padded_vocab_size)
    _write(cfg, c.block_size, int(litgpt_cfg.get("block_size") or 4096))
    _write(cfg, c.norm_eps, arch.norm_eps)
    gelu = "gelu_pytorch_tanh" if arch.gelu_approximate == "tanh" else "gelu"
    _write(cfg, c.activation, "silu" if arch.mlp_class_name in ("LLaMAMLP", "LLaMAMoE") else gelu)
    _write(cfg, c.tie_embeddings, False)  # litgpt keeps a separate lm_head
    _write(cfg, concrete.biases.qkv, arch.qkv_bias)
    _write(cfg, concrete.biases.attn_out, arch.proj_bias)
    _write(cfg, concrete.biases.mlp, arch.proj_bias)
    _write(cfg, concrete.block.parallel_residual, arch.parallel_residual)
    if c.attention_scores_scalar is not None:
        _write(cfg, c.attention_scores_scalar, int(litgpt_cfg.get("attention_scores_scalar") or arch.head_size))
    if c.attention_scale is not None:
        _write(cfg, c.attention_scale, 1.0 / math.sqrt(litgpt_cfg.get("attention_scores_scalar") or arch.head_size))
    if c.embedding_scale is not None:
        _write(cfg, c.embedding_scale, arch.n_embd ** 0.5 if arch.scale_embeddings else 1.0)
    for flags, _ in concrete.unsupported:  # where transformers' default would be a feature litgpt lacks
        for key, rule in flags.items():
            if isinstance(rule, Matcher) and rule.neutral(arch.n_layer) is not NOTHING:
                cfg[key] = rule.neutral(arch.n_layer)
    for rule, value in ((c.attention_softcap, arch.attention_logit_softcapping),
                        (c.final_softcap, arch.final_logit_softcapping)):
        if rule is not None:
            _write(cfg, rule, value)  # null where the model has none: the class default would cap

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(arch.rope_base)}
    scaling = _forward_fields(litgpt_cfg)  # condensed positions as linear scaling
    if arch.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=arch.rope_factor,
            low_freq_factor=arch.rope_low_freq_factor,
            high_freq_factor=arch.rope_high_freq_factor,
            original_max_position_embeddings=arch.rope_original_max_seq_len,
        )
    elif scaling["rope_scaling"] == "linear":
        rope.update(rope_type="linear", factor=scaling["rope_factor"])
    if c.local_rope_theta is not None:  # per layer type: the global settings, and the local base
        cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(arch.rope_local_base or _read({}, c.local_rope_theta))}}
    else:
        cfg["rope_parameters"] = rope
    _write(cfg, c.rope_theta, rope["rope_theta"])
    rotary = float(litgpt_cfg.get("rotary_percentage", 0.25))
    _write(cfg, c.rotary_fraction, rotary)
    if isinstance(c.rotary_fraction, Read):
        rope["partial_rotary_factor"] = rotary  # the standard place, besides a family's own key

    sw = concrete.sliding_window
    if sw is not None:
        layers = arch.sliding_window_layers if arch.sliding_window_size is not None else (False,) * arch.n_layer
        _write(cfg, sw.size, arch.sliding_window_size if any(layers) else None)
        _write(cfg, sw.enabled, any(layers))
        if sw.layer_types:
            cfg[sw.layer_types] = ["sliding_attention" if on else "full_attention" for on in layers]
        if sw.first_layer is not None:
            _write(cfg, sw.first_layer, next((i for i, on in enumerate(layers) if on), arch.n_layer))
    return cfg


def hf_config_from_litgpt(
    litgpt_cfg: Mapping[str, Any], architecture: str | None = None, *, qkv: str | None = None
) -> dict[str, Any]:
    """A config.json (transformers' AutoConfig accepts it) that computes the model litgpt_cfg describes.

    `architecture` picks the family; None tries them in FAMILIES order and takes the first that can
    express the model (a litgpt config does not say whether it came from Phi-3 or Mistral: both are
    the same function, so the tensors' fusion is then Mistral's). `qkv` ("fused" | "split") keeps only
    the families whose attention has that fusion. The head is written untied (tie_word_embeddings
    false): litgpt stores lm_head separately. Every candidate is read back with litgpt_config_from_hf
    and must give the same forward pass, field for field.
    """
    if architecture is not None and architecture not in FAMILIES:
        reason = f"{architecture} is not an architecture qkvconv maps"
        raise UnsupportedFamily(f"{reason}; supported: {supported()}", reason=reason)
    if architecture is not None and not FAMILIES[architecture].convertible:
        family = FAMILIES[architecture]
        raise _refuse(family, _features([feature for flags, feature in family.unsupported if not flags]))
    # families that litgpt cannot hold whatever the flags (inspect-only) are no candidates
    # remote-code formats are written only where asked for by name
    candidates = ([FAMILIES[architecture]] if architecture else
                  [f for f in FAMILIES.values() if f.convertible and not f.remote_code])
    if qkv is not None:
        candidates = [f for f in candidates if f.fusion == qkv]
        if not candidates:
            raise UnsupportedFamily(f"{architecture} has no {qkv} QKV projection")
    wanted = " ".join(w for w in (architecture or "supported architecture", qkv and f"with {qkv} QKV") if w)
    try:
        target = _forward_fields(litgpt_cfg)
    except QkvconvError as e:
        raise UnsupportedFamily(f"this litgpt config cannot be converted: {e}") from None
    closest: tuple[int, str] | None = None
    for family in candidates:
        for flags in _flag_choices(family):
            try:
                cfg = _hf_config_for(family, litgpt_cfg, flags)
                got = _forward_fields(litgpt_config_from_hf(cfg))
            except QkvconvError as e:  # the nearer miss: the family whose norm and MLP are the model's
                same_kind = (family.norm_class_name, family.mlp_class_name) == \
                    (target["norm_class_name"], target["mlp_class_name"])
                why = e.reason if isinstance(e, UnsupportedFamily) else str(e)  # the families come once, below
                reason = (98 if same_kind else 99, f"{family.architecture}: {why.removeprefix(family.architecture + ' ')}")
            else:
                if got == target:
                    return cfg
                diff = sorted(k for k in target if got[k] != target[k])
                reason = (len(diff), f"{family.architecture} differs in {', '.join(diff)}")
            if closest is None or reason[0] < closest[0]:
                closest = reason
    assert closest is not None
    reason = f"no {wanted} computes this model (nearest: {closest[1]})"
    raise UnsupportedFamily(
        f"{reason}; {f'with {qkv} QKV qkvconv maps' if qkv else 'supported'}: "
        f"{', '.join(f.architecture for f in candidates)}", reason=reason)
