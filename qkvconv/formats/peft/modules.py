"""Where a PEFT adapter's tensors live: its file names and tensor keys, and per family the HF linear
modules a LoRA adapter can sit on, each with the litgpt module(s) holding its rows (_ModuleTable).

    table = _ModuleTable(family, n_layer)
    table.by_hf["model.layers.0.self_attn.q_proj"]     # _Module(kind="qkv", part="q", lit=("attn.qkv",))
    table.by_lit["transformer.h.0.attn.qkv"]           # the HF modules holding those rows
    table.peft_key(module)                             # "q_proj": its name in target_modules / rank_pattern

A split family's q_proj / k_proj / v_proj are parts of litgpt's fused `attn.qkv`; a fused family's QKV
module is all of it, in the family's row order; Phi-3's gate_up_proj is fc_1's rows, then fc_2's; every
other module is one litgpt module. Export and import both map through this table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.hf.families import Block, Family, Fused, Split
from qkvconv.formats.hf.config import HF_CONFIG, hf_config_from_litgpt, litgpt_config_from_hf
from qkvconv.formats.hf.variants import read_config_json
from qkvconv.formats.litgpt import CONFIG, ModelShape, migrate_config
from qkvconv.io.config_files import read_yaml
from qkvconv.model import names

QK_NORMS = (names.NORM_Q, names.NORM_K)
from qkvconv.model.layout import HeadLayout, QKVOrder, canonical_index
from qkvconv.model.lora import PARTS

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# peft's save_embedding_layers copies the base weight (and bias, where the head has one: Phi) of a
# targeted lm_head / embedding beside the adapter
BASE_COPY_KEY = re.compile(r"^base_model\.model\.(.+)\.base_layer\.(weight|bias)$")


@dataclass
class AdapterConversion:
    """What a conversion did, for the CLI report."""

    out: Path
    notes: list[str] = field(default_factory=list)
    rounding: list[str] = field(default_factory=list)  # the notes about values the result holds rounded


@dataclass(frozen=True)
class _Module:
    """One HF linear module a LoRA adapter can sit on, and the litgpt module(s) holding its rows.

    kind: "qkv" (one of q/k/v of a split family: `part`), "fused-qkv" (the whole fused matrix),
    "linear" (one litgpt module), "rows" (equal row blocks of several litgpt modules, in order).
    `lit` names the litgpt modules under `transformer.h.{layer}` (or top level when layer is None).
    """

    hf: str
    key: str  # layer-relative name ("self_attn.q_proj"), or the top-level name ("lm_head")
    layer: int | None
    kind: str
    lit: tuple[str, ...]
    part: str | None = None

    def lit_stem(self, j: int = 0) -> str:
        return self.lit[j] if self.layer is None else names.layer(self.layer, self.lit[j])


class _ModuleTable:
    """The adaptable modules of one family at n_layer layers, both ways."""

    def __init__(self, family: Family, n_layer: int) -> None:
        self.family = family
        qkv, block = family.qkv, family.block
        assert isinstance(qkv, (Split, Fused)) and isinstance(block, Block)
        modules: list[_Module] = []
        for i in range(n_layer):
            if isinstance(qkv, Split):
                entries = [(rel, "qkv", ("attn.qkv",), part) for part, rel in zip(PARTS, (qkv.q, qkv.k, qkv.v))]
            else:
                entries = [(qkv.name, "fused-qkv", ("attn.qkv",), None)]
            entries += [(rel, "linear", (lit,), None) for rel, lit in family.layer_tensors.items()
                        if lit not in QK_NORMS]  # not linears: no adapter sits on them
            entries += [(rel, "rows", tuple(lits), None) for rel, lits in family.fused_rows.items()]
            prefix = family.layer_prefix.format(i=i)
            modules += [_Module(f"{prefix}.{rel}", rel, i, kind, lit, part) for rel, kind, lit, part in entries]
        modules.append(_Module(family.lm_head, family.lm_head, None, "linear", ("lm_head",)))
        self.modules = modules
        self.by_hf = {m.hf: m for m in modules}
        self.by_lit: dict[str, list[_Module]] = {}
        for m in modules:
            for j in range(len(m.lit)):
                self.by_lit.setdefault(m.lit_stem(j), []).append(m)
        # every module name of the model's layers that a PEFT target could match (norms included)
        self.names = [m.hf for m in modules] + [family.embedding, family.final_norm] + [
            f"{family.layer_prefix.format(i=i)}.{n}" for i in range(n_layer)
            for n in (*block.norms, *(rel for rel, lit in family.layer_tensors.items() if lit in QK_NORMS))
        ]
        self.mlp_lit = sorted({lit for m in modules for lit in m.lit if lit.startswith("mlp.")})

    @property
    def qkv_order(self) -> QKVOrder:
        """Row order of the family's fused QKV module (split families: SPLIT)."""
        qkv = self.family.qkv
        return qkv.order if isinstance(qkv, Fused) else QKVOrder.SPLIT

    def row_segments(self, module: _Module, lit_cfg: dict[str, Any], heads: HeadLayout) -> list[tuple[str, Any]]:
        """Where the module's output rows live in litgpt's modules, top to bottom: (litgpt stem, the row of that
        module each of its rows is), one entry per litgpt module it stacks. q/k/v of a split family are ranges
        of the sequential `attn.qkv`; a fused QKV module holds those rows in the family's order."""
        import torch

        if module.kind == "qkv":
            start = {"q": 0, "k": heads.q_rows, "v": heads.q_rows + heads.kv_rows}[str(module.part)]
            size = heads.q_rows if module.part == "q" else heads.kv_rows
            return [(module.lit_stem(), torch.arange(start, start + size))]
        if module.kind == "fused-qkv":
            return [(module.lit_stem(), canonical_index(self.qkv_order, heads))]
        return [(module.lit_stem(j), torch.arange(lit_out_in(lit, lit_cfg, heads)[0]))
                for j, lit in enumerate(module.lit)]

    def peft_key(self, module: _Module) -> str:
        """The name to list in target_modules / rank_pattern for this module: its last component when
        that matches exactly the modules of the same name (peft: name == key or endswith '.' + key)."""
        same = {m.hf for m in self.modules if m.key == module.key}
        for key in (module.key.rsplit(".", 1)[-1], module.key):
            if {n for n in self.names if n == key or n.endswith("." + key)} == same:
                return key
        raise QkvconvError(f"no PEFT target name selects exactly {module.key} in {self.family.architecture}")


def _shape_of(hf_config: dict[str, Any]) -> tuple[dict[str, Any], ModelShape]:
    lit_cfg = litgpt_config_from_hf(hf_config)
    return lit_cfg, ModelShape.from_config(lit_cfg, Path("config.json"))


def lit_out_in(lit: str, lit_cfg: dict[str, Any], heads: HeadLayout) -> tuple[int, int]:
    """(out, in) of the weight of litgpt's module `lit` ("attn.qkv", "mlp.fc_1", "lm_head", ...)."""
    n_embd, inter = int(lit_cfg["n_embd"]), int(lit_cfg["intermediate_size"])
    sizes = {
        "attn.qkv": (heads.rows, n_embd),
        "attn.proj": (n_embd, heads.q_rows),
        "mlp.proj": (n_embd, inter),
        "lm_head": (int(lit_cfg["padded_vocab_size"]), n_embd),
    }
    return sizes.get(lit, (inter, n_embd))  # mlp.fc / fc_1 / fc_2


def _in_out(module: _Module, lit_cfg: dict[str, Any], heads: HeadLayout) -> tuple[int, int]:
    """(out, in) of the HF module's weight."""
    if module.kind == "qkv":
        return (heads.q_rows if module.part == "q" else heads.kv_rows), int(lit_cfg["n_embd"])
    sizes = [lit_out_in(lit, lit_cfg, heads) for lit in module.lit]  # a "rows" module stacks its litgpt modules
    return sum(o for o, _ in sizes), sizes[-1][1]


def _number(x: float) -> int | float:
    """An int where the value is integral (alpha in JSON / YAML), else the float."""
    return int(x) if float(x).is_integer() else float(x)


def _litgpt_flags(modules: list[_Module]) -> dict[str, bool]:
    """hyperparameters.yaml's lora_query ... lora_head for adapters on these modules (a fused QKV
    adapter covers all of q, k, v; lora_mlp covers every MLP linear)."""
    fused = any(m.kind == "fused-qkv" for m in modules)
    return {
        **{f"lora_{name}": fused or any(m.kind == "qkv" and m.part == p for m in modules)
           for p, name in zip(PARTS, ("query", "key", "value"))},
        "lora_projection": any(m.lit == ("attn.proj",) for m in modules),
        "lora_mlp": any(lit.startswith("mlp.") for m in modules for lit in m.lit),
        "lora_head": any(m.lit == ("lm_head",) for m in modules),
    }


def base_config_json(base: Path) -> dict[str, Any] | None:
    """The config.json that describes an adapter's base directory: its own (Hugging Face), or one derived
    from its model_config.yaml (litgpt); None when it has neither."""
    if (base / HF_CONFIG).is_file():
        return read_config_json(base / HF_CONFIG)
    if (base / CONFIG).is_file():
        return hf_config_from_litgpt(migrate_config(read_yaml(base / CONFIG))[0])
    return None
