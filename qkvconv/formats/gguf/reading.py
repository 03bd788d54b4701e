"""Reading a GGUF file with ggml's own `gguf` package: tensors one at a time, the litgpt config its
metadata implies, and the plan from llama.cpp's tensor names back to litgpt's.

    gguf_file = GGUFFile(Path("model.gguf"))        # gguf.GGUFReader: the file is memory-mapped
    arch = gguf_file.arch                           # archs.GGUFArch, e.g. llama (rotary in pairs order)
    cfg = litgpt_config(gguf_file)                  # litgpt Config fields: heads, eps, rope, biases, ...
    plan = plan_gguf_to_litgpt(gguf_file)           # recipes: attn_q/k/v fused, Gemma's 1 + w undone

Q and K stay in the order llama.cpp rotates them (pairs for NORM-rope architectures, whose converter
permuted them): the config says so with `rope_interleave`, so the reference forward pass computes what
llama.cpp computes, and a wrong permutation in any layer shows in that layer's output. ggml lists dims
innermost first; the reader's arrays are already in torch's order. Quantized tensors are dequantized
with gguf.quants.dequantize to float32; their error is judged with the tolerance of their type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.gguf.archs import (DENSE_MLP, EXPERTS, ROUTER, GGUFArch, Windows, query_scalar, resolve,
                                       swa_layers)
from qkvconv.model import names as L
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.plans.plan import CheckRows, Fuse, Plan, Recipe, Step

MAGIC = b"GGUF"
FLOAT_TYPES = ("F32", "F16", "BF16")


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Tolerance:
    """How far a model stored in a lossy tensor type may be from its float source at each forward-pass
    stage (atol + rtol * the stage's scale), and why."""

    atol: float
    rtol: float
    why: str


# Lossy types other than Q8_0 (K-quants, Q4_0, ...) would need a tolerance instead of verify's quantize-alike
# comparison (format.py REQUANTIZED); none is calibrated (no file of those types can be made here without
# llama.cpp's C++ quantizer), so verify asks for --atol/--rtol there (dequantized with gguf.quants).
TOLERANCES: dict[str, Tolerance] = {}


class GGUFFile:
    """One GGUF file as a TensorReader (io/readers.py): names, metas, tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise QkvconvError(f"cannot read {path} as GGUF: {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        name = self.get("general.architecture")
        if not isinstance(name, str):
            raise QkvconvError(f"{path} has no general.architecture")
        self.arch_name = name
        self._arch: GGUFArch | None = None

    @property
    def arch(self) -> GGUFArch:
        """The architecture as qkvconv maps it (archs.py); UnsupportedFamily where it does not."""
        if self._arch is None:
            self._arch = resolve(self.arch_name, self._tensors, int(self.key("block_count", 0)))
        return self._arch

    # metadata
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value; a float32 value as the shortest decimal that rounds to it (1e-06, not
        9.99999997e-07): GGUF stores config floats in 32 bits."""
        import numpy as np
        from gguf import GGUFValueType

        field = self._reader.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            return float(str(np.float32(value)))
        return value

    def key(self, suffix: str, default: Any = None) -> Any:
        """An architecture key: `{general.architecture}.{suffix}`."""
        return self.get(f"{self.arch_name}.{suffix}", default)

    def keys(self) -> list[str]:
        return list(self._reader.fields)

    # tensors (TensorReader)
    def names(self) -> list[str]:
        return list(self._tensors)

    def type_name(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def _tensor(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise QkvconvError(f"{self.path} has no tensor {name!r}")
        return t

    def meta(self, name: str) -> Any:
        import torch

        from qkvconv.plans.plan import TensorMeta

        kind = self.type_name(name)
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)
        return TensorMeta(self.shape(name), dtype)

    def read(self, name: str) -> Any:
        import numpy as np
        import torch

        t, kind = self._tensor(name), self.type_name(name)
        shape = self.shape(name)
        if kind in FLOAT_TYPES:
            data = np.array(t.data, copy=True).reshape(-1)
            out = torch.from_numpy(data)
            if kind == "BF16":  # the reader hands BF16 over as its raw 16 bits
                out = out.view(torch.bfloat16)
            return out.reshape(shape)
        from gguf import quants

        try:
            data = quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise QkvconvError(f"{self.path}: gguf cannot dequantize {name} ({kind})") from None
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)

    def peek(self, name: str) -> Any:
        return self.read(name)

    def raw(self, name: str) -> Any:
        """Float tensors' bytes as stored (little-endian files on a little-endian machine)."""
        import sys

        from qkvconv.io.readers import RawBytes

        t = self._tensor(name)
        if self.type_name(name) not in FLOAT_TYPES or sys.byteorder != "little" or self._reader.endianess.name != "LITTLE":
            return None
        return RawBytes(self.path, int(t.data_offset), int(t.n_bytes))

    def release(self) -> None:
        """The file is memory-mapped by numpy; read tensors are copies."""

    def files(self) -> list[Path]:
        return [self.path]

    # what verify needs to know of the storage
    def lossiest(self) -> str:
        """The least precise tensor type of the weight matrices (2D tensors), e.g. Q8_0, F16 or F32."""
        order = {"F32": 0, "F16": 1, "BF16": 2}
        kinds = {self.type_name(n) for n in self._tensors if len(self.shape(n)) > 1}
        return max(kinds, key=lambda k: order.get(k, 3 if k in TOLERANCES else 4), default="F32")


# ---------------------------------------------------------------------------------------------
# metadata -> litgpt config


def _require(g: GGUFFile, suffix: str) -> Any:
    """A key llama.cpp requires for this architecture (llama_model_loader::get_key throws without it)."""
    value = g.key(suffix)
    if value is None:
        other = {"attention.layer_norm_rms_epsilon": "attention.layer_norm_epsilon"}.get(suffix)
        found = f" (it has {g.arch.name}.{other}, which llama.cpp's {g.arch.name} does not read)" if (
            other and g.key(other) is not None) else ""
        raise QkvconvError(f"{g.path} has no {g.arch.name}.{suffix}{found}: llama.cpp refuses to load it")
    return value


# `{arch}.*` keys this reader accounts for: any other (soft-capping, clamping, attention or embedding
# scales, YaRN, experts, ...) may change what llama.cpp computes, so a file holding one is refused rather
# than verified as something it is not. sliding_window: read where llama.cpp uses it (archs.Windows: Gemma 2
# and 3), ignored by the others; rope.scaling.original_context_length matters to YaRN/LongRoPE only.
KNOWN_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon", "attention.sliding_window",
    "rope.dimension_count", "rope.freq_base", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "use_parallel_residual", "tensor_data_layout",
    "expert_count", "expert_used_count", "expert_feed_forward_length",
})


def litgpt_config(g: GGUFFile) -> dict[str, Any]:
    """The litgpt Config fields of the model as llama.cpp runs it (`rope_interleave` for NORM rope)."""
    arch, names = g.arch, set(g.names())
    prefix = f"{arch.name}."
    unknown = sorted(k[len(prefix):] for k in g.keys()
                     if k.startswith(prefix) and k[len(prefix):] not in KNOWN_KEYS | arch.keys)
    if unknown:
        raise UnsupportedFamily(f"{g.path} sets {', '.join(prefix + k for k in unknown[:3])}, which qkvconv's GGUF "
                                "reader does not map: refused rather than read as a model it may not be")
    n_embd, n_layer, n_head = (int(_require(g, k)) for k in ("embedding_length", "block_count", "attention.head_count"))
    extra = [m.format(i=i) for m in arch.unloaded for i in range(n_layer) if m.format(i=i) in names]
    if extra:
        raise UnsupportedFamily(f"{g.path} has {extra[0]}, which llama.cpp's {arch.name} does not load (it refuses the "
                                "file)")
    if arch.rotary_layers and n_layer not in arch.rotary_layers:
        raise UnsupportedFamily(f"{g.path}: llama.cpp's {arch.name} rotates only models of "
                                f"{' or '.join(map(str, arch.rotary_layers))} layers; it runs this one of {n_layer} "
                                "without RoPE, which its source does not compute")
    if arch.no_rope_step and n_layer >= arch.no_rope_step:
        raise UnsupportedFamily(f"{g.path}: llama.cpp's {arch.name} runs every {arch.no_rope_step}th layer without "
                                "RoPE, which litgpt cannot compute (it rotates in every layer)")
    n_kv = int(g.key("attention.head_count_kv", n_head))
    head_size = int(g.key("attention.key_length", n_embd // n_head))
    if int(g.key("attention.value_length", head_size)) != head_size:
        raise UnsupportedFamily(f"{g.path}: value heads of another size than key heads, which litgpt has not")
    n_rot = int(g.key("rope.dimension_count", head_size)) if arch.rotary else 0
    if arch.full_rotary and n_rot != head_size or arch.heads_span_embd and head_size * n_head != n_embd:
        raise UnsupportedFamily(f"{g.path}: rope.dimension_count {n_rot}, heads {n_head} x {head_size} for n_embd "
                                f"{n_embd}, which llama.cpp's {arch.name} does not load")
    vocab = g.shape("token_embd.weight")[0]
    theta = float(g.key("rope.freq_base", 10000.0))
    # llama.cpp scales every frequency by 1 / rope.scaling.factor unless the type is YaRN-like (llama-model.cpp
    # load_hparams: the type defaults to linear)
    scaling, factor = g.key("rope.scaling.type", "linear"), g.key("rope.scaling.factor")
    adjustments = None
    if scaling not in ("linear", "none"):
        raise UnsupportedFamily(f"{g.path} uses {scaling} RoPE scaling, which qkvconv's GGUF reader does not map")
    if factor not in (None, 0.0, 1.0):
        adjustments = {"factor": float(factor)}
    if "rope_freqs.weight" in names:
        if adjustments:
            raise UnsupportedFamily(f"{g.path} has both rope_freqs and rope.scaling.factor")
        adjustments = llama3_scaling(g, theta, head_size)
    moe = "blk.0.ffn_gate_inp.weight" in names
    if moe and arch.experts == "none" or not moe and arch.experts == "required":
        raise UnsupportedFamily(f"{g.path}: {'experts' if moe else 'no experts'} in a {arch.name} file")
    up = g.shape("blk.0.ffn_up_exps.weight")[1] if moe else g.shape("blk.0.ffn_up.weight")[0]
    _check_widths(g, n_embd, int(g.shape("token_embd.weight")[1]), "expert_feed_forward_length" if moe
                  else "feed_forward_length", up if moe or not arch.gate_up else up // 2)
    qkv_bias = any(f"{m}.bias" in names for m in arch.qkv_modules(0))
    proj_bias = "blk.0.attn_output.bias" in names
    parallel = arch.parallel_residual
    if arch.parallel_residual_key:
        parallel = bool(g.key(arch.parallel_residual_key, True))
    cfg: dict[str, Any] = {
        "name": arch.label,
        "block_size": int(g.key("context_length", 4096)),
        "n_layer": n_layer,
        "n_embd": n_embd,
        "vocab_size": vocab,
        "padded_vocab_size": vocab,
        "norm_class_name": arch.norm_class_name,
        "norm_eps": float(_require(g, arch.eps_key)),
        "parallel_residual": parallel,
        "shared_attention_norm": arch.shared_attention_norm,
        "n_head": n_head,
        "head_size": head_size,
        "n_query_groups": n_kv,
        "bias": proj_bias,
        "attn_bias": qkv_bias and not proj_bias,
        "lm_head_bias": "output.bias" in names,
        "rotary_percentage": n_rot / head_size,
        "rope_base": int(theta) if theta.is_integer() else theta,
        "rope_interleave": arch.rope.value == "pairs",
        "rope_adjustments": adjustments,
        "intermediate_size": up // 2 if arch.gate_up else up,
        "mlp_class_name": arch.mlp_class_name,
        "gelu_approximate": arch.gelu if arch.mlp_class_name in ("GptNeoxMLP", "GemmaMLP") else "none",
        "scale_embeddings": arch.scale_embeddings,
        "norm_qk": arch.norm_qk is not None,
        "norm_qk_type": arch.norm_qk or "default",
        "norm_1": arch.norm_1,
        "norm_2": L.NORM_2 in arch.layer or arch.shared_attention_norm or not arch.norm_weights,
        "post_attention_norm": L.POST_ATTENTION_NORM in arch.layer,
        "post_mlp_norm": L.POST_MLP_NORM in arch.layer,
        # beyond litgpt: how the graph takes positions where not by RoPE (archs.GGUFArch.more_global, alibi)
        "learned_positions": L.POSITION_EMBEDDING in arch.more_global,
        "embedding_norm": L.EMBEDDING_NORM in arch.more_global,
        "alibi": arch.alibi,
        "norm_bias": arch.norm_class_name != "LayerNorm" or not arch.norm_weights or "output_norm.bias" in names,
    }
    if arch.alibi_key:
        cfg.update(positions_by_keys(g, arch))
    if arch.qk_scale_power != 0.5 and not arch.windows:  # jais: 1/head_size (muP); its scales are in the weights
        cfg["attention_scale"] = head_size ** -arch.qk_scale_power
    if "attention.clamp_kqv" in arch.keys:  # > 0: QKV clamped to it (llama-graph.cpp build_qkv; MPT, DBRX)
        clamp = float(g.key("attention.clamp_kqv", 0.0))
        cfg["clip_qkv"] = clamp if clamp > 0 else None
    if moe:
        cfg.update(mlp_class_name="LLaMAMoE", moe_intermediate_size=up, n_expert=int(_require(g, "expert_count")),
                   n_expert_per_token=int(_require(g, "expert_used_count")))
    if arch.multipliers:
        cfg.update(granite_scales(g, head_size))
    if arch.logit_scale:  # command-r.cpp: `if (f_logit_scale) cur = ggml_scale(cur, f_logit_scale)` (default 0)
        cfg["logit_scale"] = float(g.key("logit_scale", 0.0)) or 1.0
    if arch.windows:
        cfg.update(windows_config(g, arch.windows, n_layer, n_embd, n_head, head_size))
    return cfg


def _check_widths(g: GGUFFile, n_embd: int, embd_columns: int, ffn_key: str, ffn: int) -> None:
    """llama.cpp sizes every tensor from these keys and refuses to load a file whose tensors differ
    (llama-model.cpp create_tensors, check_tensor_dims): such a file computes nothing, so it is refused here
    too rather than verified. (llama.cpp's own converter writes phi2's feed_forward_length as 4 * n_embd
    whatever the model's width: a Phi-2 of another width converts to a file llama.cpp cannot load.)"""
    width = g.key(ffn_key)
    ffn *= g.arch.ffn_scale
    if embd_columns != n_embd or width is not None and int(width) != ffn:
        said = (f"{g.arch.name}.embedding_length {n_embd} but token_embd has {embd_columns} columns"
                if embd_columns != n_embd else f"{g.arch.name}.{ffn_key} {int(width)} but the tensors are {ffn} wide")
        raise QkvconvError(f"{g.path}: {said}; llama.cpp refuses to load such a file (check_tensor_dims)")


def windows_config(g: GGUFFile, w: Windows, n_layer: int, n_embd: int, n_head: int, head_size: int) -> dict[str, Any]:
    """The litgpt fields of llama.cpp's Gemma 2 / 3 attention as the file sets it (archs.Windows): the window
    and its layers, the sliding layers' own RoPE base (litgpt's rope_local_base_freq and rope_indices, which
    litgpt, like llama.cpp, leaves unscaled), Q's scale and the soft-capping."""
    out: dict[str, Any] = {"attention_scores_scalar": query_scalar(w, n_layer, n_embd, n_head, head_size),
                           "final_logit_softcapping": g.key("final_logit_softcapping", w.final_softcap) or None}
    if w.attn_softcap is not None:
        out["attention_logit_softcapping"] = g.key("attn_logit_softcapping", w.attn_softcap)
    size = g.key("attention.sliding_window", w.size)
    if size:  # else no window (gemma3): every layer global
        pattern = g.key("attention.sliding_window_pattern", w.period)
        if not isinstance(pattern, int):
            raise UnsupportedFamily(f"{g.path}: a per-layer sliding_window_pattern, which qkvconv does not map")
        layers = swa_layers(n_layer, pattern)
        out.update(sliding_window_size=int(size), sliding_window_indices=layers)
        if w.local_rope:
            base = float(g.key("rope.freq_base_swa", 10000.0))  # llama-hparams.h rope_freq_base_train_swa
            out.update(rope_local_base_freq=int(base) if base.is_integer() else base, rope_indices=layers)
    return out


def positions_by_keys(g: GGUFFile, arch: GGUFArch) -> dict[str, Any]:
    """MPT's ALiBi as the file sets it: attention.max_alibi_bias 0 (or absent) is no ALiBi, 8 the
    slopes of `arch.alibi` (ggml_soft_max_ext's for max_bias 8 are the schemes' of reference/alibi.py); other
    values give slopes the reference pass does not compute, refused."""
    bias_max = float(g.key("attention.max_alibi_bias", 0.0))
    if bias_max not in (0.0, 8.0):
        raise UnsupportedFamily(f"{g.path}: {arch.name}.attention.max_alibi_bias {bias_max:g}: ALiBi slopes other than "
                                "max_bias 8's, which qkvconv's reference pass does not compute")
    return {"alibi": arch.alibi if bias_max else None}


def granite_scales(g: GGUFFile, head_size: int) -> dict[str, Any]:
    """Granite's multipliers where litgpt computes them: residual and logit scales neutral (1; residual 0 or
    absent: not applied), embedding scale 1 (or 0/absent), attention.scale 1/sqrt of an integer (0/absent:
    1/sqrt(head_size)), which is litgpt's attention_scores_scalar. Anything else is refused."""
    logit, residual, embedding = g.key("logit_scale"), g.key("residual_scale"), g.key("embedding_scale")
    if logit != 1.0 or residual not in (None, 0.0, 1.0) or embedding not in (None, 0.0, 1.0):
        raise UnsupportedFamily(f"{g.path}: Granite scales (logit {logit}, residual {residual}, embedding "
                                f"{embedding}) other than neutral, which litgpt does not compute")
    scale = g.key("attention.scale")
    if not scale:
        return {}
    scalar = 1.0 / float(scale) ** 2
    if abs(scalar - round(scalar)) > 1e-6 * scalar:
        raise UnsupportedFamily(f"{g.path}: attention.scale {scale} is not 1/sqrt of an integer, which litgpt's "
                                "attention_scores_scalar needs")
    return {} if round(scalar) == head_size else {"attention_scores_scalar": round(scalar)}


# Llama 3.1/3.2's RoPE scaling as its config.json gives it (rope_scaling: low_freq_factor 1, high_freq_factor 4,
# original_max_position_embeddings 8192; factor 8 for 3.1, 32 for 3.2)
LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


def llama3_factors(base: float, head_size: int, factor: float, low: float, high: float, original: int) -> list[float]:
    """The per-frequency divisors llama.cpp stores as rope_freqs for Llama-3 RoPE scaling, computed as its
    converter does (conversion/llama.py LlamaModel.generate_extra_tensors; the graph divides frequency i
    by factor i), which is litgpt's llama3 rope_adjustments."""
    import math

    import torch

    freqs = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs:  # 0-d float32 tensors, as the converter iterates: its arithmetic is float32's
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return out


def llama3_scaling(g: GGUFFile, base: float, head_size: int) -> dict[str, Any] | None:
    """rope_freqs read back as litgpt's llama3 rope_adjustments: the Llama 3.1/3.2 settings (its largest factor,
    LLAMA3) when they give exactly these factors, else refused: other settings could give the same
    factors, and the file keeps no more than the factors."""
    stored = g.read("rope_freqs.weight").double().tolist()
    factor = max(stored)
    if all(f == 1.0 for f in stored):  # every frequency divided by 1: no scaling
        return None
    want = llama3_factors(base, head_size, factor, LLAMA3["low_freq_factor"], LLAMA3["high_freq_factor"],
                          LLAMA3["original_max_seq_len"])
    if len(want) != len(stored) or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(stored, want)):
        raise UnsupportedFamily(f"{g.path}: its rope_freqs are not Llama 3.1/3.2's scaling (low_freq_factor 1, "
                                "high_freq_factor 4, original length 8192) of any factor; qkvconv maps only those")
    return {"factor": factor, **LLAMA3}


# ---------------------------------------------------------------------------------------------
# GGUF names -> litgpt names


@dataclass(frozen=True)
class AddConstant(Step):
    """t + value, in float32 (or wider): undoes (or makes) llama.cpp's 1 + w of Gemma's norm weights."""

    value: float

    def apply(self, tensors: list[Any]) -> list[Any]:
        import torch

        (t,) = tensors
        wide = torch.promote_types(t.dtype, torch.float32)
        return [(t.to(wide) + self.value).to(t.dtype)]

    def describe(self) -> str:
        return f"add {self.value:g}"

    def metas(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)


@dataclass(frozen=True)
class TakeExpert(Step):
    """Expert e's matrix out of llama.cpp's stack of a layer's experts (its first dim)."""

    index: int

    def apply(self, tensors: list[Any]) -> list[Any]:
        (t,) = tensors
        return [t[self.index].contiguous()]

    def describe(self) -> str:
        return f"expert {self.index} of the stack"

    def metas(self, inputs: list[Any]) -> list[Any]:
        ((shape, dtype),) = inputs
        if len(shape) != 3 or self.index >= shape[0]:
            raise ValueError(f"no expert {self.index} in a stack of shape {shape}")
        return [(shape[1:], dtype)]


def _check_qkv_rows(g: GGUFFile, modules: tuple[str, ...], heads: HeadLayout) -> None:
    """The q/k/v tensors as wide as the head counts make them, as llama.cpp checks on loading (check_tensor_dims):
    e.g. a multi-head GPT-BigCode's 3 * n_embd rows, which its converter writes with head_count_kv 1."""
    q, kv = heads.n_head * heads.head_size, heads.n_query_groups * heads.head_size
    want = (q, kv, kv) if len(modules) == 3 else (q + 2 * kv,)
    for module, rows in zip(modules, want):
        name = f"{module}.weight"
        if name in g.names() and g.shape(name)[0] != rows:
            raise QkvconvError(f"{g.path}: {name} has {g.shape(name)[0]} rows where {heads.n_head} heads and "
                               f"{heads.n_query_groups} K/V heads of {heads.head_size} make {rows}; llama.cpp refuses "
                               "to load such a file (check_tensor_dims)")


def plan_gguf_to_litgpt(g: GGUFFile, cfg: dict[str, Any] | None = None) -> Plan:
    """Recipes from the GGUF file's tensors to litgpt's (q/k/v fused in sequential order, fused attn_qkv
    checked against the heads, Phi-3's ffn_up split into gate and up, Gemma's norms back to w). A tensor
    the architecture does not account for is refused; a missing `output` means the head is token_embd."""
    from qkvconv.formats.hf.steps import TakeRows

    cfg = cfg or litgpt_config(g)
    arch = g.arch
    heads = HeadLayout(cfg["n_head"], cfg["n_query_groups"], cfg["head_size"])
    present = set(g.names())
    used: set[str] = {"rope_freqs.weight"} & present  # read into the config (llama3_scaling)

    def take(name: str) -> str:
        if name not in present:
            raise QkvconvError(f"{g.path} has no tensor {name!r}, which its {arch.name} metadata implies")
        used.add(name)
        return name

    def params(module: str) -> list[str]:
        return ["weight"] + (["bias"] if f"{module}.bias" in present else [])

    def norm_steps(litgpt_module: str) -> tuple[Step, ...]:
        is_norm = "norm" in litgpt_module or litgpt_module == L.FINAL_NORM
        return (AddConstant(-arch.norm_offset),) if arch.norm_offset and is_norm else ()

    recipes = [Recipe(f"{L.EMBEDDING}.weight", (take("token_embd.weight"),))]
    for module, source in arch.more_global.items():  # GPT-2's position table, Bloom's embedding norm
        recipes += [Recipe(f"{module}.{p}", (take(f"{source}.{p}"),)) for p in params(source)]
    for i in range(cfg["n_layer"]):
        lit = L.layer(i)
        qkv = arch.qkv_modules(i)
        _check_qkv_rows(g, qkv, heads)
        for p in params(qkv[0]):
            if len(qkv) == 3:
                recipes.append(Recipe(f"{lit}.{L.QKV}.{p}", tuple(take(f"{m}.{p}") for m in qkv),
                                      (Fuse(QKVOrder.SEQUENTIAL, heads),)))
            else:
                recipes.append(Recipe(f"{lit}.{L.QKV}.{p}", (take(f"{qkv[0]}.{p}"),),
                                      (CheckRows(QKVOrder.SEQUENTIAL, heads),)))
        moe = cfg.get("mlp_class_name") == "LLaMAMoE"
        if moe:
            recipes.append(Recipe(f"{lit}.{L.MOE_ROUTER}.weight", (take(ROUTER.format(i=i) + ".weight"),)))
            for linear, stacked in EXPERTS.items():
                source = take(stacked.format(i=i) + ".weight")
                recipes += [Recipe(f"{lit}.{L.expert(e, linear)}.weight", (source,), (TakeExpert(e),))
                            for e in range(cfg["n_expert"])]
        for module in arch.layer:
            if moe and module in DENSE_MLP:
                continue
            source = arch.module(module, i)
            for p in params(source):
                steps = norm_steps(module) if p == "weight" else ()
                recipes.append(Recipe(f"{lit}.{module}.{p}", (take(f"{source}.{p}"),), steps))
        if arch.gate_up:
            for p in params(f"blk.{i}.ffn_up"):
                up = take(f"blk.{i}.ffn_up.{p}")
                recipes += [Recipe(f"{lit}.{L.MLP_FC_1}.{p}", (up,), (TakeRows(0, 2),)),
                            Recipe(f"{lit}.{L.MLP_FC_2}.{p}", (up,), (TakeRows(1, 2),))]
    for p in params("output_norm") if arch.norm_weights else ():
        recipes.append(Recipe(f"{L.FINAL_NORM}.{p}", (take(f"output_norm.{p}"),),
                              norm_steps(L.FINAL_NORM) if p == "weight" else ()))
    notes = [f"GGUF {arch.name}: {arch.where}"]
    if arch.tied_only and "output.weight" in present:  # llama.cpp loads token_embd as the head, and no `output`
        raise UnsupportedFamily(f"{g.path} has output.weight, which llama.cpp's {arch.name} does not load (its head is "
                                "token_embd): it refuses the file")
    if "output.weight" in present:
        recipes += [Recipe(f"{L.HEAD}.{p}", (take(f"output.{p}"),)) for p in params("output")]
    else:
        recipes.append(Recipe(f"{L.HEAD}.weight", ("token_embd.weight",)))
        notes.append("no output.weight: the head is token_embd (tied)")
    left = sorted(present - used)
    if left:
        raise UnsupportedFamily(f"{g.path} has tensors a {arch.name} model as qkvconv reads it does not have: "
                                f"{', '.join(left[:5])}; qkvconv reads only what it can account for")
    return Plan(recipes, notes=notes)


__all__ = ["GGUFFile", "TOLERANCES", "Tolerance", "AddConstant", "is_gguf", "litgpt_config", "plan_gguf_to_litgpt"]
