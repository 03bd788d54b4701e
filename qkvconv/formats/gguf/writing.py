"""Writing GGUF: litgpt names -> llama.cpp's, the metadata llama.cpp reads, and a streaming writer whose
header, key/values and tensor infos are written by gguf's GGUFWriter.

    arch = choose_arch(litgpt_cfg, config_json)          # refuses what no llama.cpp architecture computes
    plan = plan_litgpt_to_gguf(model, config_json, changes)   # Q/K put in the arch's rotary order; plan.header
    with GGUFTensorWriter(path, layout, plan.header) as w:    # tensors then written in any order (pwrite)
        ...

Norm weights and biases (1D) are written as F32 (as llama.cpp's converter does), matrices in the source's
F32, F16 or BF16. No tokenizer is converted: the file says `tokenizer.ggml.model = none`, which llama.cpp
loads as a model without a vocabulary (llama-vocab.cpp); add one with llama.cpp's tools to generate text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.base import Transformations
from qkvconv.formats.gguf.archs import (ARCHS, DENSE_MLP, EXPERTS, ROUTER, GGUFArch, bias_fits, for_family,
                                       for_layers, query_scalar, swa_layers)
from qkvconv.formats.gguf.reading import LLAMA3, AddConstant, llama3_factors
from qkvconv.model import names as L
from qkvconv.model.architecture import Architecture
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.plans.plan import CheckRows, Plan, Recipe, Step, TakePart


def choose_arch(cfg: dict[str, Any], source_json: dict[str, Any] | None) -> GGUFArch:
    """The llama.cpp architecture that computes this litgpt model (the one llama.cpp's converter picks for the
    source's HF class where there is one), or UnsupportedFamily saying what llama.cpp would compute otherwise."""
    arch_obj = Architecture.from_litgpt_config(cfg)
    hf = ((source_json or {}).get("architectures") or [None])[0]
    arch = next((a for a in ARCHS.values() if hf and hf in a.converter.split(", ")), None)
    if arch is not None and arch.name == "falcon" and not arch_obj.shared_attention_norm:
        from qkvconv.formats.gguf.archs import FALCON_40B

        arch = FALCON_40B
    if arch is not None and hf in arch.fused_converters:
        arch = replace(arch, qkv="fused")
    arch = arch or for_family(cfg)
    if arch is None:
        raise UnsupportedFamily("no llama.cpp architecture qkvconv writes computes this model (it writes "
                                f"{', '.join(ARCHS)})")
    arch = for_layers(arch, arch_obj.n_layer)
    problems = _window_problems(arch, arch_obj) + _position_problems(arch, arch_obj)
    if arch.rotary_layers and arch_obj.n_layer not in arch.rotary_layers:
        problems.append(f"{arch_obj.n_layer} layers ({arch.name} rotates only models of "
                        f"{' or '.join(map(str, arch.rotary_layers))} layers, and runs others without RoPE)")
    if arch.no_rope_step and arch_obj.n_layer >= arch.no_rope_step:
        problems.append(f"RoPE in every layer ({arch.name} leaves it out of every {arch.no_rope_step}th layer)")
    if arch.windows is None:
        if abs(arch_obj.attention_scale * arch_obj.head_size ** arch.qk_scale_power - 1) > 1e-9 and not arch.multipliers:
            problems.append("attention scores scaled other than by " + (
                "1/sqrt(head_size)" if arch.qk_scale_power == 0.5 else f"head_size ** -{arch.qk_scale_power:g}"))
    if arch_obj.norm_qk != arch.norm_qk:
        has = f"query/key norms of type {arch_obj.norm_qk}" if arch_obj.norm_qk else "no query/key norms"
        loads = f"norms of type {arch.norm_qk}" if arch.norm_qk else "none"
        span = f" in a model of {arch_obj.n_layer} layers, and per-head ones from {arch.qk_norm_layers} layers" \
            if arch.qk_norm_layers else ""
        problems.append(f"{has} ({arch.name} loads {loads}{span})")
    if arch.heads_span_embd and arch_obj.head_size * arch_obj.n_head != arch_obj.n_embd:
        problems.append(f"a head size other than n_embd / n_head ({arch.name} has no head_dim)")
    if arch.full_rotary and arch_obj.rope_n_elem != arch_obj.head_size:
        problems.append(f"partial rotary ({arch.name} rotates every dim of a head)")
    llama3 = arch_obj.rope_scaling == "llama3" and arch.name == "llama" and (
        arch_obj.rope_low_freq_factor, arch_obj.rope_high_freq_factor, arch_obj.rope_original_max_seq_len) == tuple(
        LLAMA3.values())
    if arch_obj.rope_scaling not in ("none", "linear") and not llama3:
        problems.append(f"{arch_obj.rope_scaling} RoPE scaling (llama3 is written for Llama with Llama 3.1's "
                        "low/high frequency factors 1 and 4 and original length 8192)")
    if not bias_fits(arch.experts, bool(arch_obj.n_expert)):
        problems.append("a mixture of experts" if arch_obj.n_expert else "a dense MLP")
    if arch_obj.norm_affine != arch.norm_weights:
        problems.append("norms without weights" if arch.norm_weights else
                        f"norms with weights ({arch.name}'s LayerNorms have none)")
    mlp = "LLaMAMLP" if arch_obj.mlp_class_name == "LLaMAMoE" else arch_obj.mlp_class_name
    if (arch_obj.norm_class_name, mlp) != (arch.norm_class_name, arch.mlp_class_name) or \
            arch_obj.scale_embeddings != arch.scale_embeddings or arch_obj.norm_unit_offset != bool(arch.norm_offset):
        problems.append(f"{arch_obj.norm_class_name}/{arch_obj.mlp_class_name} where llama.cpp's {arch.name} has "
                        f"{arch.norm_class_name}/{arch.mlp_class_name}")
    if arch_obj.lm_head_bias and arch.name != "phi2":
        problems.append("a bias on the head")
    if not bias_fits(arch.qkv_bias, arch_obj.qkv_bias) or not bias_fits(arch.proj_bias, arch_obj.proj_bias):
        problems.append(f"biases (q/k/v: {arch_obj.qkv_bias}, other linears: {arch_obj.proj_bias}) where llama.cpp's "
                        f"{arch.name} has q/k/v: {arch.qkv_bias}, others: {arch.proj_bias}")
    if problems:
        raise UnsupportedFamily(f"llama.cpp's {arch.name} cannot compute a model with {', '.join(problems)}: not "
                                "written, since the file would load and compute something else")
    return arch


def _window_problems(arch: GGUFArch, a: Architecture) -> list[str]:
    """What of the model's windows, local RoPE, Q scale and soft-capping llama.cpp's `arch` would compute
    otherwise (archs.Windows; without it: no window, no local base, no capping)."""
    w, problems = arch.windows, []
    windowed = any(a.sliding_window_layers) and a.sliding_window_size is not None
    layers = list(map(int, a.sliding_window_layers)) if windowed else [0] * a.n_layer
    local = list(map(int, a.rope_local_layers)) if a.rope_local_base is not None else [0] * a.n_layer
    if w is None:
        if windowed:
            problems.append(f"a sliding window ({arch.name} in llama.cpp attends to every earlier token)")
        if a.attention_logit_softcapping or a.final_logit_softcapping:
            problems.append("soft-capping")
        if any(local):
            problems.append(f"a local RoPE base on some layers ({arch.name} rotates every layer alike)")
        return problems
    if (windowed or w.size is not None) and layers != swa_layers(a.n_layer, w.period):
        problems.append(f"a sliding window on other layers than il % {w.period} < {w.period - 1} (those llama.cpp's "
                        f"{arch.name} slides)")
    if w.local_rope and local != layers:  # llama.cpp: rope.freq_base_swa, unscaled, on exactly the sliding layers
        problems.append(f"a local RoPE base on other layers than {arch.name}'s sliding ones")
    if not w.local_rope and any(local):
        problems.append(f"a local RoPE base on some layers ({arch.name} rotates every layer alike)")
    if any(local) and a.rope_condense_ratio != 1:
        problems.append("condensed positions on the local RoPE layers (llama.cpp scales the global ones only)")
    scalar = query_scalar(w, a.n_layer, a.n_embd, a.n_head, a.head_size)
    if abs(a.attention_scale * scalar ** 0.5 - 1) > 1e-9:
        problems.append(f"attention scores scaled other than by 1/sqrt({scalar}), llama.cpp's {arch.name} for "
                        f"{a.n_layer} layers (it has no query_pre_attn_scalar)")
    if (a.attention_logit_softcapping is None) != (w.attn_softcap is None):
        problems.append(f"{'no ' if w.attn_softcap is not None else ''}attention soft-capping (llama.cpp's "
                        f"{arch.name} {'always caps' if w.attn_softcap is not None else 'never caps'})")
    if a.final_logit_softcapping is None and w.final_softcap:
        problems.append(f"no final soft-capping (llama.cpp's {arch.name} always caps)")
    return problems


GELUS = ("gelu", "gelu_new", "gelu_bloom")  # the reference pass's GELUs: ggml's tanh GELU computes them (the note)


def _position_problems(arch: GGUFArch, a: Architecture) -> list[str]:
    """What of the reference pass's fields beyond litgpt's (model/architecture.py REFERENCE_DEFAULTS: learned
    positions, an embedding norm, ALiBi, QKV clamping, LayerNorms without bias, the MLP's own biases and
    activation) llama.cpp's `arch` would compute otherwise; a litgpt config leaves them at the defaults."""
    problems: list[str] = []
    if not arch.rotary and a.rope_n_elem:
        problems.append(f"RoPE ({arch.name} in llama.cpp has none)")
    for has, module, what in ((a.learned_positions, L.POSITION_EMBEDDING, "a learned position table"),
                              (a.embedding_norm, L.EMBEDDING_NORM, "a norm on the embeddings")):
        if has != (module in arch.more_global):
            problems.append(what if has else f"no {what.removeprefix('a ')} ({arch.name} has one)")
    if a.alibi not in ({arch.alibi, None} if arch.alibi_key else {arch.alibi}):
        problems.append(f"{a.alibi} ALiBi slopes" if a.alibi else f"no ALiBi ({arch.name} always adds it)")
    elif a.alibi and a.alibi_bias_max != 8:
        problems.append(f"ALiBi of max bias {a.alibi_bias_max:g} (llama.cpp's {arch.name} slopes are written for 8)")
    if a.clip_qkv is not None and "attention.clamp_kqv" not in arch.keys:
        problems.append("QKV clamping")
    if a.norm_class_name == "LayerNorm" and a.norm_affine and not bias_fits(arch.norm_bias, a.norm_bias):
        problems.append("LayerNorms without bias" if arch.norm_bias == "required" else
                        f"LayerNorms with a bias ({arch.name}'s have none)")
    if a.embedding_scale != 1.0 and not arch.baked_scales:
        problems.append(f"embeddings scaled by {a.embedding_scale:g}")
    if a.logit_scale != 1.0 and not (arch.logit_scale and a.logit_scale) and not arch.baked_scales:  # command-r:
        # scaled where nonzero; jais: multiplied into output
        problems.append(f"logits scaled by {a.logit_scale:g}" + (f" ({arch.name} reads a scale of 0 as none)"
                                                                  if arch.logit_scale else ""))
    if a.mlp_activation not in GELUS:
        problems.append(f"the MLP activation {a.mlp_activation}")
    if a.mlp_bias != a.proj_bias:
        problems.append("biases on the MLP and not on attention's output, or the reverse")
    if arch.one_kv_head and a.n_query_groups != 1:
        problems.append(f"{a.n_query_groups} K/V heads ({arch.name} takes one: multi-query only)")
    return problems


@dataclass(frozen=True)
class Constant(Step):
    """A tensor computed from the config alone (Llama 3's rope_freqs); its input only anchors it in the plan."""

    values: tuple[float, ...]
    what: str

    def apply(self, tensors: list[Any]) -> list[Any]:
        import torch

        return [torch.tensor(self.values, dtype=torch.float32)]

    def describe(self) -> str:
        return self.what

    def metas(self, inputs: list[Any]) -> list[Any]:
        import torch

        return [((len(self.values),), torch.float32)]


@dataclass(frozen=True)
class Times(Step):
    """A weight multiplied by a constant in its own dtype, as llama.cpp's converter bakes a scale into it (JAIS's
    `data_torch * self.embeddings_scale`)."""

    factor: float

    def apply(self, tensors: list[Any]) -> list[Any]:
        return [tensors[0] * self.factor]

    def describe(self) -> str:
        return f"times {self.factor:g}"

    def metas(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)


def _times(factor: float) -> tuple[Step, ...]:
    return (Times(factor),) if factor != 1.0 else ()


@dataclass(frozen=True)
class Stack(Step):
    """A layer's experts' matrices stacked along a new first dim, as llama.cpp holds them."""

    def apply(self, tensors: list[Any]) -> list[Any]:
        import torch

        return [torch.stack(tensors)]

    def describe(self) -> str:
        return "stack the experts"

    def metas(self, inputs: list[Any]) -> list[Any]:
        shapes = {shape for shape, _ in inputs}
        if len(shapes) != 1:
            raise ValueError(f"experts of different shapes: {sorted(shapes)}")
        (shape, dtype) = inputs[0]
        return [((len(inputs), *shape), dtype)]


def _gguf_recipes(arch: GGUFArch, cfg: dict[str, Any], outputs: set[str], tied: bool) -> list[Recipe]:
    """litgpt names -> GGUF names (q/k/v split or the sequential attn_qkv, Phi-3's gate and up fused, Gemma's
    norms as 1 + w, 1D tensors as float32)."""
    import torch

    from qkvconv.formats.hf.steps import ConcatRows, Tied

    a = Architecture.from_litgpt_config(cfg)
    heads = HeadLayout(a.n_head, a.n_query_groups, a.head_size)
    recipes: list[Recipe] = []

    def add(output: str, inputs: tuple[str, ...], steps: tuple[Step, ...] = ()) -> None:
        missing = [i for i in inputs if i not in outputs]
        if missing:
            raise QkvconvError(f"the model has no {missing[0]}, which llama.cpp's {arch.name} needs")
        vector = output.endswith(".bias") or "norm" in output
        recipes.append(Recipe(output, inputs, steps, torch.float32 if vector else None))

    def offset(module: str) -> tuple[Step, ...]:
        is_norm = "norm" in module or module == L.FINAL_NORM
        return (AddConstant(arch.norm_offset),) if arch.norm_offset and is_norm else ()

    baked = {"token_embd": a.embedding_scale, "output": a.logit_scale} if arch.baked_scales else {}
    add("token_embd.weight", (f"{L.EMBEDDING}.weight",), _times(baked.get("token_embd", 1.0)))
    for module, target in arch.more_global.items():  # GPT-2's position table, Bloom's embedding norm
        for p in ("weight", "bias"):
            if f"{module}.{p}" in outputs:
                add(f"{target}.{p}", (f"{module}.{p}",))
    for i in range(a.n_layer):
        lit = L.layer(i)
        for p in ("weight", "bias"):
            qkv = f"{lit}.{L.QKV}.{p}"
            if qkv not in outputs:
                continue
            if arch.qkv == "split":
                for part, module in zip("qkv", arch.qkv_modules(i)):
                    add(f"{module}.{p}", (qkv,), (TakePart(part, QKVOrder.SEQUENTIAL, heads),))
            else:
                add(f"{arch.qkv_modules(i)[0]}.{p}", (qkv,), (CheckRows(QKVOrder.SEQUENTIAL, heads),))
        if a.n_expert:
            add(f"{ROUTER.format(i=i)}.weight", (f"{lit}.{L.MOE_ROUTER}.weight",))
            for linear, stacked in EXPERTS.items():
                add(f"{stacked.format(i=i)}.weight", tuple(f"{lit}.{L.expert(e, linear)}.weight"
                                                           for e in range(a.n_expert)), (Stack(),))
        for module, target in arch.layer.items():
            if a.n_expert and module in DENSE_MLP:
                continue
            for p in ("weight", "bias"):
                if f"{lit}.{module}.{p}" in outputs:
                    add(f"{target.format(i=i)}.{p}", (f"{lit}.{module}.{p}",), offset(module) if p == "weight" else ())
        if arch.gate_up:
            for p in ("weight", "bias"):
                if f"{lit}.{L.MLP_FC_1}.{p}" in outputs:
                    add(f"blk.{i}.ffn_up.{p}", (f"{lit}.{L.MLP_FC_1}.{p}", f"{lit}.{L.MLP_FC_2}.{p}"), (ConcatRows(),))
    for p in ("weight", "bias"):
        if f"{L.FINAL_NORM}.{p}" in outputs:
            add(f"output_norm.{p}", (f"{L.FINAL_NORM}.{p}",), offset(L.FINAL_NORM) if p == "weight" else ())
    if a.rope_scaling == "llama3":  # llama.cpp divides frequency i by rope_freqs[i]
        factors = llama3_factors(float(a.rope_base), a.head_size, a.rope_factor, a.rope_low_freq_factor,
                                 a.rope_high_freq_factor, a.rope_original_max_seq_len)
        add("rope_freqs.weight", (f"{L.FINAL_NORM}.weight",), (Constant(tuple(factors), "Llama-3 RoPE factors"),))
    if arch.tied_only:  # no output tensor: the head must be the embedding (checked as the plan runs)
        recipes[0] = Recipe("token_embd.weight", (f"{L.EMBEDDING}.weight", f"{L.HEAD}.weight"), (Tied(),))
    elif not tied or f"{L.HEAD}.bias" in outputs or arch.output_required:  # tied: no output tensor, as
        # llama.cpp's converter writes it, where llama.cpp loads the file without one
        add("output.weight", (f"{L.HEAD}.weight",), _times(baked.get("output", 1.0)))
        if f"{L.HEAD}.bias" in outputs:
            add("output.bias", (f"{L.HEAD}.bias",))
    return recipes


def header(arch: GGUFArch, cfg: dict[str, Any], file_type: int) -> dict[str, tuple[str, Any]]:
    """The metadata llama.cpp reads for this architecture: key -> (GGUFWriter's add_* kind, value)."""
    a = Architecture.from_litgpt_config(cfg)
    k = arch.name
    out: dict[str, tuple[str, Any]] = {
        "general.name": ("string", str(cfg.get("name") or arch.label)),
        "general.file_type": ("uint32", file_type),
        f"{k}.context_length": ("uint32", int(cfg.get("block_size") or 4096)),
        f"{k}.embedding_length": ("uint32", a.n_embd),
        f"{k}.block_count": ("uint32", a.n_layer),
        f"{k}.feed_forward_length": ("uint32", int(cfg.get("intermediate_size") or 4 * a.n_embd) * arch.ffn_scale),
        **({f"{k}.expert_count": ("uint32", a.n_expert), f"{k}.expert_used_count": ("uint32", a.n_expert_per_token)}
           if a.n_expert else {}),
        **({f"{k}.expert_feed_forward_length": ("uint32", int(cfg.get("moe_intermediate_size") or 0))}
           if a.n_expert and cfg.get("moe_intermediate_size") else {}),
        f"{k}.attention.head_count": ("uint32", a.n_head),
        f"{k}.attention.head_count_kv": ("uint32", a.n_query_groups),
        f"{k}.attention.key_length": ("uint32", a.head_size),
        f"{k}.attention.value_length": ("uint32", a.head_size),
        f"{k}.rope.dimension_count": ("uint32", a.rope_n_elem),
        f"{k}.rope.freq_base": ("float32", float(a.rope_base)),
        f"{k}.{arch.eps_key}": ("float32", float(a.norm_eps)),
        "tokenizer.ggml.model": ("string", "none"),
    }
    if not arch.rotary or not arch.head_keys:  # what its converter writes: no key/value lengths (n_embd / n_head)
        for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):  # nor rope keys
            del out[f"{k}.{key}"]
    if not arch.rotary:
        del out[f"{k}.rope.freq_base"]
    if not arch.kv_key:  # llama.cpp takes n_head
        del out[f"{k}.attention.head_count_kv"]
    if arch.alibi_key:  # as choose_arch checked: absent or the slopes of max bias 8
        out[f"{k}.attention.max_alibi_bias"] = ("float32", 8.0 if a.alibi else 0.0)
    if a.clip_qkv is not None or arch.clamp_required:  # as choose_arch checked: the architecture reads it
        out[f"{k}.attention.clamp_kqv"] = ("float32", float(a.clip_qkv or 0.0))
    if k == "llama":
        out[f"{k}.vocab_size"] = ("uint32", a.padded_vocab_size)
    if k == "falcon":  # llama.cpp's converter marks its sequential attn_qkv so (ggml's Falcon example)
        out[f"{k}.tensor_data_layout"] = ("string", "jploski")
    if arch.parallel_residual_key:
        out[f"{k}.{arch.parallel_residual_key}"] = ("bool", a.parallel_residual)
    if arch.windows is not None:  # as choose_arch checked: the layers are llama.cpp's
        if arch.windows.attn_softcap is not None:
            out[f"{k}.attn_logit_softcapping"] = ("float32", float(a.attention_logit_softcapping or 0.0))
        if a.final_logit_softcapping:
            out[f"{k}.final_logit_softcapping"] = ("float32", float(a.final_logit_softcapping))
        if any(a.sliding_window_layers) and a.sliding_window_size is not None:
            out[f"{k}.attention.sliding_window"] = ("uint32", int(a.sliding_window_size))
            if arch.windows.local_rope:
                out[f"{k}.rope.freq_base_swa"] = ("float32", float(a.rope_local_base or 0.0))
    if arch.logit_scale:  # command-r: the logits times it (choose_arch refused 0, which llama.cpp reads as 1)
        out[f"{k}.logit_scale"] = ("float32", float(a.logit_scale))
        out[f"{k}.rope.scaling.type"] = ("string", "none")  # as its converter writes
    if arch.multipliers:  # Granite's, neutral but for the attention scale (what its converter writes of defaults)
        out[f"{k}.attention.scale"] = ("float32", float(a.attention_scale))
        for key in ("embedding_scale", "residual_scale", "logit_scale"):
            out[f"{k}.{key}"] = ("float32", 1.0)
    factor = a.rope_factor if a.rope_scaling == "linear" else (a.rope_condense_ratio if a.rope_condense_ratio != 1 else None)
    if factor is not None:
        out[f"{k}.rope.scaling.type"] = ("string", "linear")
        out[f"{k}.rope.scaling.factor"] = ("float32", float(factor))
    return out


def plan_litgpt_to_gguf(model: Any, source_json: dict[str, Any] | None, changes: Transformations) -> Plan:
    """The pivot model as a GGUF of the architecture llama.cpp computes it with: Q/K rows put in that
    architecture's rotary order (pairs for llama: the permutation llama.cpp's converter makes)."""
    from qkvconv.plans.transforms import compose, set_rope

    arch = choose_arch(model.config, source_json)
    if changes.rope is not None and changes.rope is not arch.rope:
        raise QkvconvError(f"--rope {changes.rope.value} with --to gguf: llama.cpp's {arch.name} " +
                           (f"rotates {arch.rope.value} order only" if arch.rotary else "has no RoPE"))
    if changes.qkv is not None:
        raise QkvconvError(f"--qkv with --to gguf: llama.cpp's {arch.name} fixes the QKV projection ({arch.qkv})")
    source_rope = model.rope_order
    if arch.rotary:  # without RoPE (gpt2, baichuan's 13B) the Q/K rows stay in the source's order
        model = set_rope(model, arch.rope)
    outputs = set(model.outputs())
    tied = _tied(model)
    inner = model.plan
    recipes = _gguf_recipes(arch, model.config, outputs, tied)
    plan = compose(Plan(recipes), inner)
    file_type = 0  # set by the writer from the tensors' dtypes
    notes = [f"GGUF architecture {arch.name} (" + (f"{arch.rope.value} rotary in llama.cpp)" if arch.rotary else
                                                   "no RoPE in llama.cpp)")]
    if source_rope is not arch.rope and arch.rotary:
        notes.append(f"Q/K rows permuted {source_rope.value} -> {arch.rope.value}, as llama.cpp's converter does")
    if arch.mlp_class_name in ("GptNeoxMLP", "GemmaMLP") and model.config.get("gelu_approximate", "none") != "tanh":
        notes.append("llama.cpp computes this GELU with the tanh approximation (the file cannot say otherwise): "
                     "its run differs from the source by that approximation")
    notes.append("no tokenizer converted: tokenizer.ggml.model = none")
    if tied or arch.tied_only:  # the pivot's notes speak of litgpt's lm_head.weight: say what the file holds
        plan.notes = [n for n in plan.notes if not n.startswith("tied head:")]
        output = any(r.output == "output.weight" for r in recipes)
        notes.append("tied head: " + (f"written as output.weight too (llama.cpp's {arch.name} requires it)" if output
                                      else f"token_embd only (llama.cpp's {arch.name} takes the head from it)"))
    plan.notes = list(dict.fromkeys(plan.notes + notes))
    plan.header = {"arch": arch.name, "keys": header(arch, model.config, file_type)}
    return plan


def _tied(model: Any) -> bool:
    """Whether lm_head is made of the embedding (the pivot plan copies it: same input, no steps)."""
    made = {r.output: r for r in model.plan.recipes}
    head, emb = made.get(f"{L.HEAD}.weight"), made.get(f"{L.EMBEDDING}.weight")
    return head is not None and emb is not None and head.inputs == emb.inputs and head.steps == emb.steps


class GGUFTensorWriter:
    """A GGUF file written through gguf's GGUFWriter (header, metadata, tensor infos), then each tensor
    with pwrite at its offset, in whatever order the engine hands them over; removed on failure."""

    def __init__(self, path: Path, layout: dict[str, Any], header: dict[str, Any]) -> None:
        self.path, self.layout, self.header = path, layout, header
        self.fd: int | None = None
        self.offsets: dict[str, int] = {}
        self.end = 0

    def __enter__(self) -> GGUFTensorWriter:
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

        dtypes = {m.dtype for m in self.layout.values() if len(m.shape) > 1}
        file_type = {frozenset({torch.float16}): LlamaFileType.MOSTLY_F16,
                     frozenset({torch.bfloat16}): LlamaFileType.MOSTLY_BF16}.get(frozenset(dtypes), LlamaFileType.ALL_F32)
        writer = GGUFWriter(self.path, self.header["arch"])
        for key, (kind, value) in self.header["keys"].items():
            if key == "general.file_type":
                value = int(file_type)
            getattr(writer, f"add_{kind}")(key, value)
        for name, meta in self.layout.items():
            if meta.dtype == torch.bfloat16:
                writer.add_tensor_info(name, meta.shape, np.dtype(np.uint16), meta.nbytes, raw_dtype=GGMLQuantizationType.BF16)
            elif meta.dtype in (torch.float32, torch.float16):
                writer.add_tensor_info(name, meta.shape, np.dtype(str(meta.dtype).removeprefix("torch.")), meta.nbytes)
            else:
                raise QkvconvError(f"{name} is {meta.dtype}: GGUF output holds float32, float16 and bfloat16 only")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        start = GGUFWriter.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
        writer.close()
        offset = 0
        for name, meta in self.layout.items():
            self.offsets[name] = start + offset
            offset += GGUFWriter.ggml_pad(meta.nbytes, writer.data_alignment)
        self.end = start + offset
        self.fd = os.open(self.path, os.O_WRONLY)
        return self

    def write(self, name: str, tensor: Any) -> None:
        from qkvconv.io.readers import byte_view

        meta = self.layout[name]
        if tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
            raise QkvconvError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {meta.shape} {meta.dtype}")
        data = byte_view(tensor.detach().contiguous())
        assert self.fd is not None
        written = 0
        while written < len(data):
            written += os.pwrite(self.fd, data[written:], self.offsets[name] + written)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.fd is not None:
            if exc_type is None:
                os.ftruncate(self.fd, self.end)
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
        if exc_type is not None:
            self.path.unlink(missing_ok=True)
