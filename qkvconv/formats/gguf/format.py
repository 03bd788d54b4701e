"""The GGUF format in the registry: one `.gguf` file (llama.cpp's), read and written with ggml's `gguf`
package. Which rotary order it holds depends on the architecture (archs.py): pairs for llama.cpp's
NORM-rope architectures (Llama, Mistral), half for NEOX (Qwen2, Phi-3, Falcon, GPT-NeoX, Gemma).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.gguf.archs import rope_of
from qkvconv.model.rotary import RopeOrder
from qkvconv.formats.base import Format, Source, Transformations, rope_report
from qkvconv.formats.gguf.reading import TOLERANCES, GGUFFile, Tolerance, litgpt_config, plan_gguf_to_litgpt

if TYPE_CHECKING:
    from qkvconv.io.readers import TensorMeta
    from qkvconv.plans.plan import Plan
    from qkvconv.plans.transforms import ModelPlan

WEIGHTS = "model.gguf"  # the file written inside an --out directory
# types verify quantizes the reference into with gguf.quants (F16/BF16: rounds), rather than widening tolerances.
# Q8_0 only: llama.cpp quantizes it one way (its reference rounding, which gguf's quantizer reproduces: checked
# against llama.cpp's converter); Q4_0 and the others take an importance matrix in llama-quantize, which rounds
# differently, so a correct file could fail
REQUANTIZED = ("Q8_0",)


def requantize(tensor: Any, kind: str) -> Any:
    """`tensor` quantized to `kind` with gguf.quants and back to float32 (rows of whole blocks)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, quants

    if kind in ("F16", "BF16"):
        return tensor.detach().to(torch.float16 if kind == "F16" else torch.bfloat16).to(torch.float32)
    qtype = GGMLQuantizationType[kind]
    data = tensor.detach().to(torch.float32).numpy()
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(quants.quantize(data, qtype), qtype)))


def gguf_path(source: Path) -> Path:
    """The .gguf file of `source`: itself, or the one .gguf file of a directory."""
    if source.is_file():
        return source
    found = sorted(source.glob("*.gguf"))
    if len(found) != 1:
        raise QkvconvError(f"{source} holds {len(found)} .gguf files; name the file itself")
    return found[0]


def _open(source: Path) -> tuple[GGUFFile, dict[str, Any], Plan]:
    g = GGUFFile(gguf_path(source))
    cfg = litgpt_config(g)
    return g, cfg, plan_gguf_to_litgpt(g, cfg)


def inspect_gguf(source: Path) -> dict[str, Any]:
    """The inspect report: architecture, heads, QKV layout and rotary order (with the metadata keys that
    say so), tensor types and sizes."""
    from qkvconv.model.layout import HeadLayout

    g = GGUFFile(gguf_path(source))
    try:
        cfg = litgpt_config(g)
        plan_gguf_to_litgpt(g, cfg)
    except UnsupportedFamily as e:
        return _inspect_unmapped(g, str(e))
    arch = g.arch
    heads = HeadLayout(cfg["n_head"], cfg["n_query_groups"], cfg["head_size"])
    n_rot = round(cfg["rotary_percentage"] * cfg["head_size"])
    types, sizes = _types(g)
    kind = "NORM (adjacent pairs)" if arch.rope.value == "pairs" else "NEOX (dims i and i + n_rot/2)"
    qkv = ("separate attn_q / attn_k / attn_v" if arch.qkv == "split"
           else "one fused attn_qkv, rows sequential (Q heads, K heads, V heads)")
    positions = (f"llama.cpp rotates it with {kind} RoPE (llama_model_rope_type)" if arch.rotary else
                 f"no RoPE in llama.cpp's graph: {'ALiBi (max_bias 8)' if arch.alibi else 'learned positions'}"
                 f"{''.join(f', {m}' for m in arch.more_global.values())}")
    evidence = [
        f"general.architecture = {arch.name}: {positions}",
        f"{arch.name}.attention.head_count = {cfg['n_head']}, head_count_kv = {cfg['n_query_groups']}, "
        f"key_length = {cfg['head_size']}, rope.dimension_count = {n_rot}",
        f"{qkv}; {arch.where}",
    ]
    tokenizer = g.get("tokenizer.ggml.model")
    return {
        "source": str(g.path), "format": "gguf", "family": arch.name, "model": g.get("general.name"),
        "legacy": False, "naming": "blk.{i}.attn_q/attn_k/attn_v" if arch.qkv == "split" else "blk.{i}.attn_qkv",
        "qkv_order": "split" if arch.qkv == "split" else "sequential", "evidence": evidence,
        "n_layer": cfg["n_layer"], "n_head": heads.n_head, "n_query_groups": heads.n_query_groups,
        "head_size": heads.head_size, "n_embd": cfg["n_embd"], "attention": heads.attention, "lora": None,
        "dtype": next(iter(types)) if len(types) == 1 else types,
        "parameters": sum(types.values()),
        "files": [{"name": g.path.name, "bytes": g.path.stat().st_size}],
        "notes": [] if tokenizer else ["no tokenizer.ggml.model: llama.cpp cannot load this file"],
        "rope": rope_report(cfg, f"general.architecture = {arch.name} ({kind} in llama.cpp), {arch.name}.rope."
                            f"dimension_count = {n_rot} of head size {cfg['head_size']}") if arch.rotary else None,
        "architecture": arch.name,
        "tensor_types": {k: {"parameters": v, "bytes": sizes[k]} for k, v in types.items()},
        "tokenizer": tokenizer,
    }


def _types(g: GGUFFile) -> tuple[dict[str, int], dict[str, int]]:
    """Parameters and bytes per tensor type."""
    from collections import Counter

    types: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for name in g.names():
        t = g._tensor(name)
        types[g.type_name(name)] += int(t.n_elements)
        sizes[g.type_name(name)] += int(t.n_bytes)
    return dict(types.most_common()), dict(sizes)


def _inspect_unmapped(g: GGUFFile, why: str) -> dict[str, Any]:
    """What the metadata says of a GGUF qkvconv does not map (another architecture, or a setting it refuses):
    heads, QKV tensors and llama.cpp's rotary order for the architecture; verify and convert refuse it."""
    name = g.arch_name
    n_head, n_embd = g.key("attention.head_count"), g.key("embedding_length")
    n_kv = g.key("attention.head_count_kv", n_head)
    head_size = g.key("attention.key_length", n_embd // n_head if n_embd and isinstance(n_head, int) and n_head else None)
    qkv = ("blk.{i}.attn_qkv" if "blk.0.attn_qkv.weight" in g.names() else
           "blk.{i}.attn_q/attn_k/attn_v" if "blk.0.attn_q.weight" in g.names() else None)
    order = rope_of(name)
    n_rot = g.key("rope.dimension_count", head_size)
    types, sizes = _types(g)
    attention = None
    if isinstance(n_head, int) and isinstance(n_kv, int) and n_kv:
        attention = "MHA" if n_kv == n_head else "MQA" if n_kv == 1 else "GQA"
    kind = {None: "no RoPE (or chosen at run time)", RopeOrder.PAIRS: "NORM (adjacent pairs)",
            RopeOrder.HALF: "NEOX (dims i and i + n_rot/2)"}[order]
    return {
        "source": str(g.path), "format": "gguf", "family": name, "model": g.get("general.name"), "legacy": False,
        "naming": qkv, "qkv_order": None if qkv is None else "split" if "attn_q/" in qkv else "sequential",
        "evidence": [f"general.architecture = {name}: llama.cpp rotates it with {kind} RoPE (llama_model_rope_type)"],
        "n_layer": g.key("block_count"), "n_head": n_head, "n_query_groups": n_kv, "head_size": head_size,
        "n_embd": n_embd, "attention": attention, "lora": None,
        "dtype": next(iter(types)) if len(types) == 1 else types, "parameters": sum(types.values()),
        "files": [{"name": g.path.name, "bytes": g.path.stat().st_size}],
        "notes": [f"not supported for verify or convert: {why}"],
        "rope": None if order is None else {
            "order": order.value, "fraction": n_rot / head_size if n_rot and head_size else None,
            "evidence": f"general.architecture = {name} ({kind} in llama.cpp)"},
        "architecture": name,
        "tensor_types": {k: {"parameters": v, "bytes": sizes[k]} for k, v in types.items()},
        "tokenizer": g.get("tokenizer.ggml.model"),
    }


@dataclass
class GGUFWeights:
    """A GGUF file under litgpt names for the reference forward pass (formats/weights.py PlannedWeights'
    contract), with what verify must know about its storage: the tolerance its lossiest tensor type
    needs, and the config fields the file cannot record (which GELU: llama.cpp's own is tanh)."""

    description: str
    config: dict[str, Any]
    reader: GGUFFile
    recipes: dict[str, Any]
    storage: str = "F32"
    assumed: frozenset[str] = field(default_factory=frozenset)
    baked: frozenset[str] = field(default_factory=frozenset)  # config fields its weights hold (ops/verify.py _baked)

    def __post_init__(self) -> None:
        self._held: dict[str, Any] = {}  # a layer's stacked experts, read once for all its experts

    def _read(self, name: str) -> Any:
        if len(self.reader.shape(name)) < 3:
            return self.reader.read(name)
        if name not in self._held:
            self._held[name] = self.reader.read(name)
        return self._held[name]

    def __call__(self, name: str) -> Any:
        recipe = self.recipes[name]
        return recipe.apply([self._read(i) for i in recipe.inputs])

    def release(self) -> None:
        self._held.clear()
        self.reader.release()

    def dtype(self) -> Any:
        import torch

        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(self.storage, torch.float32)

    def quantized_as(self, name: str) -> str | None:
        """The quantized type every input of litgpt tensor `name` is stored in (Q8_0, ...), where gguf can
        also quantize it, else None. Quantization works on blocks inside each row, so the rows llama.cpp
        moved (fused, re-ordered, permuted for rotary) quantize the same as the reference's rows."""
        from gguf import GGMLQuantizationType, quants

        kinds = {self.reader.type_name(i) for i in self.recipes[name].inputs}
        if len(kinds) != 1 or (kind := kinds.pop()) == "F32":
            return None
        if kind in ("F16", "BF16"):
            return kind
        cls = getattr(quants, kind, None)
        implemented = cls is not None and "quantize_blocks" in vars(cls)
        return kind if kind in REQUANTIZED and implemented and hasattr(GGMLQuantizationType, kind) else None

    def tolerance(self, other_dtype: Any) -> Tolerance | None:
        """The stage tolerance this file's storage needs against a reference stored as `other_dtype`;
        None where the defaults hold (float types no narrower than the other side's)."""
        if self.storage in ("F32", "F16", "BF16") or self.storage in REQUANTIZED:
            return None  # verify rounds or quantizes the reference alike (verify._QuantizedAlike)
        known = TOLERANCES.get(self.storage)
        if known is None:
            raise QkvconvError(f"{self.description}: weights in {self.storage}, which qkvconv cannot quantize the "
                               "reference into as llama.cpp does (it does so for Q8_0, F16, BF16) and for which it has "
                               "no calibrated tolerance; pass --atol and --rtol to compare at yours")
        return known


def gguf_weights(source: Path) -> GGUFWeights:
    g, cfg, plan = _open(source)
    # GGUF records no activation: llama.cpp's is ggml's tanh GELU, whichever GELU the source computes
    assumed = frozenset({"gelu_approximate", "mlp_activation"}) if cfg["mlp_class_name"] in ("GptNeoxMLP", "GemmaMLP") \
        else frozenset()
    baked = frozenset({"embedding_scale", "logit_scale"}) if g.arch.baked_scales else frozenset()
    return GGUFWeights(str(g.path), cfg, g, {r.output: r for r in plan.recipes}, g.lossiest(), assumed, baked)


class GGUF(Format):
    name = "gguf"
    rope = None  # the architecture decides (archs.py)
    configs = ()
    holds_reference = True  # llama.cpp's gpt2, starcoder, bloom, mpt: learned positions, ALiBi (writing.choose_arch)

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        return inspect_gguf(directory)

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        return gguf_weights(source)

    def source(self, directory: Path) -> Source:
        from qkvconv.plans.transforms import ModelPlan

        from qkvconv.model.architecture import REFERENCE_DEFAULTS

        g, cfg, plan = _open(directory)
        beyond = sorted(k for k, v in REFERENCE_DEFAULTS.items() if k in cfg and cfg[k] != v)
        if beyond:
            raise UnsupportedFamily(f"{g.path}: llama.cpp's {g.arch.name} has {', '.join(beyond)}, which qkvconv does "
                                    "not convert out of a GGUF file (litgpt has none; it writes such models --to gguf "
                                    "from their HF sources only): verify reads it, convert does not")
        if g.lossiest() not in ("F32", "F16", "BF16"):
            raise QkvconvError(f"{g.path} holds {g.lossiest()} weights: converting them would not be exact "
                               "(qkvconv converts F32, F16 and BF16 files; verify compares quantized ones)")
        return Source(ModelPlan(plan, cfg), g, None, "output.weight" not in g.names())

    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        from qkvconv.formats.gguf.writing import plan_litgpt_to_gguf

        return plan_litgpt_to_gguf(model, source_json, changes)

    def expressible(self, cfg: dict[str, Any], source_json: dict[str, Any] | None) -> None:
        from qkvconv.formats.gguf.writing import choose_arch

        choose_arch(cfg, source_json)

    def files(self, layout: dict[str, TensorMeta], max_shard_size: int | None) -> dict[str, list[str]]:
        return {WEIGHTS: list(layout)}

    def writer(self, directory: Path, layout: dict[str, TensorMeta], max_shard_size: int | None,
               header: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
        from qkvconv.formats.gguf.writing import GGUFTensorWriter

        if header is None:
            raise QkvconvError("a GGUF file needs its metadata: the plan carries none")
        return GGUFTensorWriter(directory / WEIGHTS, layout, header)


FORMAT = GGUF()
