"""litgpt LoRA run -> PEFT LoRA adapter, exactly (litgpt_lora_to_peft).

Each litgpt adapter becomes the adapters of the HF modules the family table puts its rows in. The fused
QKV adapter is first written as one plain adapter on the sequential rows, every row in the columns of
the A block it multiplies; for a legacy adapter, the block it used in litgpt 0.5.4
(qkvconv.model.lora.plan_reorder): the update `qkvconv upgrade` gives, without the repeated A blocks of
its rank-expanded adapter. Then
- split families (Llama, Mistral, Qwen2, Gemma): q_proj / k_proj / v_proj take their rows and the A
  blocks those rows use: rank r (up to 3r for a legacy all-q,k,v adapter, whose rows mix blocks);
- fused families (GPT-NeoX, Falcon, Phi-3): one adapter on the fused module at rank r * n_enabled,
  rows re-ordered into the family's QKV order;
- Phi-3's gate_up_proj (fc_1 rows, then fc_2 rows): a rank-2r block adapter; the rest one to one.
alpha grows with the rank, so alpha/r (the scaling) stays litgpt's. Per PEFT key, over all layers,
rank components whose A row is zero everywhere are dropped and components with bitwise-equal A rows
and never-overlapping B columns merged (zero padding, A repeated for q, k, v: what an imported
adapter carries), and keys that are zero adapters everywhere left out; no value is rounded. The most
common (rank, alpha) becomes r / lora_alpha, the others rank_pattern / alpha_pattern entries.

The written adapter is read back as an import would read it and checked against the run (probes.py)
before it is published; NaN/inf in the run's adapter is refused unless allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf import litgpt_state_names, plan_litgpt_to_hf
from qkvconv.formats.litgpt import (
    HYPERPARAMETERS,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    QKV_KEY,
    LoraHyperparameters,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    open_litgpt,
    qkv_naming,
)
from qkvconv.formats.hf.config import require_family
from qkvconv.formats.peft.modules import (
    PEFT_CONFIG,
    PEFT_PREFIX,
    AdapterConversion,
    _Module,
    _ModuleTable,
    _number,
)
from qkvconv.formats.peft.probes import _check_updates
from qkvconv.formats.peft.reading import _modules_of, _read_peft
from qkvconv.io.readers import TensorMeta
from qkvconv.io.transaction import new_directory
from qkvconv.io.writers import SafetensorsWriter
from qkvconv.model import names
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.model.lora import PARTS, block_of_rows, plan_reorder, target_rows
from qkvconv.model.nonfinite import check_all_finite, same_bits


@dataclass
class _Exported:
    module: _Module
    a: torch.Tensor
    b: torch.Tensor
    alpha: float


def write_adapter(directory: Path, modules: Any, config: dict[str, Any]) -> None:
    """adapter_model.safetensors (each module's lora_A and lora_B under PEFT's names) and adapter_config.json
    into `directory`: what PeftModel.from_pretrained reads. `modules`: items with .module.hf, .a and .b."""
    tensors = {f"{PEFT_PREFIX}{m.module.hf}.{ab}.weight": t.contiguous()
               for m in modules for ab, t in (("lora_A", m.a), ("lora_B", m.b))}
    layout = {name: TensorMeta.of(t) for name, t in tensors.items()}
    with SafetensorsWriter(directory, layout, prefix="adapter_model") as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

def _qkv_plain(
    a: torch.Tensor, b: torch.Tensor, enable: tuple[bool, bool, bool], heads: HeadLayout, legacy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A litgpt fused-QKV adapter (A, B) as one plain adapter (A, B_plain) on the sequential rows:
    B_plain (rows, r * n_enabled) holds each row's values in the columns of the A block it multiplies.
    Returns B_plain and, per row, that block (-1: no update). A legacy adapter keeps the block each row
    used in litgpt 0.5.4 (plan_reorder): the update of `upgrade`'s rank-expanded adapter
    (apply_reorder), without its repeated A blocks."""
    n = sum(enable)
    r = a.shape[0] // n
    rows = target_rows(enable, heads, legacy=False)  # sequential rows of the enabled q, k, v
    if legacy:
        plan = plan_reorder(enable, heads)
        source, blocks = plan.source, plan.old_block
    else:
        source, blocks = torch.arange(rows.numel()), block_of_rows(enable, heads)
    plain = b.new_zeros(heads.rows, n * r)
    plain[rows.unsqueeze(1), blocks.unsqueeze(1) * r + torch.arange(r)] = b.index_select(0, source)
    owner = torch.full((heads.rows,), -1, dtype=torch.long)
    owner[rows] = blocks
    return plain, owner


def _export_qkv(
    layer: int, a: torch.Tensor, b: torch.Tensor, hyper: LoraHyperparameters, heads: HeadLayout,
    legacy: bool, table: _ModuleTable,
) -> list[_Exported]:
    s = hyper.settings
    plain, owner = _qkv_plain(a, b, s.enable, heads, legacy)
    r = s.r
    modules = table.by_lit[names.layer(layer, names.QKV)]
    if modules[0].kind == "fused-qkv":
        b_fused = reorder(plain, QKVOrder.SEQUENTIAL, table.qkv_order, heads)
        return [_Exported(modules[0], a, b_fused, s.alpha * s.n_enabled)]
    out = []
    part_rows = dict(zip(PARTS, (slice(0, heads.q_rows), slice(heads.q_rows, heads.q_rows + heads.kv_rows),
                                 slice(heads.q_rows + heads.kv_rows, heads.rows))))
    for module in modules:
        rows = part_rows[str(module.part)]
        used = sorted(set(owner[rows].tolist()) - {-1})
        if not used:
            continue
        cols = torch.cat([torch.arange(u * r, (u + 1) * r) for u in used])
        out.append(_Exported(module, a.index_select(0, cols), plain[rows].index_select(1, cols), s.alpha * len(used)))
    return out


def _export_modules(
    tensors: dict[str, torch.Tensor], hyper: LoraHyperparameters, heads: HeadLayout, table: _ModuleTable, where: Path
) -> list[_Exported]:
    s = hyper.settings
    exported: list[_Exported] = []
    rows: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # fused-rows module -> its litgpt blocks
    for name, a in tensors.items():
        if not name.endswith(".lora_A"):
            continue
        stem = name[: -len(".lora_A")]
        b = tensors.get(f"{stem}.lora_B")
        if b is None:
            raise QkvconvError(f"{where}: {name} has no lora_B")
        if m := QKV_KEY.match(name):
            exported += _export_qkv(int(m.group(1)), a, b, hyper, heads, m.group(2) == "attn", table)
            continue
        modules = table.by_lit.get(stem)
        if not modules and table.family.moe is not None and re.match(r"^transformer\.h\.\d+\.mlp\.", stem):
            raise UnsupportedFamily(
                f"{where}: litgpt's adapters on the router and experts (lora_mlp) have no PEFT counterpart in "
                f"{table.family.architecture}: transformers holds them as plain parameters, not the nn.Linear "
                "modules PEFT adapts; merge the run into its base instead (qkvconv convert RUN --merge --to litgpt)"
            )
        if not modules:
            raise UnsupportedFamily(
                f"{where}: the litgpt adapter on {stem} has no counterpart in {table.family.architecture}"
            )
        module = modules[0]
        if module.kind == "rows":
            j = [module.lit_stem(k) for k in range(len(module.lit))].index(stem)
            rows.setdefault(module.hf, {})[j] = (a, b)
        else:
            exported.append(_Exported(module, a, b, s.alpha))
    for hf, blocks in rows.items():
        # one adapter on the stacked rows: A = [A_0; A_1; ...], B block-diagonal (row block j uses A_j)
        module = table.by_hf[hf]
        out_rows = next(iter(blocks.values()))[1].shape[0]
        present = sorted(blocks)
        a = torch.cat([blocks[j][0] for j in present])
        b = a.new_zeros(out_rows * len(module.lit), a.shape[0], dtype=next(iter(blocks.values()))[1].dtype)
        for c, j in enumerate(present):
            b[j * out_rows:(j + 1) * out_rows, c * s.r:(c + 1) * s.r] = blocks[j][1]
        exported.append(_Exported(module, a, b, s.alpha * len(present)))
    return exported


def _compact(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same updates at the smallest rank found without arithmetic, for adapters that must share one
    rank (one PEFT key, all layers): rank components whose A row is zero in every layer go (zero padding);
    components whose A rows are bitwise equal in every layer and whose B columns are never both nonzero in
    a row merge (A blocks repeated for q, k, v), B columns summed: x + 0, no rounding. Keeps rank >= 1."""
    r = pairs[0][0].shape[0]
    keep = [i for i in range(r) if any(bool(a[i].any()) for a, _ in pairs)] or [0]
    groups: list[list[int]] = []
    by_signature: dict[str, list[list[int]]] = {}
    for i in keep:
        h = hashlib.sha1()
        for a, _ in pairs:
            h.update(a[i].contiguous().view(torch.uint8).numpy().tobytes())
        for g in by_signature.setdefault(h.hexdigest(), []):
            if all(same_bits(a[i], a[g[0]]) and not bool(((b[:, [i]] != 0) & (b[:, g] != 0)).any())
                   for a, b in pairs):
                g.append(i)
                break
        else:
            groups.append([i])
            by_signature[h.hexdigest()].append(groups[-1])
    if len(groups) == r:
        return pairs
    return [(torch.stack([a[g[0]] for g in groups]), torch.stack([b[:, g].sum(dim=1) for g in groups], dim=1))
            for a, b in pairs]


def _compact_per_key(exported: list[_Exported], table: _ModuleTable) -> tuple[list[_Exported], list[str]]:
    """_compact every PEFT key across its layers (alpha follows the rank: alpha/r unchanged); a key whose
    A is zero everywhere (zero adapters litgpt's flags forced) is left out unless nothing else is left."""
    by_key: dict[str, list[_Exported]] = {}
    for e in exported:
        by_key.setdefault(table.peft_key(e.module), []).append(e)
    zero = [k for k, es in by_key.items() if not any(bool(e.a.any()) for e in es)]
    if len(zero) == len(by_key):
        zero = []
    out, notes = [], []
    for key, es in by_key.items():
        if key in zero:
            continue
        old = es[0].a.shape[0]
        for e, (a, b) in zip(es, _compact([(e.a, e.b) for e in es])):
            out.append(_Exported(e.module, a, b, e.alpha * a.shape[0] / old))
        if out[-1].a.shape[0] != old:
            notes.append(f"{key}: rank {old} -> {out[-1].a.shape[0]} (zero-padded or repeated rank components; exact)")
    if zero:
        notes.append(f"left out {', '.join(zero)}: zero adapters in every layer (update exactly zero)")
    return out, notes


def _adapter_config(
    exported: list[_Exported], table: _ModuleTable, hyper: LoraHyperparameters, base: str | None
) -> dict[str, Any]:
    """adapter_config.json: the most common (rank, alpha) as r / lora_alpha, the others as patterns.

    Only fields peft has had since 0.7 are written (peft fills in the rest with its defaults), so
    older peft versions load it too."""
    per_key: dict[str, tuple[int, float]] = {}
    for e in exported:
        key = table.peft_key(e.module)
        pair = (e.a.shape[0], e.alpha)
        assert per_key.setdefault(key, pair) == pair, f"{key}: rank or alpha differs between layers"
    counts = Counter(per_key[table.peft_key(e.module)] for e in exported)
    r, alpha = counts.most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": float(hyper.raw.get("lora_dropout", 0.0) or 0.0),
        "target_modules": sorted(per_key),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {k: rk for k, (rk, _) in sorted(per_key.items()) if rk != r},
        "alpha_pattern": {k: _number(al) for k, (_, al) in sorted(per_key.items()) if al != alpha},
    }


def _check_same_model(lit_cfg: dict[str, Any], hf_config: dict[str, Any]) -> None:
    """hf_config must compute the litgpt model (plan_litgpt_to_hf compares them field by field)."""
    plan_litgpt_to_hf(lit_cfg, litgpt_state_names(lit_cfg), hf_config)


def litgpt_lora_to_peft(
    lora_dir: Path, out: Path, *, hf_config: dict, base_model_name_or_path: str | None = None,
    allow_nonfinite: bool = False,
) -> AdapterConversion:
    """Export a litgpt LoRA run (current `attn.qkv` or legacy `attn.attn`) as a PEFT LoRA adapter at `out`;
    NaN/inf in the run's adapter is refused unless `allow_nonfinite`."""
    ckpt = open_litgpt(lora_dir)
    if ckpt.lora_weights is None or ckpt.hyperparameters is None:
        raise QkvconvError(f"{lora_dir} is not a litgpt LoRA run (no {LORA_WEIGHTS} with {HYPERPARAMETERS})")
    hyper = ckpt.hyperparameters
    family = require_family(hf_config)
    lit_cfg, _ = migrate_config(ckpt.config)
    _check_same_model(lit_cfg, hf_config)
    heads = ckpt.shape.heads
    table = _ModuleTable(family, ckpt.shape.n_layer)
    sd = load_state_dict_file(ckpt.lora_weights)
    check_lora_shapes(sd, ckpt.shape, hyper)
    if not allow_nonfinite:
        check_all_finite(sd.tensors)
    legacy = qkv_naming(sd.tensors, sd.path) == LEGACY_NAMING
    exported = _export_modules(sd.tensors, hyper, heads, table, sd.path)
    if not exported:
        raise QkvconvError(f"{ckpt.lora_weights} holds no LoRA matrices")
    exported, compacted = _compact_per_key(exported, table)
    config = _adapter_config(exported, table, hyper, base_model_name_or_path)
    notes = _export_notes(exported, config, hyper, legacy, table) + compacted

    with new_directory(out) as tmp:
        write_adapter(tmp, exported, config)
        written = _read_peft(tmp, allow_nonfinite=allow_nonfinite)  # what is on disk, read as an import would
        _modules_of(written, table, lit_cfg, heads)
        notes.append(_check_updates(written, sd.tensors, hyper, heads, table, rounded=False, what="PEFT adapter"))
    return AdapterConversion(out, notes)


def _flags(enable: tuple[bool, bool, bool]) -> str:
    return ",".join(p for p, on in zip(PARTS, enable) if on)


def _export_notes(
    exported: list[_Exported], config: dict[str, Any], hyper: LoraHyperparameters, legacy: bool, table: _ModuleTable,
) -> list[str]:
    s = hyper.settings
    ranks: dict[str, int] = {}
    qkv_keys: set[str] = set()
    for e in exported:
        key = table.peft_key(e.module)
        ranks.setdefault(key, e.a.shape[0])
        if e.module.kind in ("qkv", "fused-qkv"):
            qkv_keys.add(key)
    listed = lambda keys: ", ".join(f"{k} rank {ranks[k]}" for k in sorted(keys))  # noqa: E731
    notes = []
    if qkv_keys:
        how = "current sequential semantics"
        if legacy:
            how = "legacy all-q,k,v semantics: rows mix A blocks" if all(s.enable) else "legacy grouped semantics"
        grown = any(ranks[k] != s.r for k in qkv_keys)
        alpha = f"; alpha grows with the rank, so alpha/r stays {s.alpha}/{s.r}" if grown else ""
        notes.append(f"{_flags(s.enable)} adapter (lora_r {s.r}) exported as {listed(qkv_keys)} (exact; {how}{alpha})")
    if set(ranks) - qkv_keys:
        notes.append(f"{listed(set(ranks) - qkv_keys)} (exact copies of litgpt's matrices)")
    notes.append(
        f"adapter_config.json: r {config['r']}, lora_alpha {config['lora_alpha']}, "
        f"target_modules {config['target_modules']}"
        + (f", rank_pattern {config['rank_pattern']}" if config["rank_pattern"] else "")
        + (f", alpha_pattern {config['alpha_pattern']}" if config["alpha_pattern"] else "")
    )
    return notes
