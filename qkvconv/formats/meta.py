"""Meta's original Llama checkpoints (`consolidated.00.pth` + `params.json`) <-> litgpt: names as data.

    params = json.load(open("llama/params.json"))
    cfg = litgpt_config_from_params(params, shapes)    # shapes: tensor name -> shape of consolidated.00.pth
    plan = plan_meta_to_litgpt(params, names, shapes)  # Meta names -> litgpt names, rows left in pairs order
    back = plan_litgpt_to_meta(cfg, list(plan_outputs))  # litgpt -> Meta names; carries params.json

Meta's reference code (llama, llama3 `model.py`) names the tensors `tok_embeddings`, `layers.{i}.attention.
{wq,wk,wv,wo}`, `layers.{i}.feed_forward.{w1,w2,w3}` (w2(silu(w1(x)) * w3(x))), `layers.{i}.attention_norm`,
`layers.{i}.ffn_norm`, `norm`, `output`; no biases; RMSNorm. Its rotary turns each head's dims (2i, 2i+1)
together (`torch.view_as_complex(x.reshape(..., -1, 2))`): the "pairs" order, which litgpt computes with
`rope_interleave: true`. So litgpt configs made here say `rope_interleave: true`, and a model must be in
pairs order to be written in this format (transforms.set_rope). The FFN width is not stored: it is
`multiple_of` * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of). Model-parallel checkpoints
(consolidated.01.pth, ...) are refused: merge them into one file first.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.model.architecture import Architecture
from qkvconv.model import names as L  # litgpt's names
from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder
from qkvconv.formats.base import Source, TorchFileFormat, Transformations, file_list, rope_report, tensor_summary
from qkvconv.formats.litgpt.checkpoint import ModelShape
from qkvconv.model.rotary import RopeOrder
from qkvconv.plans.plan import Fuse, Plan, Recipe, TakePart
from qkvconv.plans.transforms import ModelPlan, compose

PARAMS = "params.json"
WEIGHTS = "consolidated.00.pth"
SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
LITGPT_NAME = "Llama (Meta consolidated)"
BLOCK_SIZE = 4096  # params.json has no context length; Meta's code takes max_seq_len at load time

# Meta module -> litgpt module; "{i}" is the layer
QKV = ("layers.{i}.attention.wq", "layers.{i}.attention.wk", "layers.{i}.attention.wv")
LAYER = {
    "layers.{i}.attention.wo": L.layer("{i}", L.ATTN_PROJ),
    "layers.{i}.feed_forward.w1": L.layer("{i}", L.MLP_FC_1),  # the activated one: silu(w1(x))
    "layers.{i}.feed_forward.w3": L.layer("{i}", L.MLP_FC_2),
    "layers.{i}.feed_forward.w2": L.layer("{i}", L.MLP_PROJ),
    "layers.{i}.attention_norm": L.layer("{i}", L.NORM_1),
    "layers.{i}.ffn_norm": L.layer("{i}", L.NORM_2),
}
GLOBAL = {"tok_embeddings": L.EMBEDDING, "norm": L.FINAL_NORM, "output": L.HEAD}
IGNORED = (re.compile(r"^rope\.freqs$"),)  # Llama 2 files carry the rotary frequencies as a buffer

# Meta's llama3 `apply_scaling` (Llama 3.1): these constants, with rope_scaling_factor /
# rope_high_freq_factor in params.json where a later release gives them.
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


def is_meta_dir(directory: Path) -> bool:
    return (directory / PARAMS).is_file() and any(SHARD.match(p.name) for p in directory.iterdir())


def weights_file(directory: Path) -> Path:
    """consolidated.00.pth; model-parallel checkpoints (several consolidated.NN.pth) are refused."""
    shards = sorted(p.name for p in directory.iterdir() if SHARD.match(p.name))
    if len(shards) > 1:
        raise QkvconvError(
            f"{directory} holds a model-parallel Meta checkpoint ({len(shards)} files: {', '.join(shards[:3])}...); "
            f"qkvconv reads single-file checkpoints only: merge the shards into one {WEIGHTS} first"
        )
    if shards != [WEIGHTS]:
        raise QkvconvError(f"{directory} has {PARAMS} but no {WEIGHTS}")
    return directory / WEIGHTS


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2 * 4 * dim / 3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, intermediate: int) -> tuple[int, float | None]:
    """multiple_of and ffn_dim_multiplier that give `intermediate` (Meta's own choices first)."""
    for multiple_of in (256, 1024, 4096, 128, 64, 32, 16, 8):
        if ffn_hidden_dim(dim, multiple_of, None) == intermediate:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    multiplier = None if base <= intermediate else intermediate / base
    if ffn_hidden_dim(dim, intermediate, multiplier) != intermediate:  # a float rounding pushed it below 1
        multiplier = (intermediate + 0.5) / base
    assert ffn_hidden_dim(dim, intermediate, multiplier) == intermediate
    return intermediate, multiplier


def _int(params: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = params.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise QkvconvError(f"{PARAMS}: {key} must be an integer, got {value!r}")
    return int(value)


def litgpt_config_from_params(params: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The litgpt Config fields of a Meta Llama checkpoint (rope_interleave: the pairs order)."""
    if not isinstance(params, Mapping):
        raise QkvconvError(f"{PARAMS} does not hold a mapping of settings")
    dim, n_layer, n_head = _int(params, "dim"), _int(params, "n_layers"), _int(params, "n_heads")
    n_kv = _int(params, "n_kv_heads", n_head)
    if dim % n_head:
        raise QkvconvError(f"{PARAMS}: dim {dim} is not a multiple of n_heads {n_head}")
    try:
        HeadLayout(n_head, n_kv, dim // n_head)
    except LayoutError as e:
        raise QkvconvError(f"{PARAMS}: invalid head configuration: {e}") from None
    embedding = shapes.get("tok_embeddings.weight")
    if embedding is None:
        raise QkvconvError(f"{WEIGHTS} has no tok_embeddings.weight")
    vocab = params.get("vocab_size")
    if vocab is None or vocab == -1:  # Llama 2: -1, the tokenizer's size
        vocab = embedding[0]
    if vocab != embedding[0]:
        raise QkvconvError(f"{PARAMS} says vocab_size {vocab}, but tok_embeddings.weight has {embedding[0]} rows")
    multiplier = params.get("ffn_dim_multiplier")
    intermediate = ffn_hidden_dim(dim, _int(params, "multiple_of", 256), multiplier)
    w1 = shapes.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and w1[0] != intermediate:
        raise QkvconvError(
            f"{PARAMS} (dim {dim}, multiple_of {params.get('multiple_of', 256)}, ffn_dim_multiplier {multiplier}) "
            f"gives a feed-forward width of {intermediate}, but layers.0.feed_forward.w1.weight has {w1[0]} rows"
        )
    adjustments = None
    if params.get("use_scaled_rope"):
        adjustments = {**LLAMA3_SCALING}
        if params.get("rope_scaling_factor") is not None:
            adjustments["factor"] = float(params["rope_scaling_factor"])
        if params.get("rope_high_freq_factor") is not None:
            adjustments["high_freq_factor"] = float(params["rope_high_freq_factor"])
    theta = float(params.get("rope_theta", 10000.0))  # Llama 2's code has no setting: 10000
    return {
        "name": LITGPT_NAME,
        "block_size": int(params.get("max_seq_len") or BLOCK_SIZE),
        "n_layer": n_layer,
        "n_embd": dim,
        "vocab_size": int(vocab),
        "padded_vocab_size": int(vocab),
        "norm_class_name": "RMSNorm",
        "norm_eps": float(params.get("norm_eps", 1e-5)),
        "parallel_residual": False,
        "shared_attention_norm": False,
        "n_head": n_head,
        "head_size": dim // n_head,
        "n_query_groups": n_kv,
        "bias": False,
        "attn_bias": False,
        "lm_head_bias": False,
        "rope_base": int(theta) if theta.is_integer() else theta,
        "rotary_percentage": 1.0,
        "rope_interleave": True,
        "rope_adjustments": adjustments,
        "intermediate_size": intermediate,
        "mlp_class_name": "LLaMAMLP",
        "gelu_approximate": "none",
        "scale_embeddings": False,
    }


def params_from_litgpt(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """params.json for a litgpt config, or UnsupportedFamily naming what Meta's Llama code cannot compute."""
    arch = Architecture.from_litgpt_config(cfg)
    problems = []
    if arch.norm_class_name != "RMSNorm" or arch.norm_unit_offset:
        problems.append("a norm other than plain RMSNorm")
    if arch.mlp_class_name != "LLaMAMLP":
        problems.append(f"the MLP {arch.mlp_class_name} (Meta's is SiLU-gated)")
    if arch.qkv_bias or arch.proj_bias or arch.lm_head_bias:
        problems.append("linear biases")
    if arch.parallel_residual:
        problems.append("a parallel residual")
    if arch.rope_n_elem != arch.head_size:
        problems.append("partial rotary")
    if arch.head_size * arch.n_head != arch.n_embd:
        problems.append(f"head_size {arch.head_size} other than n_embd / n_head")
    if any(arch.sliding_window_layers):
        problems.append("a sliding window")
    if arch.scale_embeddings or arch.attention_scale != 1.0 / math.sqrt(arch.head_size) or arch.rope_condense_ratio != 1:
        problems.append("scaled embeddings or attention, or condensed positions")
    if not arch.rope_interleave:
        problems.append("rotary in half order (Meta's code rotates pairs; convert with --rope pairs)")
    adjustments: dict[str, Any] = {}
    if arch.rope_scaling == "llama3":
        if arch.rope_low_freq_factor != 1.0 or arch.rope_original_max_seq_len != 8192:
            problems.append("Llama-3 RoPE scaling with low_freq_factor != 1 or original length != 8192")
        adjustments["use_scaled_rope"] = True
        if arch.rope_factor != LLAMA3_SCALING["factor"]:
            adjustments["rope_scaling_factor"] = arch.rope_factor
        if arch.rope_high_freq_factor != LLAMA3_SCALING["high_freq_factor"]:
            adjustments["rope_high_freq_factor"] = arch.rope_high_freq_factor
    elif arch.rope_scaling != "none":
        problems.append(f"{arch.rope_scaling} RoPE scaling")
    if problems:
        raise UnsupportedFamily(f"Meta's Llama format cannot express a model with {', '.join(problems)}")
    intermediate = int(cfg.get("intermediate_size") or 4 * arch.n_embd)
    multiple_of, multiplier = _ffn_params(arch.n_embd, intermediate)
    params: dict[str, Any] = {
        "dim": arch.n_embd,
        "n_layers": arch.n_layer,
        "n_heads": arch.n_head,
        "n_kv_heads": arch.n_query_groups,
        "vocab_size": arch.padded_vocab_size,
        "multiple_of": multiple_of,
        "norm_eps": arch.norm_eps,
    }
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    if float(arch.rope_base) != 10000.0:  # Llama 2's code takes no rope_theta (and rejects the key)
        params["rope_theta"] = float(arch.rope_base)
    return {**params, **adjustments}


def _layer(template: str, i: int) -> str:
    return template.format(i=i)


def plan_meta_to_litgpt(params: Mapping[str, Any], names: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> Plan:
    """Recipes from consolidated.00.pth names to litgpt's (wq, wk, wv fused into a sequential attn.qkv; rows
    stay in pairs order); a missing `output` means the head is the embedding. Unknown tensors are refused."""
    cfg = litgpt_config_from_params(params, shapes)
    heads = HeadLayout(cfg["n_head"], cfg["n_query_groups"], cfg["head_size"])
    present = set(names)
    used: set[str] = set()

    def take(name: str) -> str:
        if name not in present:
            raise QkvconvError(f"{WEIGHTS} has no tensor {name!r}, which {PARAMS} implies")
        used.add(name)
        return name

    recipes = [Recipe(f"{L.EMBEDDING}.weight", (take("tok_embeddings.weight"),))]
    for i in range(cfg["n_layer"]):
        recipes.append(Recipe(f"{L.layer(i, L.QKV)}.weight",
                              tuple(take(f"{_layer(m, i)}.weight") for m in QKV), (Fuse(QKVOrder.SEQUENTIAL, heads),)))
        recipes += [Recipe(f"{_layer(lit, i)}.weight", (take(f"{_layer(meta, i)}.weight"),)) for meta, lit in LAYER.items()]
    recipes.append(Recipe(f"{L.FINAL_NORM}.weight", (take("norm.weight"),)))
    notes = [f"Meta Llama: separate layers.{{i}}.attention.{{wq,wk,wv}} with rotary in pairs order "
             f"(H={heads.n_head}, G={heads.n_query_groups}, hs={heads.head_size})"]
    if "output.weight" in present:
        recipes.append(Recipe(f"{L.HEAD}.weight", (take("output.weight"),)))
    else:
        recipes.append(Recipe(f"{L.HEAD}.weight", ("tok_embeddings.weight",)))
        notes.append("no output.weight: the head is the token embedding (tied)")
    left = sorted(n for n in present - used if not any(p.search(n) for p in IGNORED))
    if left:
        raise UnsupportedFamily(
            f"{WEIGHTS} has tensors a Meta Llama does not have: {', '.join(left[:5])}; "
            "qkvconv converts only exactly what it can account for"
        )
    return Plan(recipes, notes=notes)


def plan_litgpt_to_meta(cfg: Mapping[str, Any], names: Iterable[str]) -> Plan:
    """Recipes from current litgpt names (sequential attn.qkv, rows in pairs order) to consolidated.00.pth;
    the plan carries params.json. Refuses what Meta's code cannot compute (params_from_litgpt)."""
    params = params_from_litgpt(cfg)
    heads = HeadLayout(params["n_heads"], params["n_kv_heads"], params["dim"] // params["n_heads"])
    present = set(names)
    expected = {f"{L.EMBEDDING}.weight", f"{L.FINAL_NORM}.weight", f"{L.HEAD}.weight"}
    recipes = [Recipe("tok_embeddings.weight", (f"{L.EMBEDDING}.weight",))]
    for i in range(params["n_layers"]):
        qkv = f"{L.layer(i, L.QKV)}.weight"
        expected.add(qkv)
        recipes += [Recipe(f"{_layer(m, i)}.weight", (qkv,), (TakePart(part, QKVOrder.SEQUENTIAL, heads),))
                    for part, m in zip("qkv", QKV)]
        for meta, lit in LAYER.items():
            expected.add(f"{_layer(lit, i)}.weight")
            recipes.append(Recipe(f"{_layer(meta, i)}.weight", (f"{_layer(lit, i)}.weight",)))
    recipes += [Recipe("norm.weight", (f"{L.FINAL_NORM}.weight",)), Recipe("output.weight", (f"{L.HEAD}.weight",))]
    if present != expected:
        odd = sorted(present ^ expected)
        raise UnsupportedFamily(f"Meta's Llama format has no place for (or needs) {', '.join(odd[:5])}")
    text = json.dumps(params, indent=2) + "\n"
    return Plan(recipes, {PARAMS: text}, [f"Meta Llama: {WEIGHTS} + {PARAMS}, rotary in pairs order"])

# ---------------------------------------------------------------------------------------------
# the registry's Format


def _read(directory: Path) -> tuple[dict[str, Any], Any, Plan, dict[str, Any]]:
    """params.json, the reader of consolidated.00.pth, the plan into litgpt names and the litgpt config."""
    from qkvconv.io.config_files import read_json
    from qkvconv.io.readers import open_reader

    params = read_json(directory / PARAMS)
    reader = open_reader(weights_file(directory))
    names = reader.names()
    shapes = {n: reader.meta(n).shape for n in names}
    return params, reader, plan_meta_to_litgpt(params, names, shapes), litgpt_config_from_params(params, shapes)


def _inspect(directory: Path) -> dict[str, Any]:
    """The report for Meta's original layout (consolidated.00.pth + params.json): separate wq/wk/wv,
    rotary in adjacent pairs."""
    _, reader, _, cfg = _read(directory)
    shape = ModelShape.from_config(cfg, directory / PARAMS)
    dtype, parameters = tensor_summary(reader)
    return {
        "source": str(directory), "format": "meta", "family": "llama", "model": LITGPT_NAME, "legacy": False,
        "naming": "attention.wq/wk/wv", "qkv_order": "split",
        "evidence": ["separate layers.{i}.attention.wq/wk/wv (Meta's original Llama code); Q/K rows in rotary "
                     "pairs order (dims 2i, 2i+1 rotate together)"],
        "n_layer": shape.n_layer, "n_head": shape.heads.n_head, "n_query_groups": shape.heads.n_query_groups,
        "head_size": shape.heads.head_size, "n_embd": shape.n_embd, "attention": shape.heads.attention,
        "rope": rope_report(cfg, "Meta's reference code rotates dims (2i, 2i+1) together (view_as_complex): pairs, "
                                 "every dim"),
        "lora": None, "dtype": dtype, "parameters": parameters,
        "files": file_list(directory),
        "notes": [],
    }


class Meta(TorchFileFormat):
    """Meta's consolidated.00.pth + params.json: split wq/wk/wv, rotary in pairs order only."""

    name = "meta"
    rope = RopeOrder.PAIRS
    rope_refusal = "Meta's Llama code rotates pairs of dims (2i, 2i + 1) only; for half write --to litgpt or --to hf"
    qkv = "split"
    qkv_refusal = ("Meta's Llama code has separate wq/wk/wv projections only; for one fused QKV matrix write --to "
                   "litgpt, or --to hf / --to peft with --qkv fused (Phi-3's qkv_proj for Llama-family models)")
    configs = (PARAMS,)
    weights_file = WEIGHTS

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        return _inspect(directory)

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        """Read through the plan: rows stay in pairs rotary order, which the config's rope_interleave says."""
        from qkvconv.formats.weights import PlannedWeights

        _, reader, plan, cfg = _read(source)
        return PlannedWeights(str(source), cfg, reader, {r.output: r for r in plan.recipes})

    def source(self, directory: Path) -> Source:
        _, reader, plan, cfg = _read(directory)
        model = ModelPlan(plan, cfg)
        model.notes.append(f"{PARAMS} gives no context length: block_size (HF max_position_embeddings) "
                           f"set to {model.config['block_size']}; it changes no weight")
        return Source(model, reader, None, "output.weight" not in reader.names())

    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        return compose(plan_litgpt_to_meta(model.config, model.outputs()), model.plan)

    def expressible(self, cfg: dict[str, Any], source_json: dict[str, Any] | None) -> None:
        params_from_litgpt({**cfg, "rope_interleave": True})


FORMAT = Meta()


__all__ = [
    "PARAMS",
    "WEIGHTS",
    "ffn_hidden_dim",
    "is_meta_dir",
    "litgpt_config_from_params",
    "params_from_litgpt",
    "plan_litgpt_to_meta",
    "plan_meta_to_litgpt",
    "weights_file",
    "FORMAT",
]
