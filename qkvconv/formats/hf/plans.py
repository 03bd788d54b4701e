"""Hugging Face checkpoints <-> litgpt state dicts: conversion plans driven by the family table.

    plan = plan_hf_to_litgpt(cfg, list(safetensors_names))
    lit_sd = plan.apply_in_memory(hf_state_dict)      # small models; the engine streams big ones
    back = plan_litgpt_to_hf(lit_cfg, list(lit_sd), cfg)   # exact inverse (cfg: the config.json to write)

Plans are pure data (plans/plan.py): each `Recipe` names its output, its source tensors and the row
operations between them (fuse/split q, k, v, re-order fused rows, take or concatenate row blocks).
litgpt's current layout is a sequential `attn.qkv`; `legacy=True` writes litgpt <= 0.5.4's grouped
`attn.attn` instead. A tensor the family does not account for is refused: a conversion either is exact
or does not happen. Planning imports no torch (inspect checks config.json against the tensors with it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf.families import Block, Family, Fused, MoE, Split
from qkvconv.formats.hf.config import (
    HF_CONFIG,
    _forward_fields,
    _heads,
    _read,
    require_family,
    hf_config_from_litgpt,
    litgpt_config_from_hf,
)
from qkvconv.formats.hf.describe import _qkv_evidence
from qkvconv.formats.hf.reference import reference_config_from_hf
from qkvconv.formats.hf.steps import ConcatRows, NormalizeRows, TakeRows, Tied, Transpose
from qkvconv.model.architecture import Architecture
from qkvconv.model.layout import HeadLayout, QKVOrder, same_rows
from qkvconv.plans.plan import CheckRows, Fuse, Plan, Recipe, Reorder, Step, TakePart
from qkvconv.model import names

LITGPT_CONFIG = "model_config.yaml"
PARAMS = ("weight", "bias")

# ---------------------------------------------------------------------------------------------
# plans


def litgpt_state_names(litgpt_cfg: Mapping[str, Any], *, legacy: bool = False) -> list[str]:
    """The state-dict names of litgpt's GPT for this config (`attn.attn` instead of `attn.qkv` if legacy)."""
    arch = Architecture.from_litgpt_config(litgpt_cfg)
    norm = [] if not arch.norm_affine else ["weight", "bias"] if arch.norm_class_name == "LayerNorm" and arch.norm_bias \
        else ["weight"]
    linear = ["weight", "bias"] if arch.proj_bias else ["weight"]
    mlp_linear = ["weight", "bias"] if arch.mlp_bias else ["weight"]
    qkv = names.LEGACY_QKV if legacy else names.QKV
    if arch.n_expert:  # the router, then each expert's LLaMAMLP
        mlp = [names.MOE_ROUTER] + [names.expert(e, m) for e in range(arch.n_expert) for m in names.EXPERT_LINEARS]
    else:
        mlp = [names.MLP_FC, names.MLP_PROJ] if arch.mlp_class_name == "GptNeoxMLP" else \
            [names.MLP_FC_1, names.MLP_FC_2, names.MLP_PROJ]
    out = [f"{names.EMBEDDING}.weight"]
    out += [f"{names.POSITION_EMBEDDING}.weight"] if arch.learned_positions else []
    out += [f"{names.EMBEDDING_NORM}.{x}" for x in norm if arch.embedding_norm]
    for i in range(arch.n_layer):
        p = names.layer(i)
        out += [f"{p}.{names.NORM_1}.{x}" for x in norm if arch.norm_1]
        out += [f"{p}.{qkv}.weight"] + ([f"{p}.{qkv}.bias"] if arch.qkv_bias else [])
        if arch.norm_qk:
            out += [f"{p}.{n}.{x}" for n in (names.NORM_Q, names.NORM_K) for x in norm]
        out += [f"{p}.{names.ATTN_PROJ}.{x}" for x in linear]
        if not arch.shared_attention_norm and arch.norm_2:
            out += [f"{p}.{names.NORM_2}.{x}" for x in norm]
        out += [f"{p}.{n}.{x}" for n, on in ((names.POST_ATTENTION_NORM, arch.post_attention_norm),
                                            (names.POST_MLP_NORM, arch.post_mlp_norm)) if on for x in norm]
        out += [f"{p}.{m}.{x}" for m in mlp for x in (["weight"] if m == names.MOE_ROUTER else mlp_linear)]
    out += [f"{names.FINAL_NORM}.{x}" for x in norm]
    out += [f"{names.HEAD}.weight"] + ([f"{names.HEAD}.bias"] if arch.lm_head_bias else [])
    return out


def _norms(family: Family, block: Block) -> Mapping[str, str]:
    """The block's norms that have tensors (OLMo's LayerNorms have no weight or bias)."""
    return block.norms if family.norm_affine else {}


def _layer_modules(family: Family, block: Block, n_expert: int) -> dict[str, str]:
    """Per layer, HF module -> litgpt module for everything but q/k/v and fused rows: norms, attention
    output, the MLP or the router and experts."""
    experts = family.moe.modules(n_expert) if family.moe else {}
    return {**_norms(family, block), **family.layer_tensors, **experts}


def _reorder_steps(src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> tuple[Step, ...]:
    """A Reorder, or a row-count check when the two orders coincide for these heads (G = 1, G = H)."""
    if same_rows(src, dst, heads):
        return (CheckRows(src, heads),)
    return (Reorder(src, dst, heads),)


def _stacked_experts(moe: MoE, src: _Names, hf: str, to: str, n_expert: int) -> list[Recipe]:
    """Each expert's fc_1 / fc_2 / proj weight out of a layer's stacked parameters (MoE.stacked)."""
    recipes = []
    for linear, lit in moe.expert_tensors.items():
        stacked = src.take(f"{hf}.{moe.experts}.{linear}")
        down = (Transpose(),) if lit == names.EXPERT_LINEARS[2] else ()  # proj: stored [size, d_model]
        recipes += [Recipe(f"{to}.{names.expert(e, lit)}.weight", (stacked,), (TakeRows(e, n_expert), *down))
                    for e in range(n_expert)]
    return recipes


class _Names:
    """The source tensor names: which exist, which a plan used, which are left over."""

    def __init__(self, names: Iterable[str], where: str) -> None:
        self.all = list(names)
        self.present = set(self.all)
        self.used: set[str] = set()
        self.where = where

    def has(self, name: str) -> bool:
        return name in self.present

    def take(self, name: str) -> str:
        if name not in self.present:
            raise QkvconvError(f"the {self.where} has no tensor {name!r}")
        self.used.add(name)
        return name

    def params(self, module: str) -> list[str]:
        """The params of `module` present, taken: its weight (required) and bias (if any)."""
        present = [p for p in PARAMS if p == "weight" or self.has(f"{module}.{p}")]
        for p in present:
            self.take(f"{module}.{p}")
        return present

    def left_over(self, ignored: Iterable[str]) -> list[str]:
        patterns = [re.compile(p) for p in ignored]
        return [n for n in self.all if n not in self.used and not any(p.search(n) for p in patterns)]


def _check_outputs(plan: Plan, expected: list[str], what: str) -> None:
    got, want = {r.output for r in plan.recipes}, set(expected)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        parts = [f"lacks {', '.join(missing[:4])}"] if missing else []
        parts += [f"has extra {', '.join(extra[:4])}"] if extra else []
        raise QkvconvError(f"{what}: the checkpoint {' and '.join(parts)} for what config.json describes")


def _unknown(left: list[str], family: Family, where: str) -> QkvconvError:
    more = f" and {len(left) - 5} more" if len(left) > 5 else ""
    return UnsupportedFamily(
        f"the {where} has tensors that {family.architecture} as qkvconv knows it does not have: "
        f"{', '.join(left[:5])}{more}; qkvconv converts only exactly what it can account for"
    )


def plan_hf_to_litgpt(config_json: Mapping[str, Any], hf_names: Iterable[str], *, legacy: bool = False) -> Plan:
    """Recipes that turn a Hugging Face state dict (these names) into a litgpt one.

    q/k/v land in litgpt's sequential `attn.qkv` (legacy: litgpt <= 0.5.4's grouped `attn.attn`).
    litgpt always stores `lm_head.weight`: from the HF head, or from the embedding where config.json
    ties them and the files omit the head. Known non-weight buffers are skipped; any other name the
    family does not account for, or a tensor the config promises but the files lack, is refused.
    The plan carries model_config.yaml.
    """
    return _plan_from_hf(require_family(config_json), config_json, litgpt_config_from_hf(config_json), hf_names,
                         legacy=legacy)


def plan_hf_for_reference(config_json: Mapping[str, Any], hf_names: Iterable[str]) -> Plan:
    """What `verify` reads an HF checkpoint through: plan_hf_to_litgpt's recipes where litgpt can express the model;
    for the transformers classes it cannot (Family.verifiable) the same under the reference pass's names, Conv1D
    weights transposed to a Linear's [out, in] and learned positions and an embedding norm included. The plan's
    model_config.yaml then holds the reference fields too: it is never written."""
    family = require_family(config_json)
    return _plan_from_hf(family, config_json, reference_config_from_hf(config_json), hf_names, legacy=False)


def _plan_from_hf(family: Family, config_json: Mapping[str, Any], lit: dict[str, Any], hf_names: Iterable[str], *,
                  legacy: bool) -> Plan:
    _, heads = _heads(family, config_json)
    src = _Names(hf_names, "Hugging Face checkpoint")
    dst_order, qkv_out = (QKVOrder.GROUPED, "attn.attn") if legacy else (QKVOrder.SEQUENTIAL, "attn.qkv")
    recipes: list[Recipe] = []

    def copy(module: str, to: str, steps: tuple[Step, ...] = ()) -> None:
        recipes.extend(Recipe(f"{to}.{p}", (f"{module}.{p}",), steps) for p in src.params(module))

    block = family.block
    assert isinstance(block, Block)
    conv1d = (Transpose(),)  # GPT-2's Conv1D weights, [in, out]
    for i in range(lit["n_layer"]):
        hf, to = family.layer_prefix.format(i=i), names.layer(i)
        qkv = family.qkv
        if isinstance(qkv, Split):
            parts = [f"{hf}.{m}" for m in (qkv.q, qkv.k, qkv.v)]
            for p in PARAMS:
                if p == "bias" and not any(src.has(f"{m}.bias") for m in parts):
                    continue
                inputs = tuple(src.take(f"{m}.{p}") for m in parts)
                recipes.append(Recipe(f"{to}.{qkv_out}.{p}", inputs, (Fuse(dst_order, heads),)))
        else:
            assert isinstance(qkv, Fused)
            for p in src.params(f"{hf}.{qkv.name}"):
                steps = _reorder_steps(qkv.order, dst_order, heads)
                stored = conv1d if qkv.transposed and p == "weight" else ()
                recipes.append(Recipe(f"{to}.{qkv_out}.{p}", (f"{hf}.{qkv.name}.{p}",), stored + steps))
        for module, lit_module in _layer_modules(family, block, int(lit.get("n_expert", 0))).items():
            copy(f"{hf}.{module}", f"{to}.{lit_module}", conv1d if module in family.conv1d else ())
        if family.moe is not None and family.moe.stacked:
            recipes.extend(_stacked_experts(family.moe, src, hf, to, int(lit["n_expert"])))
        for module, lit_modules in family.fused_rows.items():
            for p in src.params(f"{hf}.{module}"):
                recipes.extend(
                    Recipe(f"{to}.{m}.{p}", (f"{hf}.{module}.{p}",), (TakeRows(j, len(lit_modules)),))
                    for j, m in enumerate(lit_modules)
                )

    copy(family.embedding, names.EMBEDDING)
    if family.position_embedding is not None:
        copy(family.position_embedding, names.POSITION_EMBEDDING)
    if family.embedding_norm is not None:
        copy(family.embedding_norm, names.EMBEDDING_NORM)
    if family.norm_affine:  # OLMo's norms have no tensors
        copy(family.final_norm, names.FINAL_NORM)
    head, embedding = f"{family.lm_head}.weight", f"{family.embedding}.weight"
    notes = [_qkv_evidence(family, heads)]
    length = {"block_size": _read(config_json, family.config.block_size)}
    notes += [note.format_map({**config_json, **length}) for flags, note in family.caveats
              if family.matches(config_json, flags)]
    tied = bool(_read(config_json, family.config.tie_embeddings))
    if tied and _read(config_json, family.normalized_head):
        raise QkvconvError(f"{family.architecture}: a tied head normalised at run time is not converted")
    if tied and src.has(head):
        recipes.append(Recipe("lm_head.weight", (embedding, src.take(head)), (Tied(),)))
        notes.append(f"tied head: {head} must equal {embedding}; litgpt stores it as lm_head.weight")
    elif tied:
        recipes.append(Recipe("lm_head.weight", (embedding,)))
        notes.append(f"tied head: lm_head.weight is a copy of {embedding} (litgpt does not tie)")
    elif _read(config_json, family.normalized_head):
        recipes.append(Recipe("lm_head.weight", (src.take(head),), (NormalizeRows(),)))
        notes.append(f"{head}: rows normalised (the model normalises them at run time)")
    else:
        recipes.append(Recipe("lm_head.weight", (src.take(head),)))
    if family.lm_head_bias:
        recipes.append(Recipe(f"{names.HEAD}.bias", (src.take(f"{family.lm_head}.bias"),)))

    left = src.left_over(family.ignored)
    if left:
        raise _unknown(left, family, "Hugging Face checkpoint")
    skipped = sorted(set(src.all) - src.used)
    if skipped:
        notes.append(f"skipped {len(skipped)} non-weight buffers (e.g. {skipped[0]})")
    plan = Plan(recipes, {LITGPT_CONFIG: yaml.safe_dump(lit, sort_keys=False)}, notes)
    _check_outputs(plan, litgpt_state_names(lit, legacy=legacy), "Hugging Face -> litgpt")
    return plan


def plan_litgpt_to_hf(
    litgpt_cfg: Mapping[str, Any], litgpt_names: Iterable[str], config_json: Mapping[str, Any] | None = None
) -> Plan:
    """Recipes that turn a litgpt state dict (these names; `attn.qkv` or legacy `attn.attn`) into HF's.

    config_json is the config.json to write (the HF original, for an exact round trip); None makes
    one with hf_config_from_litgpt. It must compute the same model as litgpt_cfg, field for field.
    Where it ties the head to the embedding, lm_head.weight is not written and must equal
    transformer.wte.weight (checked when the plan runs). The plan carries config.json.
    """
    if config_json is None:
        config_json = hf_config_from_litgpt(litgpt_cfg)
    family = require_family(config_json)
    want, have = _forward_fields(litgpt_config_from_hf(config_json)), _forward_fields(litgpt_cfg)
    if want != have:
        diff = ", ".join(f"{k} {have[k]!r} vs {want[k]!r}" for k in want if want[k] != have[k])
        raise QkvconvError(f"config.json does not describe this litgpt model: {diff} (litgpt vs config.json)")
    _, heads = _heads(family, config_json)
    src = _Names(litgpt_names, "litgpt checkpoint")
    legacy = names.qkv_naming(src.all, "the litgpt checkpoint") == names.LEGACY_NAMING
    src_order, qkv_in = (QKVOrder.GROUPED, names.LEGACY_QKV) if legacy else (QKVOrder.SEQUENTIAL, names.QKV)
    expected = litgpt_state_names(litgpt_cfg, legacy=legacy)
    if set(src.all) != set(expected):
        extra = sorted(set(src.all) - set(expected))
        if extra:
            raise _unknown(extra, family, "litgpt checkpoint")
        missing = sorted(set(expected) - set(src.all))
        raise QkvconvError(f"the litgpt checkpoint lacks {', '.join(missing[:4])}, which its model_config.yaml implies")
    recipes: list[Recipe] = []
    n_expert = Architecture.from_litgpt_config(litgpt_cfg).n_expert

    def copy(lit_module: str, module: str) -> None:
        recipes.extend(Recipe(f"{module}.{p}", (f"{lit_module}.{p}",)) for p in src.params(lit_module))

    block = family.block
    assert isinstance(block, Block)
    for i in range(int(litgpt_cfg["n_layer"])):
        hf, lit = family.layer_prefix.format(i=i), names.layer(i)
        qkv = family.qkv
        for p in src.params(f"{lit}.{qkv_in}"):
            name = f"{lit}.{qkv_in}.{p}"
            if isinstance(qkv, Split):
                recipes.extend(
                    Recipe(f"{hf}.{m}.{p}", (name,), (TakePart(part, src_order, heads),))
                    for part, m in zip("qkv", (qkv.q, qkv.k, qkv.v))
                )
            else:
                assert isinstance(qkv, Fused)
                recipes.append(Recipe(f"{hf}.{qkv.name}.{p}", (name,), _reorder_steps(src_order, qkv.order, heads)))
        for module, lit_module in _layer_modules(family, block, n_expert).items():
            copy(f"{lit}.{lit_module}", f"{hf}.{module}")
        for module, lit_modules in family.fused_rows.items():
            for p in src.params(f"{lit}.{lit_modules[0]}"):
                inputs = tuple(src.take(f"{lit}.{m}.{p}") for m in lit_modules)
                recipes.append(Recipe(f"{hf}.{module}.{p}", inputs, (ConcatRows(),)))

    if family.norm_affine:
        copy(names.FINAL_NORM, family.final_norm)
    embedding = f"{family.embedding}.weight"
    notes = [_qkv_evidence(family, heads)]
    if _read(config_json, family.config.tie_embeddings):
        recipes.append(Recipe(embedding, (src.take("transformer.wte.weight"), src.take("lm_head.weight")), (Tied(),)))
        notes.append(f"tied head: {family.lm_head}.weight is not written (transformers ties it to {embedding})")
    else:
        recipes.append(Recipe(embedding, (src.take("transformer.wte.weight"),)))
        recipes.append(Recipe(f"{family.lm_head}.weight", (src.take("lm_head.weight"),)))
    if family.lm_head_bias:
        recipes.append(Recipe(f"{family.lm_head}.bias", (src.take(f"{names.HEAD}.bias"),)))
    left = src.left_over(())
    if left:
        raise _unknown(left, family, "litgpt checkpoint")
    # transformers' own order (embedding first, then the layers, final norm, head): tools that read
    # shards in order (litgpt's converter looks for the embedding early) expect it
    recipes.sort(key=lambda r: r.output != embedding)
    return Plan(recipes, {HF_CONFIG: json.dumps(dict(config_json), indent=2, sort_keys=True) + "\n"}, notes)
