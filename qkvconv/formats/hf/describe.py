"""What `inspect` says about an HF config.json's attention layout: where q/k/v live, in which row order, with
the evidence (the tensor, its storage, which config key or class decided, how positions enter, and other
readings of the same rows where there are any). Torch-free, like config.py.

    describe_layout(cfg)   # None: an architecture outside the family table
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qkvconv.formats.hf.config import _heads, _lookup, _read, detect_family
from qkvconv.formats.hf.families import FAMILIES
from qkvconv.formats.hf.table import Choose, Family, Fused, Read, Split
from qkvconv.model.layout import HeadLayout, QKVOrder


def _qkv_evidence(family: Family, heads: HeadLayout) -> str:
    qkv = family.qkv
    where = f"{family.layer_prefix.format(i='{i}')}."
    if isinstance(qkv, Split):
        return f"{family.architecture}: separate {where}{{{qkv.q},{qkv.k},{qkv.v}}} (rows sequential when concatenated)"
    assert isinstance(qkv, Fused)
    stored = ", stored transposed as [in, out] (Conv1D): its columns are these rows" if qkv.transposed else ""
    return (
        f"{family.architecture}: fused {where}{qkv.name} with rows in {qkv.order.value} order "
        f"(H={heads.n_head}, G={heads.n_query_groups}, hs={heads.head_size}){stored}"
    )


def _key_of(config_json: Mapping[str, Any], rule: Read) -> str:
    """Where a Read's value came from: the first of its keys config.json holds, or the class default."""
    key = next((k for k in rule.keys if _lookup(config_json, k) is not None), None)
    return f"config.json {key}" if key is not None else f"the default, config.json having no {rule.keys[0]}"


def _flags_text(family: Family, config_json: Mapping[str, Any], flags: Mapping[str, Any]) -> str:
    return " and ".join(f"{k}={family.flag(config_json, k)!r}" + ("" if k in config_json else " (transformers' default)")
                        for k in flags)


def _decided_by(config_json: Mapping[str, Any], family: Family) -> str:
    """Which config.json key (or the architecture alone) picked the QKV layout, and where the K/V head count
    comes from: the table entry before `resolve`, so the case a Choose took is known."""
    entry = FAMILIES[family.architecture]
    named = "architectures" if family.architecture in (config_json.get("architectures") or []) else "model_type"
    why = f"the architecture (config.json {named})"
    if isinstance(entry.qkv, Choose):
        for flags, _ in entry.qkv.cases:
            if entry.matches(config_json, flags):
                keys = flags or dict.fromkeys(k for f, _ in entry.qkv.cases for k in f)  # the default case: the others'
                why += f" and {_flags_text(entry, config_json, keys)}"
                break
    kv = family.qkv.kv_heads  # type: ignore[union-attr]
    heads = (_key_of(config_json, kv) if isinstance(kv, Read) else "fixed at 1 by the layout" if kv == 1 else "as many as query heads (MHA)")
    return f"decided by {why}; key/value heads: {heads}"


def _positions(config_json: Mapping[str, Any], family: Family, heads: HeadLayout) -> str:
    """How positions enter the model; for rotary, the order inside a head and the share of its dims that rotate."""
    what = family.positions
    assert isinstance(what, str)
    if not what.startswith("rotary"):
        return f"positions: {what}"
    c = family.config
    dims = _read(config_json, c.rotary_dims) if c.rotary_dims is not None else None
    rule = c.rotary_dims if dims is not None else c.rotary_fraction
    if dims is None:
        dims = int(heads.head_size * float(_read(config_json, c.rotary_fraction)))
    source = f" ({_key_of(config_json, rule)})" if isinstance(rule, Read) else ""
    return f"positions: {what}, on the first {dims} of {heads.head_size} dims of each Q/K head{source}"


def describe_layout(config_json: Mapping[str, Any]) -> dict[str, Any] | None:
    """For inspect: family, QKV placement and head counts of an HF config.json, with the evidence: the tensor
    and its order, then (`details`) which key decided, how positions enter, and any other reading of the same
    rows (then the order is "ambiguous": nothing in the checkpoint tells, a forward pass against a trusted
    reference does). None when the architecture is unknown."""
    family = detect_family(config_json)
    if family is None:
        return None
    n_embd, heads = _heads(family, config_json)
    qkv = family.qkv
    details = [_decided_by(config_json, family), _positions(config_json, family, heads)]
    order = QKVOrder.SPLIT.value if isinstance(qkv, Split) else qkv.order.value  # type: ignore[union-attr]
    if isinstance(qkv, Fused) and qkv.also_read_as:
        readings = "; ".join(f"{o.value} by {who}" for o, who in qkv.also_read_as)
        details.append(f"ambiguous: {order} is how transformers reads these rows, and {readings}; nothing in the "
                       "checkpoint says which wrote it; only a forward pass against a copy known to be right settles it "
                       f"(qkvconv verify reads {family.architecture} in {order} order, as transformers does)")
        order = "ambiguous"
    return {
        "architecture": family.architecture,
        "family": family.name,
        "qkv": "split" if isinstance(qkv, Split) else f"fused {qkv.name}",  # type: ignore[union-attr]
        "qkv_order": order,
        "n_head": heads.n_head,
        "n_query_groups": heads.n_query_groups,
        "head_size": heads.head_size,
        "attention": heads.attention,
        "n_embd": n_embd,
        "n_layer": _read(config_json, family.config.n_layer),
        "evidence": _qkv_evidence(family, heads),
        "details": details,
    }
