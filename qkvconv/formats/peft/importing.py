"""PEFT LoRA adapter -> litgpt LoRA run (current `attn.qkv`), exactly (peft_to_litgpt_lora).

The reverse of export.py: q/k/v adapters join (qkvconv.model.lora.join_adapters), a fused QKV adapter
becomes litgpt blocks sharing its A (from_fused_adapter), gate_up_proj's rows split between fc_1 and
fc_2. litgpt has one rank: every adapter is zero-padded to the largest; modules PEFT left alone but
litgpt's flags switch on (lora_mlp covers all MLP linears; layers outside layers_to_transform) get
zero adapters. lora_alpha keeps the scaling most adapters use; an adapter with another scaling
(alpha_pattern, rank_pattern, rslora) has the ratio folded into its lora_B (exact for a power of two,
else rounded once to the adapter's dtype).

The written run is read back and checked against the adapter (probes.py) before it is published;
NaN/inf in the adapter is refused unless allowed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkvconv.formats.hf.families import Fused
from qkvconv.formats.litgpt import (
    CONFIG,
    HYPERPARAMETERS,
    LORA_WEIGHTS,
    LoraHyperparameters,
    check_lora_shapes,
    load_state_dict_file,
)
from qkvconv.formats.hf.config import require_family
from qkvconv.formats.peft.modules import (
    AdapterConversion,
    _litgpt_flags,
    _Module,
    _ModuleTable,
    _number,
    _shape_of,
)
from qkvconv.formats.peft.policy import conv1d_note, fan_in_fan_out_notes
from qkvconv.formats.peft.probes import _check_updates
from qkvconv.formats.peft.reading import _modules_of, _PeftAdapter, _read_peft
from qkvconv.io.config_files import write_yaml
from qkvconv.io.transaction import new_directory
from qkvconv.io.writers import save_torch
from qkvconv.model import names
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.model.lora import PARTS, from_fused_adapter, join_adapters, pad_rank


@dataclass
class _Piece:
    """One litgpt-shaped adapter before padding: rank r, its update scaled by `scaling`."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def _pieces(
    adapter: _PeftAdapter, modules: dict[str, _Module], heads: HeadLayout, table: _ModuleTable
) -> dict[str, Any]:
    """litgpt stem -> _Piece, or for a split QKV stem {part: _Piece}."""
    pieces: dict[str, Any] = {}
    for name, module in modules.items():
        a, b = adapter.pairs[name]
        s = adapter.scaling(name)
        if module.kind == "qkv":
            pieces.setdefault(module.lit_stem(), {})[module.part] = _Piece(a, b, s)
        elif module.kind == "fused-qkv":
            pieces[module.lit_stem()] = _Piece(a, reorder(b, table.qkv_order, QKVOrder.SEQUENTIAL, heads), s)
        else:
            blocks = b.chunk(len(module.lit), dim=0)
            for j, block in enumerate(blocks):
                pieces[module.lit_stem(j)] = _Piece(a, block, s)
    return pieces


def _all_pieces(pieces: dict[str, Any]) -> list[_Piece]:
    return [p for v in pieces.values() for p in (v.values() if isinstance(v, dict) else [v])]


def peft_to_litgpt_lora(
    peft_dir: Path, out: Path, *, hf_config: dict, checkpoint_dir: str | None = None, allow_nonfinite: bool = False,
    reference: bool = False,
) -> AdapterConversion:
    """Import a PEFT LoRA adapter as a litgpt LoRA run (current `attn.qkv`) at `out`; NaN/inf in the
    adapter is refused unless `allow_nonfinite`. `reference`: the run is for verify's reference pass only
    (formats/peft/format.py), so the base may be a transformers class litgpt cannot express but the pass
    computes (GPT-2, Bloom, ...: Family.verifiable); its model_config.yaml then holds the pass's fields."""
    adapter = _read_peft(peft_dir, allow_nonfinite=allow_nonfinite)
    family = require_family(hf_config)
    lit_cfg, shape = _shape_of(hf_config, reference=reference)
    heads = shape.heads
    table = _ModuleTable(family, shape.n_layer)
    modules = _modules_of(adapter, table, lit_cfg, heads)
    pieces = _pieces(adapter, modules, heads, table)
    fused = isinstance(family.qkv, Fused)

    flags = _litgpt_flags(list(modules.values()))
    enable = (flags["lora_query"], flags["lora_key"], flags["lora_value"])

    # one rank and one alpha for the whole model: keep the scaling most adapters use (ties: the one
    # that gives an integer lora_alpha), fold the others into lora_B
    every = _all_pieces(pieces)
    rank = max(p.a.shape[0] for p in every)
    counts = Counter(p.scaling for p in every)
    ref = max(counts, key=lambda sc: (counts[sc], float(sc * rank).is_integer()))
    alpha = _number(ref * rank)
    lit_scaling = alpha / rank  # what litgpt computes
    folded = 0
    for p in every:
        factor = p.scaling / lit_scaling
        if factor != 1.0:
            p.b = (p.b.double() * factor).to(p.b.dtype)
            folded += 1
        p.a, p.b = pad_rank(p.a, p.b, rank)
    dtype = Counter(p.a.dtype for p in every).most_common(1)[0][0]

    zero_filled = 0

    def zeros(out_rows: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal zero_filled
        zero_filled += 1
        return torch.zeros(rank, in_features, dtype=dtype), torch.zeros(out_rows, rank, dtype=dtype)

    n_embd = shape.n_embd
    tensors: dict[str, torch.Tensor] = {}

    def put(stem: str, a: torch.Tensor, b: torch.Tensor) -> None:
        # own storage: a view (a row block of gate_up_proj's B) would save its whole base tensor
        tensors[f"{stem}.lora_A"] = a.clone(memory_format=torch.contiguous_format)
        tensors[f"{stem}.lora_B"] = b.clone(memory_format=torch.contiguous_format)

    def linear(stem: str, out_rows: int, in_features: int) -> None:
        p = pieces.get(stem)
        put(stem, *((p.a, p.b) if p is not None else zeros(out_rows, in_features)))

    if flags["lora_head"]:
        linear("lm_head", int(lit_cfg["padded_vocab_size"]), n_embd)
    inter = int(lit_cfg["intermediate_size"])
    for i in range(shape.n_layer):
        stem = names.layer(i, names.QKV)
        if any(enable):
            got = pieces.get(stem)
            if fused:
                a, b = (got.a, got.b) if got is not None else zeros(heads.rows, n_embd)
                a3, b_seq, _ = from_fused_adapter(a, b, heads, QKVOrder.SEQUENTIAL)
                put(stem, a3, b_seq)
            else:
                sizes = dict(zip(PARTS, (heads.q_rows, heads.kv_rows, heads.kv_rows)))
                parts = {p: ((got[p].a, got[p].b) if got and p in got else zeros(sizes[p], n_embd))
                         for p, on in zip(PARTS, enable) if on}
                a, b, _ = join_adapters(parts, heads)
                put(stem, a, b)
        if flags["lora_projection"]:
            linear(names.layer(i, names.ATTN_PROJ), n_embd, heads.q_rows)
        if flags["lora_mlp"]:
            for lit in table.mlp_lit:
                out_rows, in_features = (n_embd, inter) if lit == names.MLP_PROJ else (inter, n_embd)
                linear(names.layer(i, lit), out_rows, in_features)

    raw = {
        "lora_r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(adapter.config.get("lora_dropout", 0.0) or 0.0),
        **flags,
    }
    if checkpoint_dir is not None:
        raw["checkpoint_dir"] = str(checkpoint_dir)
    hyper = LoraHyperparameters.from_yaml(raw, Path(HYPERPARAMETERS))
    rounding = [f"{folded} of {len(every)} adapters had another scaling than litgpt's lora_alpha/lora_r = "
                f"{lit_scaling:g}: the difference is folded into their lora_B (rounded once to its dtype "
                "unless a power of two)"] if folded else []
    storage = [n for n in (conv1d_note(modules.values()), *fan_in_fan_out_notes(adapter.config, modules.values())) if n]
    notes = _import_notes(adapter, modules, raw, rounding, zero_filled, lit_scaling, table) + storage

    with new_directory(out) as tmp:
        save_torch({"model": tensors}, tmp / LORA_WEIGHTS)
        write_yaml(raw, tmp / HYPERPARAMETERS)
        write_yaml(lit_cfg, tmp / CONFIG)
        written = load_state_dict_file(tmp / LORA_WEIGHTS)  # what is on disk
        check_lora_shapes(written, shape, hyper)
        notes.append(_check_updates(adapter, written.tensors, hyper, heads, table, rounded=bool(folded),
                                    what="litgpt LoRA run"))
    return AdapterConversion(out, notes, rounding, storage)


def _import_notes(
    adapter: _PeftAdapter, modules: dict[str, _Module], raw: dict[str, Any], rounding: list[str],
    zero_filled: int, lit_scaling: float, table: _ModuleTable,
) -> list[str]:
    c = adapter.config
    flags = [k.removeprefix("lora_") for k, v in raw.items() if v is True]
    keys = sorted({table.peft_key(m) for m in modules.values()})
    notes = [
        f"PEFT LoRA on {', '.join(keys)} (r {c.get('r')}, lora_alpha {c.get('lora_alpha')}"
        + (", use_rslora" if c.get("use_rslora") else "")
        + (f", rank_pattern {c['rank_pattern']}" if c.get("rank_pattern") else "")
        + (f", alpha_pattern {c['alpha_pattern']}" if c.get("alpha_pattern") else "")
        + f") -> litgpt lora_r {raw['lora_r']}, lora_alpha {raw['lora_alpha']}, enabled: {', '.join(flags)}"
    ]
    qkv = table.family.qkv
    if isinstance(qkv, Fused) and any(m.kind == "fused-qkv" for m in modules.values()):
        rows = ("rows already sequential" if qkv.order is QKVOrder.SEQUENTIAL
                else f"rows from {qkv.order.value} to sequential order")
        notes.append(f"{qkv.name} adapter -> litgpt q,k,v blocks sharing its A (exact; {rows})")
    ranks = sorted({a.shape[0] for a, _ in adapter.pairs.values()})
    if ranks != [raw["lora_r"]]:
        notes.append(f"ranks {ranks} zero-padded to litgpt's single lora_r {raw['lora_r']} (exact)")
    notes += rounding
    if not isinstance(raw["lora_alpha"], int):
        notes.append(f"lora_alpha {raw['lora_alpha']} is not an integer "
                     f"(scaling {lit_scaling:g} at lora_r {raw['lora_r']})")
    if zero_filled:
        notes.append(f"{zero_filled} litgpt LoRA layers that PEFT did not adapt but litgpt's flags cover get zero "
                     "adapters (exact)")
    if adapter.base_copies:
        notes.append(f"not imported: peft's copy of the base weights of {', '.join(sorted(adapter.base_copies))} "
                     "(save_embedding_layers; the shapes match the base)")
    return notes
