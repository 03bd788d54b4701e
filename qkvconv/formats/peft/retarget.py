"""PEFT adapter -> PEFT adapter for another base that computes the same model (retarget_peft): a LoRA trained on
a remote-code original's transformers twin (a "llamafied" InternLM2, GlmForCausalLM, ...) put back onto the
original's own modules (InternLM2 `wqkv`, Phi-2's `mixer.Wqkv`, Qwen-1 `c_attn`, Baichuan `W_pack`, ChatGLM
`query_key_value`, the original OLMo's `att_proj` / `ff_proj`), or the other way.

Both bases' family tables say where each HF module's output rows live in litgpt's modules (the pivot:
`_ModuleTable.row_segments`), so every row of a source adapter's lora_B has one place in the target's modules,
found by index arithmetic alone; no value is computed. Each target module collects the source adapters whose
rows it holds:
- source adapters with the same lora_A (bitwise) and the same scaling share it: rank r, their lora_B rows put
  where the target module holds them (q/k/v adapters of one A fuse at rank r, rows in the fused module's order);
- otherwise one A block each: lora_A stacked, lora_B block-diagonal, rank the sum of theirs;
- rows no source adapter covers (only q_proj adapted, say) get zero rows of lora_B.
One module has one scaling (peft: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), so a target module
whose parts scale differently takes the first part's and multiplies the others' lora_B by the ratio where that
is a power of two (exact), and is refused otherwise. Each module's lora_alpha is chosen so that peft computes
the scaling bit for bit (refused where no float does); the most common (r, alpha) becomes r / lora_alpha, the
others rank_pattern / alpha_pattern entries (per module name where the layers of one name differ).

Refused (exit 2, the reason named): bases that compute different models (the differing field named), a source
row with no counterpart, an adapter on a head the original normalises at run time (Baichuan 2's NormHead: the
twin's head holds the normalised rows, so no update of the stored rows equals it). The written adapter is read
back and every litgpt module's update compared with the source's on random probes before it is published.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.formats.hf.config import _read, require_family
from qkvconv.formats.hf.rules import require_same_model
from qkvconv.formats.peft.modules import (
    AdapterConversion,
    _Module,
    _ModuleTable,
    _number,
    _shape_of,
    lit_out_in,
)
from qkvconv.formats.peft.export import write_adapter
from qkvconv.formats.peft.probes import PROBES, _probe
from qkvconv.formats.peft.reading import _modules_of, _PeftAdapter, _read_peft
from qkvconv.io.transaction import new_directory
from qkvconv.model.layout import HeadLayout
from qkvconv.model.nonfinite import max_difference, same_bits, within


@dataclass
class _Part:
    """The rows one source adapter gives a target module: target rows `rows` take its lora_B rows `src_rows`."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    rows: list[torch.Tensor] = field(default_factory=list)
    src_rows: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Built:
    module: _Module
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    alpha: float
    how: str  # "copied" (one source adapter) | "shared" (several, one lora_A) | "block" (several lora_A)
    folded: list[str] = field(default_factory=list)  # source adapters whose scaling ratio went into lora_B


def _alpha_for(scaling: float, r: int, rslora: bool) -> float | None:
    """A lora_alpha for which peft's lora_alpha / r (lora_alpha / math.sqrt(r) with use_rslora) is `scaling`
    exactly: an integer where one is, else the float nearest scaling * r that gives it; None where none does."""
    div = math.sqrt(r) if rslora else r
    guess = scaling * div
    candidates = [float(round(guess)), guess]
    up = down = guess
    for _ in range(8):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return next((c for c in candidates if c / div == scaling), None)


def _power_of_two(ratio: float) -> bool:
    return ratio > 0 and math.frexp(ratio)[0] == 0.5


class _Rows:
    """Which source adapters' rows each target module holds, through litgpt's modules."""

    def __init__(self, source: _ModuleTable, target: _ModuleTable, lit_cfg: dict[str, Any], heads: HeadLayout):
        self.source, self.target, self.lit_cfg, self.heads = source, target, lit_cfg, heads

    def segments(self, table: _ModuleTable, module: _Module) -> list[tuple[str, torch.Tensor, int, int]]:
        """(litgpt stem, rows of it, offset of this segment in the module's rows, that litgpt module's rows)."""
        out, offset = [], 0
        for lit, (stem, rows) in zip(module.lit, table.row_segments(module, self.lit_cfg, self.heads)):
            out.append((stem, rows, offset, lit_out_in(lit, self.lit_cfg, self.heads)[0]))
            offset += rows.numel()
        return out

    def parts(self, adapter: _PeftAdapter, modules: dict[str, _Module]) -> dict[str, dict[str, _Part]]:
        """target module -> source module -> its _Part; refuses a source row no target module holds."""
        found: dict[str, dict[str, _Part]] = {}
        for name, module in modules.items():
            a, b = adapter.pairs[name]
            covered = 0
            for stem, src_idx, src_off, size in self.segments(self.source, module):
                where = torch.full((size,), -1, dtype=torch.long)  # row of the litgpt module -> row of the source's
                where[src_idx] = torch.arange(src_idx.numel()) + src_off
                for dst in self.target.by_lit.get(stem, []):
                    for dst_stem, dst_idx, dst_off, _ in self.segments(self.target, dst):
                        if dst_stem != stem:
                            continue
                        sel = where[dst_idx]
                        hit = sel >= 0
                        if not bool(hit.any()):
                            continue
                        part = found.setdefault(dst.hf, {}).setdefault(name, _Part(name, a, b, adapter.scaling(name)))
                        part.rows.append(torch.nonzero(hit).flatten() + dst_off)
                        part.src_rows.append(sel[hit])
                        covered += int(hit.sum())
            if covered != b.shape[0]:
                raise QkvconvError(f"the adapter on {name} has {b.shape[0] - covered} of its {b.shape[0]} rows in no "
                                   f"module of {self.target.family.architecture}")
        return found


def _group(parts: list[_Part]) -> list[list[_Part]]:
    """Parts with bitwise-equal lora_A and the same scaling share one A block."""
    groups: list[list[_Part]] = []
    for p in parts:
        for g in groups:
            if g[0].scaling == p.scaling and same_bits(g[0].a, p.a):
                g.append(p)
                break
        else:
            groups.append([p])
    return groups


def _build(module: _Module, parts: list[_Part], out_rows: int, rslora: bool) -> _Built:
    """One target module's (lora_A, lora_B) from its parts; the scaling kept exactly or refused."""
    dtypes = {p.a.dtype for p in parts} | {p.b.dtype for p in parts}
    if len(dtypes) != 1:
        raise QkvconvError(f"{module.hf}: the adapters it joins ({', '.join(p.name for p in parts)}) hold different "
                           f"dtypes ({', '.join(sorted(str(d) for d in dtypes))})")
    groups = _group(parts)
    scaling = groups[0][0].scaling
    blocks = []
    for g in groups:
        ratio = g[0].scaling / scaling
        if ratio != 1.0 and not _power_of_two(ratio):
            raise QkvconvError(
                f"{module.hf} joins adapters that peft scales differently ({g[0].name}: {g[0].scaling:g}, "
                f"{groups[0][0].name}: {scaling:g}); one module has one scaling, and their ratio {ratio:g} is not a "
                "power of two, so folding it into lora_B would round: merge the adapter into the base instead")
        blocks.append((g, ratio))
    rank = sum(g[0].a.shape[0] for g, _ in blocks)
    a = torch.cat([g[0].a for g, _ in blocks])
    b = parts[0].b.new_zeros(out_rows, rank)
    col = 0
    for g, ratio in blocks:
        r = g[0].a.shape[0]
        for p in g:
            src = p.b.index_select(0, torch.cat(p.src_rows))
            if ratio != 1.0:
                scaled = src * ratio
                if not same_bits(scaled / ratio, src):
                    raise QkvconvError(f"{module.hf}: folding {p.name}'s scaling ratio {ratio:g} into its lora_B "
                                       "would round (underflow or overflow); merge the adapter instead")
                src = scaled
            b[torch.cat(p.rows).unsqueeze(1), torch.arange(col, col + r)] = src
        col += r
    alpha = _alpha_for(scaling, rank, rslora)
    if alpha is None:
        raise QkvconvError(f"{module.hf}: no lora_alpha makes peft's scaling at rank {rank} exactly {scaling!r}")
    how = "block" if len(blocks) > 1 else "shared" if len(parts) > 1 else "copied"
    folded = [f"{p.name} x{ratio:g}" for g, ratio in blocks if ratio != 1.0 for p in g]
    return _Built(module, a, b, scaling, alpha, how, folded)


def _config(built: list[_Built], table: _ModuleTable, source: dict[str, Any], base: str | None) -> dict[str, Any]:
    """adapter_config.json: target_modules by name where every module of that name is adapted (else the modules'
    full names), the most common (r, alpha) as r / lora_alpha, the others as patterns."""
    pairs = {e.module.hf: (e.a.shape[0], e.alpha) for e in built}
    r, alpha = Counter(pairs.values()).most_common(1)[0][0]
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Any] = {}
    by_key: dict[str, list[_Built]] = {}
    for e in built:
        by_key.setdefault(table.peft_key(e.module), []).append(e)
    for key, es in sorted(by_key.items()):
        everywhere = len(es) == sum(1 for m in table.modules if m.key == es[0].module.key)
        targets += [key] if everywhere else sorted(e.module.hf for e in es)
        values = {pairs[e.module.hf] for e in es}
        where = [(key, values.pop())] if len(values) == 1 else [(re.escape(e.module.hf), pairs[e.module.hf]) for e in es]
        for pattern, (rk, al) in where:
            if rk != r:
                rank_pattern[pattern] = rk
            if al != alpha:
                alpha_pattern[pattern] = _number(al)
    return {
        "peft_type": "LORA", "task_type": source.get("task_type") or "CAUSAL_LM", "base_model_name_or_path": base,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": _number(alpha),
        "lora_dropout": float(source.get("lora_dropout", 0.0) or 0.0), "target_modules": targets,
        "fan_in_fan_out": False, "bias": "none", "use_rslora": bool(source.get("use_rslora")), "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }


def _stem_updates(adapter: _PeftAdapter, modules: dict[str, _Module], rows: _Rows, table: _ModuleTable
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """litgpt stem -> (update @ X on its rows, |B| @ |A| @ |X| * |scaling|: the scale of each entry's rounding)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in modules.items():
        a, b = (t.double() for t in adapter.pairs[name])
        s = adapter.scaling(name)
        x = _probe(a.shape[1])
        y, mag = (b @ (a @ x)) * s, (b.abs() @ (a.abs() @ x.abs())) * abs(s)
        for stem, idx, off, size in rows.segments(table, module):
            value, scale = out.setdefault(stem, (torch.zeros(size, PROBES, dtype=torch.float64),
                                                 torch.zeros(size, PROBES, dtype=torch.float64)))
            value[idx] += y[off:off + idx.numel()]
            scale[idx] += mag[off:off + idx.numel()]
    return out


def _check(source: _PeftAdapter, src_modules: dict[str, _Module], written: _PeftAdapter,
           dst_modules: dict[str, _Module], rows: _Rows) -> str:
    want = _stem_updates(source, src_modules, rows, rows.source)
    got = _stem_updates(written, dst_modules, rows, rows.target)
    worst = 0.0
    for stem in sorted(set(want) | set(got)):
        w, scale = want.get(stem, (None, None))
        g, _ = got.get(stem, (None, None))
        if w is None or g is None or w.shape != g.shape or not within(g, w, scale * 1e-12):  # type: ignore[arg-type]
            raise CheckFailed(f"PEFT adapter: the update of litgpt's {stem} differs from the source adapter's; "
                              "nothing was written")
        worst = max(worst, max_difference(g, w))
    return (f"PEFT adapter: every adapted module's update equals the source's on {PROBES} random probes "
            f"(float64; max abs difference {worst:.2g})")


def retarget_peft(peft_dir: Path, out: Path, *, source_json: dict[str, Any], target_json: dict[str, Any],
                  source_name: str, target_name: str, allow_nonfinite: bool = False) -> AdapterConversion:
    """Write the PEFT adapter at `peft_dir` (on the base `source_json` describes) as an adapter on the base
    `target_json` describes (the same model in another architecture's modules) at `out`."""
    adapter = _read_peft(peft_dir, allow_nonfinite=allow_nonfinite)
    src_family, dst_family = require_family(source_json), require_family(target_json)
    lit_src, shape = _shape_of(source_json)
    lit_dst, _ = _shape_of(target_json)
    require_same_model(lit_src, lit_dst, source_name, target_name)
    heads = shape.heads
    src_table, dst_table = _ModuleTable(src_family, shape.n_layer), _ModuleTable(dst_family, shape.n_layer)
    modules = _modules_of(adapter, src_table, lit_src, heads)
    for family, config_json, table, where in ((src_family, source_json, src_table, source_name),
                                              (dst_family, target_json, dst_table, target_name)):
        head = family.lm_head
        if _read(config_json, family.normalized_head) and any(m.lit_stem() == "lm_head" for m in modules.values()):
            raise QkvconvError(
                f"the adapter targets the output head, which {family.architecture} ({where}) normalises at run time "
                "(each row divided by its norm: Baichuan 2's NormHead): no update of its stored rows equals an update "
                f"of the normalised ones, and peft cannot adapt {head} there; leave the head out or merge the adapter")
    rows = _Rows(src_table, dst_table, lit_src, heads)
    rslora = bool(adapter.config.get("use_rslora"))
    built = []
    for dst, parts in rows.parts(adapter, modules).items():
        module = dst_table.by_hf[dst]
        out_rows = sum(idx.numel() for _, idx, _, _ in rows.segments(dst_table, module))
        built.append(_build(module, list(parts.values()), out_rows, rslora))
    config = _config(built, dst_table, adapter.config, target_name)
    notes = _notes(built, dst_table, modules, src_table, config)
    if adapter.base_copies:
        notes.append(f"not written: peft's copy of the base weights of {', '.join(sorted(adapter.base_copies))} "
                     "(save_embedding_layers; the target base has its own)")
    with new_directory(out) as tmp:
        write_adapter(tmp, built, config)
        written = _read_peft(tmp, allow_nonfinite=allow_nonfinite)  # what is on disk, read as peft would
        dst_modules = _modules_of(written, dst_table, lit_dst, heads)
        notes.append(_check(adapter, modules, written, dst_modules, rows))
    return AdapterConversion(out, notes)


def _notes(built: list[_Built], table: _ModuleTable, modules: dict[str, _Module], src_table: _ModuleTable,
           config: dict[str, Any]) -> list[str]:
    by_key: dict[str, list[_Built]] = {}
    for e in built:
        by_key.setdefault(table.peft_key(e.module), []).append(e)
    src_keys = sorted({src_table.peft_key(m) for m in modules.values()})
    notes = [f"PEFT LoRA on {', '.join(src_keys)} of {src_table.family.architecture} -> {table.family.architecture}"]
    for key, es in sorted(by_key.items()):
        kinds = Counter(e.how for e in es)
        words = {"copied": "lora_A and lora_B copied", "shared": "joined at the rank of their shared lora_A",
                 "block": "joined block-diagonally (their own lora_A each)"}
        how = ", ".join(f"{n} module(s) {words[k]}" for k, n in sorted(kinds.items()))
        ranks = sorted({e.a.shape[0] for e in es})
        order = table.qkv_order.value if es[0].module.kind == "fused-qkv" else None
        rows = f", lora_B rows in {key}'s {order} q/k/v order" if order else ""
        notes.append(f"{key}: rank {'/'.join(map(str, ranks))}, {how}{rows} (exact)")
    folded = [f for e in built for f in e.folded]
    if folded:
        notes.append(f"scalings folded into lora_B by powers of two (exact): {', '.join(folded)}")
    notes.append(f"adapter_config.json: r {config['r']}, lora_alpha {config['lora_alpha']}, target_modules "
                 f"{config['target_modules']}" + (f", rank_pattern {config['rank_pattern']}" if config["rank_pattern"]
                                                 else "")
                 + (f", alpha_pattern {config['alpha_pattern']}" if config["alpha_pattern"] else ""))
    return notes
