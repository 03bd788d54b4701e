"""litgpt LoRA runs <-> PEFT LoRA adapters, exactly, for the Hugging Face families in families.py.

    config_json = json.load(open("base_hf/config.json"))            # the base model's config.json
    litgpt_lora_to_peft(Path("out/finetune/lora/final"), Path("adapter"), hf_config=config_json)
    peft_to_litgpt_lora(Path("adapter"), Path("lora_run"), hf_config=config_json, checkpoint_dir="checkpoints/base")
    inspect_peft(Path("adapter"))                                     # what `qkvconv inspect` shows

The two formats hold the same kind of update, per adapted linear layer W (out, in):
- litgpt (`lit_model.pth.lora` + `hyperparameters.yaml`): `lora_A` (r, in), `lora_B` (out, r), update
  B @ A * lora_alpha / lora_r, with ONE r and alpha for the whole model. The fused `attn.qkv` adapter
  has blocks (lora_layout.py): A (r * n_enabled, in), B (rows of the enabled q/k/v, r), block c of B
  multiplying rows [c*r, (c+1)*r) of A. Legacy `attn.attn` adapters (litgpt <= 0.5.4) land on the
  grouped rows, and with all of q, k, v enabled without the scatter (see docs/layouts.md).
  `lora_mlp` adapts every MLP linear together; `lora_projection` the attention output; `lora_head`
  the output head.
- PEFT (`adapter_config.json` + `adapter_model.safetensors`): `base_model.model.<HF module>.lora_A.weight`
  (r_m, in) and `.lora_B.weight` (out, r_m), update B @ A * alpha_m / r_m (alpha_m / sqrt(r_m) with
  use_rslora), r_m and alpha_m from `rank_pattern` / `alpha_pattern` (peft's get_pattern_key) or r and
  lora_alpha.

Export (litgpt -> PEFT). Each litgpt adapter becomes the adapters of the HF modules the family table
puts its rows in. The fused QKV adapter is first written as one plain adapter on the sequential
rows, every row in the columns of the A block it multiplies; for a legacy adapter, the block it used
in litgpt 0.5.4 (lora_layout.plan_reorder): the update `qkvconv upgrade` gives, without the repeated
A blocks of its rank-expanded adapter. Then
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

Import (PEFT -> litgpt). The reverse: q/k/v adapters join (lora_layout.join_adapters), a fused QKV
adapter becomes litgpt blocks sharing its A (from_fused_adapter), gate_up_proj's rows split between
fc_1 and fc_2. litgpt has one rank: every adapter is zero-padded to the largest; modules PEFT left
alone but litgpt's flags switch on (lora_mlp covers all MLP linears; layers outside
layers_to_transform) get zero adapters. lora_alpha keeps the scaling most adapters use; an adapter
with another scaling (alpha_pattern, rank_pattern, rslora) has the ratio folded into its lora_B
(exact for a power of two, else rounded once to the adapter's dtype).

Before anything is published, the written files are read back and every adapted module's update is
compared with the source's, layer by layer, on random probe vectors (update @ X computed as
B @ (A @ X) in float64, so memory stays that of the adapters): equal to float64 rounding, plus one
rounding of a folded lora_B, with an allowed NaN/inf in the same places (nonfinite.within); a module
only one side adapts must be exactly zero on the other. NaN/inf in an adapter is refused unless allowed.
PEFT features with no litgpt equivalent are refused with one line (QkvconvError, exit 2): DoRA and the
other LoRA variants, fan_in_fan_out, trained biases, modules_to_save, trainable tokens, targets
litgpt cannot adapt (embeddings), initialisations with which PEFT rewrites the base weights on load
(PiSSA, CorDA, OLoRA, LoftQ), and settings peft 0.21 does not have.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvconv.errors import CheckFailed, QkvconvError, UnsupportedFamily
from qkvconv.formats.families import Block, Family, Fused, Split, supported
from qkvconv.formats.hf import (
    describe_layout,
    detect_family,
    hf_config_from_litgpt,
    litgpt_config_from_hf,
    litgpt_state_names,
    plan_litgpt_to_hf,
)
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder, split
from qkvconv.formats.litgpt import (
    CONFIG,
    HYPERPARAMETERS,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    QKV_KEY,
    LoraHyperparameters,
    ModelShape,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    open_litgpt,
    qkv_naming,
)
from qkvconv.model.lora import (
    PARTS,
    block_of_rows,
    from_fused_adapter,
    join_adapters,
    pad_rank,
    plan_reorder,
    qkv_delta,
    target_rows,
)
from qkvconv.model.nonfinite import check_all_finite, check_finite, max_difference, same_bits, within
from qkvconv.io.readers import TensorMeta, open_reader
from qkvconv.io.sources import check_inside
from qkvconv.io.transaction import is_temporary
from qkvconv.io.config_files import read_json, read_yaml, write_yaml
from qkvconv.io.transaction import new_directory
from qkvconv.ops.upgrade import _save
from qkvconv.io.writers import SafetensorsWriter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# peft's save_embedding_layers copies the base weight of a targeted lm_head / embedding beside the adapter
BASE_COPY_KEY = re.compile(r"^base_model\.model\.(.+)\.base_layer\.weight$")

# Every LoraConfig field of peft 0.21 (tests check this against the installed peft). A field outside
# this list with a value set means a newer PEFT feature: refused rather than guessed at.
KNOWN_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
    "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
    "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
    "ensure_weight_tying",
})
# Settings that, when set, change what the adapter computes beyond B @ A * scaling (or add trained
# tensors litgpt has no place for). The LoRA variants of peft 0.21 (fields it marks is_lora_variant)
# are all here; tests check that too.
REFUSED_SETTINGS = {
    "use_dora": "it is DoRA (use_dora: a magnitude vector rescales each weight column; litgpt LoRA has none)",
    "fan_in_fan_out": "fan_in_fan_out is set (transposed Conv1D weights; the families qkvconv maps use nn.Linear)",
    "lora_bias": "lora_B has a trained bias (lora_bias)",
    "modules_to_save": "it holds fully trained modules (modules_to_save); litgpt LoRA runs hold only LoRA matrices",
    "trainable_token_indices": "it trains token embeddings (trainable_token_indices)",
    "layer_replication": "it replicates layers (layer_replication)",
    "target_parameters": "it adapts parameters rather than modules (target_parameters)",
    "megatron_config": "it targets Megatron parallel layers (megatron_config)",
    "use_qalora": "it is QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens: the update applies only after them)",
    "velora_config": "it is the VeLoRA variant (velora_config)",
    "monteclora_config": "it is the MonteCLoRA variant (monteclora_config)",
    "use_bdlora": "it is block-diagonal LoRA (use_bdlora)",
    "arrow_config": "it routes between adapters (arrow_config)",
    "kasa_config": "it is the KaSA variant (kasa_config)",
}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")


@dataclass
class AdapterConversion:
    """What a conversion did, for the CLI report."""

    out: Path
    notes: list[str] = field(default_factory=list)
    rounding: list[str] = field(default_factory=list)  # the notes about values the result holds rounded


# ---------------------------------------------------------------------------------------------
# where each HF module's adapter lives in litgpt


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
        return self.lit[j] if self.layer is None else f"transformer.h.{self.layer}.{self.lit[j]}"


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
            entries += [(rel, "linear", (lit,), None) for rel, lit in family.layer_tensors.items()]
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
            f"{family.layer_prefix.format(i=i)}.{n}" for i in range(n_layer) for n in block.norms
        ]
        self.mlp_lit = sorted({lit for m in modules for lit in m.lit if lit.startswith("mlp.")})

    @property
    def qkv_order(self) -> QKVOrder:
        """Row order of the family's fused QKV module (split families: SPLIT)."""
        qkv = self.family.qkv
        return qkv.order if isinstance(qkv, Fused) else QKVOrder.SPLIT

    def peft_key(self, module: _Module) -> str:
        """The name to list in target_modules / rank_pattern for this module: its last component when
        that matches exactly the modules of the same name (peft: name == key or endswith '.' + key)."""
        same = {m.hf for m in self.modules if m.key == module.key}
        for key in (module.key.rsplit(".", 1)[-1], module.key):
            if {n for n in self.names if n == key or n.endswith("." + key)} == same:
                return key
        raise QkvconvError(f"no PEFT target name selects exactly {module.key} in {self.family.architecture}")


def _require_family(hf_config: dict[str, Any]) -> Family:
    family = detect_family(hf_config)
    if family is None:
        what = hf_config.get("architectures") or hf_config.get("model_type") or "no architecture"
        raise UnsupportedFamily(
            f"the base config.json describes {what}, which qkvconv cannot map; supported: {supported()}"
        )
    return family


def _shape_of(hf_config: dict[str, Any]) -> tuple[dict[str, Any], ModelShape]:
    lit_cfg = litgpt_config_from_hf(hf_config)
    return lit_cfg, ModelShape.from_config(lit_cfg, Path("config.json"))


def _in_out(module: _Module, lit_cfg: dict[str, Any], heads: HeadLayout) -> tuple[int, int]:
    """(out, in) of the HF module's weight."""
    n_embd, inter = int(lit_cfg["n_embd"]), int(lit_cfg["intermediate_size"])
    if module.kind == "qkv":
        return (heads.q_rows if module.part == "q" else heads.kv_rows), n_embd
    if module.kind == "fused-qkv":
        return heads.rows, n_embd
    sizes = {
        "attn.proj": (n_embd, heads.q_rows),
        "mlp.proj": (n_embd, inter),
        "lm_head": (int(lit_cfg["padded_vocab_size"]), n_embd),
    }
    out, in_ = 0, n_embd
    for lit in module.lit:
        o, in_ = sizes.get(lit, (inter, n_embd))  # mlp.fc / fc_1 / fc_2
        out += o
    return out, in_


def _number(x: float) -> int | float:
    """An int where the value is integral (alpha in JSON / YAML), else the float."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------
# reading a PEFT adapter


def is_peft_dir(path: Path) -> bool:
    """A directory with adapter_config.json (a PEFT adapter of any kind; reading it checks it is LoRA)."""
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """What in adapter_config.json has no litgpt equivalent (empty: a plain LoRA)."""
    found = []
    if config.get("peft_type", "LORA") != "LORA":
        found.append(f"it is peft_type {config.get('peft_type')!r} (qkvconv converts LoRA adapters only)")
    found += [why for key, why in REFUSED_SETTINGS.items() if _is_set(config.get(key))]
    if config.get("bias", "none") != "none":
        found.append(f"it trains biases (bias={config['bias']!r}); litgpt LoRA runs hold only LoRA matrices")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        found.append(
            f"init_lora_weights={init!r}: PEFT rewrites the base weights when it loads this adapter; save it "
            "with save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    if config.get("ensure_weight_tying") and "lm_head" in str(config.get("target_modules")):
        found.append("ensure_weight_tying with a targeted lm_head (the tied embedding gets the adapter too)")
    unknown = sorted(k for k, v in config.items() if k not in KNOWN_FIELDS and _is_set(v))
    if unknown:
        found.append(f"it sets what qkvconv does not know ({', '.join(unknown)}; written by a newer PEFT?)")
    return found


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key): the first key that
    matches the end of the module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise QkvconvError(f"{PEFT_CONFIG}: pattern {key!r} is not a valid regular expression ({e})") from None
    return default


@dataclass
class _PeftAdapter:
    """A PEFT LoRA adapter as read: per HF module (A, B) with its rank and alpha from the config."""

    directory: Path
    config: dict[str, Any]
    weights: Path
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_copies: dict[str, TensorMeta]

    def rank_alpha(self, module: str) -> tuple[int, float]:
        c = self.config
        r = _pattern_value(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = _pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        bad_r = isinstance(r, bool) or not isinstance(r, int) or r < 1
        if bad_r or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise QkvconvError(f"{PEFT_CONFIG}: {module} gets rank {r!r} and alpha {alpha!r}; expected a positive "
                               "integer and a number")
        return r, float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _weights_file(directory: Path) -> Path:
    for name in PEFT_WEIGHTS:
        if (directory / name).is_file():
            return check_inside(directory / name, directory)
    raise QkvconvError(f"{directory} has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")


def _peft_config(directory: Path) -> dict[str, Any]:
    if not is_peft_dir(directory):
        raise QkvconvError(f"{directory} is not a PEFT adapter directory (no {PEFT_CONFIG})")
    return read_json(directory / PEFT_CONFIG)


def _read_peft(directory: Path, *, allow_nonfinite: bool = False) -> _PeftAdapter:
    """Open a PEFT LoRA adapter; refuse what litgpt cannot hold, with the first reason, and NaN/inf
    values (naming the tensor) unless `allow_nonfinite`."""
    config = _peft_config(directory)
    problems = unsupported_features(config)
    if problems:
        raise QkvconvError(f"cannot convert {directory} to litgpt LoRA: {problems[0]}")
    weights = _weights_file(directory)
    reader = open_reader(weights)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, TensorMeta] = {}
    for name in reader.names():
        if m := ADAPTER_KEY.match(name):
            tensors.setdefault(m.group(1), {})[m.group(2)] = reader.read(name)
            if not allow_nonfinite:
                check_finite(name, tensors[m.group(1)][m.group(2)])
        elif m := BASE_COPY_KEY.match(name):
            base_copies[m.group(1)] = reader.meta(name)
        else:
            raise QkvconvError(
                f"cannot convert {directory} to litgpt LoRA: {_what_is(name)} has no litgpt LoRA equivalent"
            )
    if not tensors:
        raise QkvconvError(f"{weights} holds no LoRA matrices")
    pairs = {}
    for module, ab in tensors.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise QkvconvError(f"{weights}: {module} has {next(iter(ab))} but not its partner")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise QkvconvError(
                f"{weights}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not a LoRA pair"
            )
        pairs[module] = (a, b)
    adapter = _PeftAdapter(directory, config, weights, pairs, base_copies)
    for module, (a, _) in pairs.items():
        r, _alpha = adapter.rank_alpha(module)
        if a.shape[0] != r:
            raise QkvconvError(
                f"{weights}: {module} has rank {a.shape[0]}, but {PEFT_CONFIG} (r / rank_pattern) gives it {r}"
            )
    return adapter


def _what_is(name: str) -> str:
    """For refusals: what an unexpected tensor of a PEFT file is."""
    if "lora_magnitude_vector" in name:
        return f"{name} (a DoRA magnitude vector)"
    if "lora_embedding_" in name:
        return f"{name} (LoRA on an embedding)"
    if re.search(r"\.lora_B\.bias$", name):
        return f"{name} (a lora_B bias)"
    if "modules_to_save" in name or "trainable_tokens" in name:
        return f"{name} (a fully trained module)"
    if not name.startswith(PEFT_PREFIX):
        return f"{name} (not under {PEFT_PREFIX!r}, where PEFT saves LoRA matrices)"
    return f"tensor {name}"


def _modules_of(
    adapter: _PeftAdapter, table: _ModuleTable, lit_cfg: dict[str, Any], heads: HeadLayout
) -> dict[str, _Module]:
    """The table entry of every adapted module, after checking its shape; refuse modules litgpt lacks."""
    found = {}
    for name, (a, b) in adapter.pairs.items():
        module = table.by_hf.get(name)
        if module is None:
            raise QkvconvError(
                f"the PEFT adapter targets {name}, which has no litgpt LoRA equivalent in "
                f"{table.family.architecture} (litgpt adapts q/k/v, the attention output, the MLP and the head; "
                "or the config.json given is not this adapter's base)"
            )
        out, in_ = _in_out(module, lit_cfg, heads)
        if tuple(a.shape[1:]) != (in_,) or b.shape[0] != out:
            raise QkvconvError(
                f"{adapter.weights}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but the base "
                f"config.json makes that layer ({out}, {in_}); the adapter belongs to another model"
            )
        found[name] = module
    for name, meta in adapter.base_copies.items():
        module = table.by_hf.get(name)
        if module is None or name not in adapter.pairs or meta.shape != _in_out(module, lit_cfg, heads):
            raise QkvconvError(
                f"{adapter.weights} carries base weights of {name} {meta.shape}, which are not those of the base "
                "model config.json describes (a resized vocabulary?); litgpt LoRA runs hold only LoRA matrices"
            )
    return found


# ---------------------------------------------------------------------------------------------
# the check before publishing: every module's update, probed
#
# The full update of a module (out, in) in float64 is far larger than its adapter (lm_head alone: vocab x
# n_embd x 8 bytes), so each side computes update @ X for fixed random X (in, PROBES), as B @ (A @ X),
# one layer at a time. Any difference in rows, blocks or scaling shows in the probes.

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


# ---------------------------------------------------------------------------------------------
# litgpt -> PEFT


@dataclass
class _Exported:
    module: _Module
    a: torch.Tensor
    b: torch.Tensor
    alpha: float


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
    modules = table.by_lit[f"transformer.h.{layer}.attn.qkv"]
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
    family = _require_family(hf_config)
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

    tensors = {f"{PEFT_PREFIX}{e.module.hf}.{ab}.weight": t.contiguous()
               for e in exported for ab, t in (("lora_A", e.a), ("lora_B", e.b))}
    with new_directory(out) as tmp:
        layout = {name: TensorMeta.of(t) for name, t in tensors.items()}
        with SafetensorsWriter(tmp, layout, prefix="adapter_model") as writer:
            for name, t in tensors.items():
                writer.write(name, t)
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
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


# ---------------------------------------------------------------------------------------------
# PEFT -> litgpt


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


def _all_pieces(pieces: dict[str, Any]) -> list[_Piece]:
    return [p for v in pieces.values() for p in (v.values() if isinstance(v, dict) else [v])]


def peft_to_litgpt_lora(
    peft_dir: Path, out: Path, *, hf_config: dict, checkpoint_dir: str | None = None, allow_nonfinite: bool = False
) -> AdapterConversion:
    """Import a PEFT LoRA adapter as a litgpt LoRA run (current `attn.qkv`) at `out`; NaN/inf in the
    adapter is refused unless `allow_nonfinite`."""
    adapter = _read_peft(peft_dir, allow_nonfinite=allow_nonfinite)
    family = _require_family(hf_config)
    lit_cfg, shape = _shape_of(hf_config)
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
        stem = f"transformer.h.{i}.attn.qkv"
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
            linear(f"transformer.h.{i}.attn.proj", n_embd, heads.q_rows)
        if flags["lora_mlp"]:
            for lit in table.mlp_lit:
                out_rows, in_features = (n_embd, inter) if lit == "mlp.proj" else (inter, n_embd)
                linear(f"transformer.h.{i}.{lit}", out_rows, in_features)

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
    notes = _import_notes(adapter, modules, raw, rounding, zero_filled, lit_scaling, table)

    with new_directory(out) as tmp:
        _save({"model": tensors}, tmp / LORA_WEIGHTS)
        write_yaml(raw, tmp / HYPERPARAMETERS)
        write_yaml(lit_cfg, tmp / CONFIG)
        written = load_state_dict_file(tmp / LORA_WEIGHTS)  # what is on disk
        check_lora_shapes(written, shape, hyper)
        notes.append(_check_updates(adapter, written.tensors, hyper, heads, table, rounded=bool(folded),
                                    what="litgpt LoRA run"))
    return AdapterConversion(out, notes, rounding)


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


# ---------------------------------------------------------------------------------------------
# inspect


def _base_config(config: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    """The base config.json where the adapter names a local directory: a Hugging Face one, or a litgpt
    one (its model_config.yaml as a config.json); None when there is none or it cannot be read."""
    name = config.get("base_model_name_or_path")
    if not name:
        return None
    try:
        for base in (Path(name).expanduser(), directory / name):
            if (base / "config.json").is_file():
                return read_json(base / "config.json")
            if (base / CONFIG).is_file():
                return hf_config_from_litgpt(migrate_config(read_yaml(base / CONFIG))[0])
    except QkvconvError:
        return None
    return None


def inspect_peft(directory: Path, *, hf_config: dict | None = None) -> dict[str, Any]:
    """The inspect report of a PEFT adapter: its LoRA settings, and with the base family known (hf_config,
    a local base_model_name_or_path, or the architecture in auto_mapping) the litgpt LoRA it maps to."""
    config = _peft_config(directory)
    weights = _weights_file(directory)
    reader = open_reader(weights)
    dtypes: Counter[str] = Counter()
    parameters = 0
    modules: dict[str, list[int]] = {}
    for name in reader.names():
        meta = reader.meta(name)
        dtypes[str(meta.dtype).removeprefix("torch.")] += meta.numel
        parameters += meta.numel
        if (m := ADAPTER_KEY.match(name)) and m.group(2) == "lora_A":
            modules.setdefault(m.group(1), list(meta.shape))
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir())
             if p.is_file() and not is_temporary(p)]
    notes = [f"not convertible to litgpt: {why}" for why in unsupported_features(config)]

    hf_config = hf_config if hf_config is not None else _base_config(config, directory)
    family = None
    layout = None
    try:
        if hf_config is not None:
            family = detect_family(hf_config)
            layout = describe_layout(hf_config)
        else:
            arch = (config.get("auto_mapping") or {}).get("base_model_class")
            family = detect_family({"architectures": [arch]}) if arch else None
    except QkvconvError as e:
        notes.append(str(e))
        family = None

    lora = None
    n_layer = hf_config.get("num_hidden_layers") if hf_config else None
    if family is not None:
        prefix = re.escape(family.layer_prefix).replace(re.escape("{i}"), r"(\d+)")
        layers = [int(m.group(1)) for name in modules if (m := re.match(prefix + r"\.", name))]
        n_layer = n_layer or (max(layers) + 1 if layers else 0)
        table = _ModuleTable(family, int(n_layer))
        mapped = {name: table.by_hf.get(name) for name in modules}
        unknown = sorted(n for n, m in mapped.items() if m is None)
        if unknown:
            notes.append(f"not convertible to litgpt: {unknown[0]} has no litgpt LoRA equivalent")
        flags = _litgpt_flags([m for m in mapped.values() if m is not None])
        lora = {
            "r": config.get("r"), "alpha": config.get("lora_alpha"),
            **{k.removeprefix("lora_"): v for k, v in flags.items()},
            "base": config.get("base_model_name_or_path"), "checkpoint_dir": None,
        }
    ranks = Counter(shape[0] for shape in modules.values())
    if len(ranks) > 1:
        notes.append(f"ranks differ across modules ({dict(sorted(ranks.items()))}); litgpt gets one lora_r, "
                     "the others zero-padded")
    return {
        "source": str(directory),
        "format": "peft",
        "family": family.name if family is not None else None,
        "legacy": False,
        "naming": layout["qkv"] if layout else None,
        "qkv_order": layout["qkv_order"] if layout else None,
        "evidence": [layout["evidence"]] if layout else [],
        "n_layer": n_layer,
        "n_head": layout["n_head"] if layout else None,
        "n_query_groups": layout["n_query_groups"] if layout else None,
        "head_size": layout["head_size"] if layout else None,
        "n_embd": hf_config.get("hidden_size") if hf_config else None,
        "attention": layout["attention"] if layout else None,
        "lora": lora,
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "use_rslora": bool(config.get("use_rslora")),
        "target_modules": config.get("target_modules"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules": len(modules),
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()},
        "parameters": parameters,
        "files": files,
        "notes": notes,
    }


__all__ = [
    "AdapterConversion",
    "PEFT_CONFIG",
    "inspect_peft",
    "is_peft_dir",
    "litgpt_lora_to_peft",
    "peft_to_litgpt_lora",
    "unsupported_features",
]
