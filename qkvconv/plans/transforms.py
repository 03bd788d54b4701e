"""Exact weight transformations, as rewrites of a conversion plan: rotary order, GQA expansion, norm folding.

    model = ModelPlan(plan_hf_to_litgpt(config_json, names), litgpt_config_from_hf(config_json))
    model = fold_norms(model)                         # norm gains (and LayerNorm biases) into the linears
    model = expand_kv_heads(model, 32)                # GQA -> MHA: each K/V head repeated for its queries
    model = set_rope(model, RopeOrder.PAIRS)          # Q/K rows inside each head: half -> pairs
    target = compose(plan_litgpt_to_hf(model.config, model.outputs(), cfg_json), model.plan)

A `ModelPlan` is a plan whose outputs are current litgpt tensor names (sequential `attn.qkv`), with
the litgpt config those tensors mean. Every transformation takes one and returns a new one: it adds
steps to recipes, or makes new recipes whose inputs are the old recipes' inputs (`combine`), so any
number of transformations still read each source tensor once and stream through the same engine
(engine.py) into any output format (`compose` with a litgpt -> target plan). Nothing here reads a file.

Exactness: re-ordering and repeating rows is exact; folding a norm gain into a linear (W' = W * g) is
exact in exact arithmetic and differs by float rounding (one rounding of each product).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from qkvconv.errors import QkvconvError
from qkvconv.model.architecture import Architecture
from qkvconv.model import names
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.plans.plan import Labels, Meta, Plan, Recipe, Step, take
from qkvconv.model.rotary import RopeOrder, head_permutation, rope_permutation

QKV_OUTPUT = re.compile(r"^transformer\.h\.(\d+)\.attn\.qkv\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# steps


@dataclass(frozen=True, eq=False)
class RowIndex(Step):
    """Rows taken by an index (``out = t[index]``): permutations (rotary order) and repeats (K/V heads)."""

    moves_rows = True

    index: torch.Tensor
    what: str  # for the plan: "rotary half -> pairs"

    def _check(self, rows: int) -> None:
        if self.index.numel() and int(self.index.max()) >= rows:
            raise ValueError(f"{self.what}: the index reaches past the tensor's {rows} rows")

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        self._check(t.shape[0])
        return [t.index_select(0, self.index)]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        (t,) = inputs
        return [take(t, self.index.tolist())]

    def describe(self) -> str:
        return self.what

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        self._check(shape[0])
        return [((self.index.numel(), *shape[1:]), dtype)]


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: float32, or the tensor's own when it is wider."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_gain(gain: tuple[int, ...], weight: tuple[int, ...]) -> None:
    if gain != weight[1:]:
        raise ValueError(f"a gain of shape {gain} cannot scale the columns of {weight}")


@dataclass(frozen=True)
class ScaleColumns(Step):
    """[weight (out, in), gain (in,)] -> weight * (offset + gain) along the input columns, in float32
    (or wider), rounded once to the weight's dtype. offset 1: Gemma's (1 + weight) RMSNorm."""

    offset: float = 0.0

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        weight, gain = tensors
        _check_gain(tuple(gain.shape), tuple(weight.shape))
        wide = _wide(weight)
        return [(weight.to(wide) * (self.offset + gain.to(wide))).to(weight.dtype)]

    def describe(self) -> str:
        return "scale columns by (1 + norm gain)" if self.offset else "scale columns by the norm gain"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        (shape, dtype), (gain, _) = inputs
        _check_gain(gain, shape)
        return [(shape, dtype)]


@dataclass(frozen=True)
class FoldBias(Step):
    """[weight, (bias,) beta] -> bias + weight @ beta, summed in float64, rounded once: a LayerNorm bias
    moved into the linear it feeds (weight is the linear's weight before its columns are scaled)."""

    rows_at_once: int = 4096  # bounds the float64 copy of the weight (a 128k-row head: 4096 rows at a time)

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        weight, *bias, beta = tensors
        beta64 = beta.to(torch.float64)
        if weight.is_meta:
            folded = torch.empty(weight.shape[0], dtype=torch.float64, device="meta")
        else:
            folded = torch.cat([w.to(torch.float64) @ beta64 for w in weight.split(self.rows_at_once)])  # (out,)
        if bias:
            folded = folded + bias[0].to(torch.float64)
        dtype = bias[0].dtype if bias else weight.dtype
        return [folded.to(dtype)]

    def describe(self) -> str:
        return "bias + weight @ norm bias"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        (shape, dtype), *bias, (beta, _) = inputs
        if len(shape) != 2 or beta != shape[1:] or any(b != shape[:1] for b, _ in bias):
            raise ValueError(f"cannot fold a norm bias of shape {beta} into a linear of shape {shape}")
        return [(shape[:1], bias[0][1] if bias else dtype)]


@dataclass(frozen=True)
class Fill(Step):
    """A tensor of the input's shape and dtype, every element `value` (a folded norm's gain or bias)."""

    value: float

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        return [torch.full_like(t, self.value)]

    def describe(self) -> str:
        return f"fill with {self.value:g}"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        return [(shape, dtype)]


@dataclass(frozen=True)
class ZeroBias(Step):
    """[weight (out, in)] -> zeros (out,): a bias the new config requires where the source had none."""

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (weight,) = tensors
        return [torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)]

    def describe(self) -> str:
        return "zero bias (one per output row)"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        return [(shape[:1], dtype)]


@dataclass(frozen=True)
class Inline(Step):
    """Run several recipes side by side: the inputs are theirs, concatenated in order; the outputs one
    tensor per recipe. It lets a new recipe start from what earlier recipes would have written."""

    parts: tuple[Recipe, ...]

    @property
    def moves_rows(self) -> bool:  # type: ignore[override]
        return all(part.dtype is None and all(step.moves_rows for step in part.steps) for part in self.parts)

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out, start = [], 0
        for part in self.parts:
            n = len(part.inputs)
            out.append(part.apply(tensors[start:start + n]))
            start += n
        if start != len(tensors):
            raise ValueError(f"{len(tensors)} inputs for parts that take {start}")
        return out

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        out, start = [], 0
        for part in self.parts:
            n = len(part.inputs)
            out.append(part.labels(inputs[start:start + n]))
            start += n
        return out

    def describe(self) -> str:
        return "; ".join(f"[{p.output}: {'; '.join(s.describe() for s in p.steps) or 'copy'}]" for p in self.parts)

    def metas(self, inputs: list[Meta]) -> list[Meta] | None:
        out, start = [], 0
        for part in self.parts:
            n = len(part.inputs)
            meta = part.meta(inputs[start:start + n])
            if meta is None:
                return None
            out.append(meta)
            start += n
        if start != len(inputs):
            raise ValueError(f"{len(inputs)} inputs for parts that take {start}")
        return out


def _is_copy(recipe: Recipe) -> bool:
    return not recipe.steps and recipe.dtype is None and len(recipe.inputs) == 1


def combine(output: str, parts: Sequence[Recipe], *steps: Step) -> Recipe:
    """A recipe for `output` that runs `steps` on what `parts` make (their inputs read once each)."""
    if all(_is_copy(p) for p in parts):
        return Recipe(output, tuple(p.inputs[0] for p in parts), tuple(steps))
    inputs = tuple(i for p in parts for i in p.inputs)
    return Recipe(output, inputs, (Inline(tuple(parts)), *steps))


def then(recipe: Recipe, *steps: Step) -> Recipe:
    """The same recipe with more steps at the end."""
    if recipe.dtype is not None:
        return combine(recipe.output, [recipe], *steps)
    return replace(recipe, steps=recipe.steps + tuple(steps))


def compose(outer: Plan, inner: Plan) -> Plan:
    """outer's recipes read inner's outputs; the result reads inner's inputs (source -> target in one plan)."""
    made = {r.output: r for r in inner.recipes}
    recipes = []
    for r in outer.recipes:
        missing = [i for i in r.inputs if i not in made]
        if missing:
            raise QkvconvError(f"{r.output} needs {missing[0]}, which nothing makes")
        recipes.append(replace(combine(r.output, [made[i] for i in r.inputs], *r.steps), dtype=r.dtype))
    notes = list(dict.fromkeys(inner.notes + outer.notes))  # both may describe the same layout
    return Plan(recipes, dict(outer.texts), notes, dict(outer.header))


# ---------------------------------------------------------------------------------------------
# the model a plan makes


@dataclass
class ModelPlan:
    """Recipes whose outputs are current litgpt names (sequential `attn.qkv`), and their litgpt config."""

    plan: Plan
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what the transformations did (and did not do)

    def outputs(self) -> list[str]:
        return [r.output for r in self.plan.recipes]

    @property
    def architecture(self) -> Architecture:
        return Architecture.from_litgpt_config(self.config)

    @property
    def heads(self) -> HeadLayout:
        a = self.architecture
        return HeadLayout(a.n_head, a.n_query_groups, a.head_size)

    @property
    def rope_order(self) -> RopeOrder:
        return RopeOrder.PAIRS if self.config.get("rope_interleave") else RopeOrder.HALF

    def with_qkv_rows(self, step: Step) -> list[Recipe]:
        """The recipes with `step` appended to every attn.qkv weight and bias."""
        return [then(r, step) if QKV_OUTPUT.match(r.output) else r for r in self.plan.recipes]


def _rebuilt(model: ModelPlan, recipes: list[Recipe], config: dict[str, Any], note: str) -> ModelPlan:
    plan = Plan(recipes, dict(model.plan.texts), list(model.plan.notes))
    return ModelPlan(plan, config, model.notes + [note])


# ---------------------------------------------------------------------------------------------
# rotary order


def set_rope(model: ModelPlan, order: RopeOrder) -> ModelPlan:
    """Q and K rows of every head put in rotary order `order` (only the first rope_n_elem rows of a head
    when the rotary is partial); litgpt's `rope_interleave` says which order the model computes with."""
    src = model.rope_order
    if src == order:
        return model
    arch = model.architecture
    _refuse_per_head_norms(arch, f"rotary order {src.value} -> {order.value}")
    index = rope_permutation(QKVOrder.SEQUENTIAL, model.heads, arch.rope_n_elem, src, order)
    step = RowIndex(index, f"rotary {src.value} -> {order.value} (Q and K heads, first {arch.rope_n_elem} dims)")
    config = {**model.config}
    if order is RopeOrder.PAIRS:
        config["rope_interleave"] = True
    elif "rope_interleave" in config:
        config["rope_interleave"] = False
    partial = f", the first {arch.rope_n_elem} of {arch.head_size} dims of each head" if arch.rope_n_elem < arch.head_size else ""
    recipes = model.with_qkv_rows(step)
    also = ""
    if arch.norm_qk:  # laid out by a head's dims (shared by the heads, or per head): they move as its rows
        per_head = head_permutation(arch.head_size, arch.rope_n_elem, src, order)
        steps = {part: RowIndex(_per_head(per_head, arch.head_size, count if arch.norm_qk == "olmo2" else 1),
                                f"rotary {src.value} -> {order.value} (the {part} norm's dims, as each head's)")
                 for part, count in (("q", arch.n_head), ("k", arch.n_query_groups))}
        recipes = [then(r, steps[m.group(1)]) if (m := names.QK_NORM_KEY.match(r.output)) else r for r in recipes]
        also = "; the query/key norm weights permuted alike"
    return _rebuilt(model, recipes, config,
                    f"rotary order {src.value} -> {order.value}: Q and K rows permuted inside each head{partial}{also} "
                    "(exact)")


# ---------------------------------------------------------------------------------------------
# key/value heads


def _refuse_per_head_norms(arch: Architecture, change: str) -> None:
    """Query/key norms with a weight per head (Cohere's use_qk_norm) are never re-ordered: only GGUF holds them,
    in the pairs order and heads they come with."""
    if arch.norm_qk == "per_head":
        raise QkvconvError(f"{change} with a query/key norm weight per head (Cohere's use_qk_norm): qkvconv does not "
                           "re-order those; convert without the change")


def _per_head(index: torch.Tensor, head_size: int, heads: int) -> torch.Tensor:
    """`index` (over one head's rows) applied to each of `heads` consecutive heads."""
    return (torch.arange(heads).unsqueeze(1) * head_size + index.unsqueeze(0)).flatten()


def kv_repeat_index(heads: HeadLayout, n_kv: int) -> torch.Tensor:
    """Row index over sequential (Q, K, V) rows giving each of the G key/value heads n_kv / G times in a
    row, so that n_kv heads serve the H query heads in groups of H / n_kv exactly as before."""
    H, G, hs = heads.n_head, heads.n_query_groups, heads.head_size
    repeat = n_kv // G
    old_head = torch.arange(n_kv).repeat_interleave(hs) // repeat  # the old K/V head of each new row
    dim = torch.arange(n_kv * hs) % hs
    q = torch.arange(H * hs)
    k = H * hs + old_head * hs + dim
    v = (H + G) * hs + old_head * hs + dim
    return torch.cat([q, k, v])


def expand_kv_heads(model: ModelPlan, n_kv: int) -> ModelPlan:
    """G key/value heads -> n_kv (G divides n_kv, n_kv divides H; H: MHA) by repetition: exact. The KV
    cache grows by n_kv / G. Fewer heads than the source has is refused: merging heads changes the model."""
    heads = model.heads
    H, G = heads.n_head, heads.n_query_groups
    if n_kv == G:
        return model
    _refuse_per_head_norms(model.architecture, f"key/value heads {G} -> {n_kv}")
    if n_kv < G:
        raise QkvconvError(
            f"--kv-heads {n_kv} is fewer than the source's {G} key/value heads: merging heads (mean-pooling, as "
            "in GQA up-training) changes what the model computes and needs training afterwards; qkvconv only "
            "makes exact transformations (it can repeat heads: --kv-heads N with N a multiple of "
            f"{G} that divides {H})"
        )
    if n_kv > H or H % n_kv or n_kv % G:
        raise QkvconvError(
            f"--kv-heads {n_kv}: with {H} query heads and {G} key/value heads, N must be a multiple of {G} that "
            f"divides {H} (each key/value head repeated N/{G} times; {H} is multi-head attention)"
        )
    step = RowIndex(kv_repeat_index(heads, n_kv), f"key/value heads {G} -> {n_kv} (each repeated {n_kv // G}x)")
    config = {**model.config, "n_query_groups": n_kv}
    per_token = 2 * model.architecture.n_layer * heads.head_size
    kind = "MHA" if n_kv == H else "GQA"
    note = (
        f"key/value heads {G} -> {n_kv} ({kind}): each repeated {n_kv // G}x, exact; the KV cache grows "
        f"{n_kv // G}x, from {G * per_token:,} to {n_kv * per_token:,} values per token"
    )
    recipes = model.with_qkv_rows(step)
    if model.architecture.norm_qk == "olmo2":  # k_norm spans every K head: repeat its heads as the K rows
        k_part = kv_repeat_index(heads, n_kv)[heads.q_rows:heads.q_rows + n_kv * heads.head_size] - heads.q_rows
        k_rows = RowIndex(k_part, f"key/value heads {G} -> {n_kv} (the k norm's heads, as the K rows)")
        recipes = [then(r, k_rows) if (m := names.QK_NORM_KEY.match(r.output)) and m.group(1) == "k" else r
                   for r in recipes]
        note += "; the k norm's heads repeated alike"
    return _rebuilt(model, recipes, config, note)


# ---------------------------------------------------------------------------------------------
# norm folding


@dataclass(frozen=True)
class _NormFold:
    """One kind of norm (in every layer, or the final one) and the linears it feeds."""

    norm: str  # "norm_1" | "norm_2" (under each layer) | "transformer.ln_f"
    linears: tuple[str, ...]  # "attn.qkv", "mlp.fc", ..., "lm_head"
    per_layer: bool = True

    def prefixes(self, n_layer: int) -> list[str]:
        return [names.layer(i) + "." for i in range(n_layer)] if self.per_layer else [""]

    def label(self) -> str:
        if not self.per_layer:
            return "transformer.ln_f into lm_head"
        experts = [lin for lin in self.linears if lin.startswith("mlp.experts.")]
        listed = [lin for lin in self.linears if lin not in experts] + (["every expert's fc_1 and fc_2"] if experts else [])
        return f"{self.norm} into {', '.join(listed)} in every layer"


def _norm_folds(arch: Architecture) -> list[_NormFold]:
    if arch.n_expert:  # the router and every expert read the normed input (the router has no bias)
        mlp = (names.MOE_ROUTER,) + tuple(names.expert(e, m) for e in range(arch.n_expert) for m in ("fc_1", "fc_2"))
    else:
        mlp = ("mlp.fc",) if arch.mlp_class_name == "GptNeoxMLP" else ("mlp.fc_1", "mlp.fc_2")
    if arch.parallel_residual and arch.shared_attention_norm:  # Falcon-7B: norm_1 feeds attention and MLP
        return [_NormFold("norm_1", ("attn.qkv",) + mlp)]
    # A LayerNorm's bias cannot fold into a router, which has no bias: such a norm_2 stays (no model has one).
    mlp_fold = arch.norm_2 and not (arch.n_expert and arch.norm_class_name == "LayerNorm")
    present = (("norm_1", arch.norm_1, ("attn.qkv",)), ("norm_2", mlp_fold, mlp))  # OLMo 2 has neither
    return [_NormFold(norm, linears) for norm, on, linears in present if on]


def _has_bias(arch: Architecture, linear: str) -> bool:
    if linear == "lm_head":
        return arch.lm_head_bias
    if linear == names.MOE_ROUTER:
        return False
    return arch.qkv_bias if linear == "attn.qkv" else arch.proj_bias


def _bias_flags(arch: Architecture, config: dict[str, Any], folds: Iterable[_NormFold], all_linears: bool) -> dict[str, Any]:
    """litgpt bias flags that give every linear a LayerNorm bias folds into a bias (others keep theirs).
    all_linears: switch `bias` on rather than `attn_bias` alone (Falcon's `bias` is all or nothing)."""
    layernorm = arch.norm_class_name == "LayerNorm"
    need = {lin for f in folds for lin in f.linears if layernorm and not _has_bias(arch, lin)}
    flags = {"bias": arch.proj_bias, "attn_bias": bool(config.get("attn_bias")), "lm_head_bias": arch.lm_head_bias}
    if need - {"attn.qkv", "lm_head"} or (all_linears and "attn.qkv" in need):
        flags["bias"] = True
    elif "attn.qkv" in need:
        flags["attn_bias"] = True
    if "lm_head" in need:
        flags["lm_head_bias"] = True
    if flags["bias"]:
        flags["attn_bias"] = False  # litgpt: `bias` already covers q/k/v
    return flags


Expressible = Callable[[dict[str, Any]], "str | None"]


def fold_norms(model: ModelPlan, *, tied: bool = False, expressible: Expressible = lambda config: None) -> ModelPlan:
    """Fold every pre-attention and pre-MLP norm's gain into the linears it feeds (W' = W * g along the
    input columns; Gemma: W * (1 + g)), a LayerNorm bias into their biases (b' = b + W @ beta), and leave
    gains of one (Gemma: zero) and LayerNorm biases of zero. The final norm folds into lm_head unless the
    head is tied to the embedding (`tied`). A norm shared by attention and MLP folds into both.

    A LayerNorm bias needs a bias on each linear it feeds; where the source has none, the config gets
    one (litgpt `attn_bias`, `bias`, `lm_head_bias`; new biases of other linears are zero) if
    `expressible(new_config)` accepts it (it returns None, or why the target format cannot). Otherwise
    that norm is left as it is, and the notes say so.
    """
    arch = model.architecture
    if not arch.norm_affine:
        return _rebuilt(model, list(model.plan.recipes), dict(model.config),
                        "the norms have no weights (OLMo's LayerNorm): nothing to fold")
    layernorm = arch.norm_class_name == "LayerNorm"
    candidates = _norm_folds(arch)
    skipped: list[str] = []
    if tied:
        skipped.append("transformer.ln_f not folded: lm_head is tied to the token embedding, which it would change")
    else:
        candidates.append(_NormFold("transformer.ln_f", ("lm_head",), per_layer=False))

    def needs_bias(f: _NormFold) -> bool:
        return layernorm and any(not _has_bias(arch, lin) for lin in f.linears)

    # Try everything, then drop the folds that need new biases, the final norm first, until the target
    # can express the config.
    optional = [f for f in reversed(candidates) if needs_bias(f)]
    chosen, flags, why = None, None, None
    for dropped in range(len(optional) + 1):
        folds = [f for f in candidates if f not in optional[:dropped]]
        for all_linears in (False, True):
            trial = _bias_flags(arch, model.config, folds, all_linears)
            reason = expressible({**model.config, **trial})
            if reason is None:
                chosen, flags = folds, trial
                break
            why = why or reason
        if chosen is not None:
            break
    if chosen is None:
        raise QkvconvError(f"the target format cannot express this model even without folding: {why}")
    for f in candidates:
        if f not in chosen:
            skipped.append(f"{f.label()} not folded: its LayerNorm bias needs a bias the target cannot hold ({why})")

    config = {**model.config, **flags}
    new_arch = Architecture.from_litgpt_config(config)
    made = {r.output: r for r in model.plan.recipes}
    new: dict[str, Recipe] = dict(made)
    gain_offset = 1.0 if arch.norm_unit_offset else 0.0
    for f in chosen:
        for p in f.prefixes(arch.n_layer):
            gain = made[f"{p}{f.norm}.weight"]
            for lin in f.linears:
                weight = made[f"{p}{lin}.weight"]
                new[weight.output] = combine(weight.output, [weight, gain], ScaleColumns(gain_offset))
                if layernorm:
                    beta = made[f"{p}{f.norm}.bias"]
                    bias = made.get(f"{p}{lin}.bias")
                    parts = [weight] + ([bias] if bias is not None else []) + [beta]
                    new[f"{p}{lin}.bias"] = combine(f"{p}{lin}.bias", parts, FoldBias())
            new[gain.output] = combine(gain.output, [gain], Fill(1.0 - gain_offset))
            if layernorm:
                beta = made[f"{p}{f.norm}.bias"]
                new[beta.output] = combine(beta.output, [beta], Fill(0.0))

    # biases the new flags promise that no fold made: zeros
    for name in list(new):
        m = re.match(r"^(.*)\.weight$", name)
        if not m or f"{m.group(1)}.bias" in new:
            continue
        module = m.group(1)
        linear = re.sub(r"^transformer\.h\.\d+\.", "", module)
        if linear in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.fc_1", "mlp.fc_2", "mlp.proj", "lm_head") and _has_bias(new_arch, linear):
            new[f"{module}.bias"] = combine(f"{module}.bias", [made[name]], ZeroBias())

    recipes = _ordered(model.plan.recipes, new)
    plan = Plan(recipes, dict(model.plan.texts), list(model.plan.notes))
    what = "RMSNorm gains" if not layernorm else "LayerNorm gains and biases"
    done = [f.label() for f in chosen]
    note = (f"folded {what}: {'; '.join(done)}" if done else "folded no norms") + (
        "; gains left at zero (Gemma computes 1 + weight)" if arch.norm_unit_offset else "")
    return ModelPlan(plan, config, model.notes + [note] + skipped)


def _ordered(old: list[Recipe], new: dict[str, Recipe]) -> list[Recipe]:
    """The old output order, each new bias right after its weight."""
    before = {r.output for r in old}
    out: list[Recipe] = []
    for r in old:
        out.append(new[r.output])
        bias = r.output.removesuffix("weight") + "bias"
        if r.output.endswith(".weight") and bias in new and bias not in before:
            out.append(new[bias])
    return out


__all__ = [
    "FoldBias",
    "Fill",
    "Inline",
    "ModelPlan",
    "RowIndex",
    "ScaleColumns",
    "ZeroBias",
    "combine",
    "compose",
    "expand_kv_heads",
    "fold_norms",
    "kv_repeat_index",
    "set_rope",
    "then",
]
