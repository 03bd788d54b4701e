"""The check before anything is published: the written files, read back, give every adapted module
the source's update, layer by layer.

The full update of a module (out, in) in float64 is far larger than its adapter (lm_head alone: vocab x
n_embd x 8 bytes), so each side computes update @ X for fixed random X (in, PROBES), as B @ (A @ X) in
float64, one layer at a time: memory stays that of the adapters, and any difference in rows, blocks or
scaling shows in the probes. The two must be equal to float64 rounding, plus one rounding of a lora_B
into which a scaling was folded, with an allowed NaN/inf in the same places (nonfinite.within); a
module only one side adapts must be exactly zero on the other. Legacy `attn.attn` adapters are probed
under their legacy semantics (qkv_delta), so an export is checked against what litgpt 0.5.4 computed.
"""

from __future__ import annotations

import re

import torch

from qkvconv.errors import CheckFailed
from qkvconv.formats.litgpt import QKV_KEY, LoraHyperparameters
from qkvconv.formats.peft.modules import _ModuleTable
from qkvconv.formats.peft.reading import _PeftAdapter
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder, split
from qkvconv.model.lora import PARTS, qkv_delta
from qkvconv.model.nonfinite import max_difference, within

PROBES = 16


def _probe(in_features: int) -> torch.Tensor:
    return torch.randn(in_features, PROBES, generator=torch.Generator().manual_seed(in_features), dtype=torch.float64)


def _layer_of(stem: str) -> int | None:
    m = re.match(r"^transformer\.h\.(\d+)\.", stem)
    return int(m.group(1)) if m else None


def _peft_probed(adapter: _PeftAdapter, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (update @ X, |B| @ |A| @ |X| * |scaling|: the scale of each entry's rounding)."""
    out = {}
    for name in names:
        a, b = adapter.pairs[name]
        s = adapter.scaling(name)
        x = _probe(a.shape[1])
        a64, b64 = a.double(), b.double()
        out[name] = ((b64 @ (a64 @ x)) * s, (b64.abs() @ (a64.abs() @ x.abs())) * abs(s))
    return out


def _litgpt_probed(
    tensors: dict[str, torch.Tensor], stems: list[str], hyper: LoraHyperparameters, heads: HeadLayout,
    table: _ModuleTable,
) -> dict[str, torch.Tensor]:
    """HF module -> update @ X of the litgpt adapters at `stems` (legacy semantics where named attn.attn)."""
    s = hyper.settings
    blocks: dict[str, dict[int, torch.Tensor]] = {}
    for stem in stems:
        a, b = tensors[f"{stem}.lora_A"], tensors[f"{stem}.lora_B"]
        ax = a.double() @ _probe(a.shape[1])  # qkv_delta of (A @ X) in place of A is (update @ X)
        if m := QKV_KEY.match(f"{stem}.lora_A"):
            legacy = m.group(2) == "attn"
            y = qkv_delta(ax, b, s, heads, legacy=legacy)
            if legacy:
                y = reorder(y, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
            for module in table.by_lit.get(f"transformer.h.{m.group(1)}.attn.qkv", []):
                if module.kind == "qkv":
                    blocks[module.hf] = {0: split(y, QKVOrder.SEQUENTIAL, heads)[PARTS.index(module.part)]}
                else:
                    blocks[module.hf] = {0: reorder(y, QKVOrder.SEQUENTIAL, table.qkv_order, heads)}
            continue
        for module in table.by_lit.get(stem, []):
            j = [module.lit_stem(k) for k in range(len(module.lit))].index(stem)
            blocks.setdefault(module.hf, {})[j] = (b.double() @ ax) * s.scaling
    out = {}
    for hf, parts in blocks.items():
        like = next(iter(parts.values()))
        out[hf] = torch.cat([parts.get(j, torch.zeros_like(like)) for j in range(len(table.by_hf[hf].lit))])
    return out


def _check_updates(
    peft: _PeftAdapter, litgpt: dict[str, torch.Tensor], hyper: LoraHyperparameters, heads: HeadLayout,
    table: _ModuleTable, *, rounded: bool, what: str,
) -> str:
    """Layer by layer, every HF module's update under the PEFT adapter equals the litgpt run's, to float64
    rounding (`rounded`: plus one rounding of lora_B to its dtype, where a scaling was folded into it);
    a module only one side adapts must be exactly zero on the other."""
    stems: dict[int | None, list[str]] = {}
    for name in litgpt:
        if name.endswith(".lora_A"):
            stem = name[: -len(".lora_A")]
            stems.setdefault(_layer_of(stem), []).append(stem)
    names: dict[int | None, list[str]] = {}
    for name in peft.pairs:
        names.setdefault(table.by_hf[name].layer, []).append(name)
    lit_eps = torch.finfo(_coarsest_dtype(litgpt)).eps
    worst = 0.0
    for layer in sorted(set(stems) | set(names), key=lambda i: -1 if i is None else i):
        p = _peft_probed(peft, names.get(layer, []))
        lit = _litgpt_probed(litgpt, stems.get(layer, []), hyper, heads, table)
        for name in sorted(set(p) | set(lit)):
            if name in p:
                value, scale = p[name]
                eps = torch.finfo(peft.pairs[name][1].dtype).eps if rounded else 0.0
                limit = scale * (max(eps, lit_eps if rounded else 0.0) + 1e-12)
            else:
                value = limit = torch.zeros_like(lit[name])
            other = lit.get(name, torch.zeros_like(value))
            if not within(other, value, limit):  # an allowed NaN/inf must show in the same probes
                raise CheckFailed(
                    f"{what}: the update of {name} differs from the source adapter's; nothing was written"
                )
            worst = max(worst, max_difference(other, value))
    return (f"{what}: every adapted module's update equals the source's on {PROBES} random probes "
            f"(float64; max abs difference {worst:.2g})")


def _coarsest_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The coarsest floating dtype among the adapter tensors (for the rounding allowance)."""
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return max(floats, key=lambda d: torch.finfo(d).eps) if floats else torch.float64
