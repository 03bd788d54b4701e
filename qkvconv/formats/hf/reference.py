"""How `verify` reads a Hugging Face config.json: litgpt's fields where litgpt can express the model, and for the
transformers classes it cannot (Family.verifiable: GPT-2, GPT-BigCode, Bloom, MPT, Persimmon, CodeGen, Cohere)
litgpt's fields plus the reference pass's own (model/architecture.py REFERENCE_DEFAULTS: learned positions, ALiBi,
a logit scale, ...), each taken from the family table. `convert` reads them so only for a target that holds these
fields (GGUF: formats/base.py Format.holds_reference); to any other it still refuses the classes (config.py).
Torch-free, like config.py.

    cfg = reference_config_from_hf(json.load(open("config.json")))
    Architecture.from_litgpt_config(cfg)   # what reference/forward.py computes
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qkvconv.errors import UnsupportedFamily
from qkvconv.formats.hf.config import _features, _read, litgpt_config_from_hf, model_config, require_family
from qkvconv.formats.hf.pieces import REFERENCE_ACTIVATIONS
from qkvconv.formats.hf.table import Family, Fused, Read
from qkvconv.model.architecture import Architecture


def unverifiable(family: Family, config_json: Mapping[str, Any]) -> UnsupportedFamily | None:
    """Why verify cannot compute this model (its `unverifiable` features), or None."""
    features = [feature for flags, feature in family.unverifiable if family.matches(config_json, flags)]
    if not features:
        return None
    reason = f"{family.architecture} with {_features(features)} cannot be verified (qkvconv's reference pass does not compute it)"
    return UnsupportedFamily(reason, reason=reason)


def reference_config_from_hf(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """The fields the reference pass computes the model with (Architecture.from_litgpt_config reads them)."""
    family = require_family(config_json)
    if not family.verifiable:
        return litgpt_config_from_hf(config_json)
    refused = unverifiable(family, config_json)
    if refused is not None:
        raise refused
    cfg = model_config(family, config_json, litgpt=False)
    act = _read(config_json, family.config.activation)
    if family.mlp_class_name not in ("LLaMAMLP", "LLaMAMoE"):  # SiLU-gated (Cohere, DBRX): model_config refused
        # other activations
        if act not in REFERENCE_ACTIVATIONS:
            reason = f"{family.architecture} with the activation {act!r} cannot be verified"
            raise UnsupportedFamily(reason, reason=reason)
        activation, approximate = REFERENCE_ACTIVATIONS[act]
        cfg.update(gelu_approximate=approximate, mlp_activation=activation)
    qkv_bias, out_bias, mlp_bias = (bool(_read(config_json, getattr(family.biases, g))) for g in ("qkv", "attn_out", "mlp"))
    scale = family.config.attention_scale
    logit_scale = 1.0
    for factor in (family.logit_scale,) if isinstance(family.logit_scale, Read) else family.logit_scale or ():
        logit_scale *= float(_read(config_json, factor))
    cfg.update(
        bias=out_bias, attn_bias=qkv_bias and not out_bias, mlp_bias=mlp_bias,
        learned_positions=family.position_embedding is not None, embedding_norm=family.embedding_norm is not None,
        alibi=family.alibi, norm_bias=family.norm_bias,
        clip_qkv=(_read(config_json, family.clip_qkv) or None) if family.clip_qkv is not None else None,
        attention_scale=_read(config_json, scale) if scale is not None else None,
        logit_scale=logit_scale,
        embedding_scale=float(_read(config_json, family.embedding_scale)) if family.embedding_scale else 1.0,
    )
    if family.qk_dot_by_d is not None and _read(config_json, family.qk_dot_by_d):
        cfg["attention_scale"] = 1.0 / cfg["head_size"]
    Architecture.from_litgpt_config(cfg)  # refuses what the pass does not implement, naming it
    return cfg


def base_model_prefix(family: Family, names: list[str]) -> str | None:
    """The prefix to put before every tensor name where the files were saved from transformers' base model (no
    name carries the family's `base_model_prefix`, its embedding is there without it); None where they carry it.
    Only for the classes verify reads beyond litgpt: it is how their files on the Hub are named."""
    prefix = family.base_model_prefix
    if not family.verifiable or not prefix:
        return None
    lead = f"{prefix}."
    if any(n.startswith(lead) for n in names) or f"{family.embedding.removeprefix(lead)}.weight" not in names:
        return None
    return lead


def qkv_reading(config_json: Mapping[str, Any]) -> str | None:
    """Where software reads the same fused rows in other orders (GPT-BigCode multi-head): which reading verify
    used, and what a file in another reading does; None where there is one reading."""
    family = require_family(config_json)
    qkv = family.qkv
    if not isinstance(qkv, Fused) or not qkv.also_read_as:
        return None
    others = "; ".join(f"{o.value} by {who}" for o, who in qkv.also_read_as)
    return (f"{family.architecture} {qkv.name} read in {qkv.order.value} order, as transformers reads it (also read "
            f"{others}): a file written in another reading fails verify against a copy known to be right, at its "
            "first layer")
