"""Conversion plans: which source tensors make which output tensor, and how. Pure data, no I/O.

A `Recipe` names one output tensor, the source tensors it is made from and a short list of `Step`s
(re-order rows, fuse q/k/v, take one part of a fused matrix, ...). Plans are built first and
executed later by the streaming engine (engine.py), which reads each source tensor once, applies
the steps and writes the result; `--dry-run` prints them. Anyone can also run a recipe in memory
with `Recipe.apply`, which is what the tests of the mapping tables do.

Planning imports no torch (tensors are touched only in `apply`): `inspect` checks that an HF
config.json fits its tensors by planning the conversion on the safetensors headers alone
(`output_metas`), without paying for torch's import.
"""

from __future__ import annotations

from math import prod

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import NamedTuple, TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError
from qkvconv.model.layout import (HeadLayout, LayoutError, QKVOrder, check_parts, check_reorder, fuse, permutation_rows,
                                  reorder, same_rows, split)

if TYPE_CHECKING:
    import torch

class TensorMeta(NamedTuple):
    """What a tensor will be, known before its data is read or written: the engine plans every output
    from its inputs' metas. A tuple, so shape rules unpack it as `(shape, dtype)`; the dtype is a
    torch.dtype, or None where only shapes are checked (inspect, without torch)."""

    shape: tuple[int, ...]
    dtype: Any

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype)


Meta = TensorMeta  # the name the shape rules use
Labels = list[int]  # one label per row of a tensor (Step.labels)


def take(labels: Labels, index: list[int]) -> Labels:
    """labels[index]: the rows `index` names, in its order."""
    return [labels[i] for i in index]


class Step:
    """One transformation: a list of tensors in, a list of tensors out.

    `moves_rows`: every output row is a row of an input, unchanged, whatever the values and dtype (a
    gather, concatenation or split of rows). The engine then learns where each row comes from by
    running the step on row labels, and can copy the bytes from the source file instead.
    """

    moves_rows = False
    # the output is the inputs' rows stacked in input order, nothing moved (a reader can hand the parts over
    # instead of building the whole: the check takes their checksums)
    stacks = False

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def metas(self, inputs: list[Meta]) -> list[Meta] | None:
        """The outputs' shapes and dtypes, checked as `apply` checks them; None: unknown here (the
        engine then runs `apply` on meta tensors, whose first use costs about a second)."""
        return None

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        """Where a step that `moves_rows` takes each output row from: `apply` on lists of row labels (one
        int per input row) instead of tensors, through the same index functions (no torch: the byte path
        copies rows where these say). The shapes were checked by `metas` first."""
        raise NotImplementedError(f"{type(self).__name__} does not only move rows")


def concat_rows(inputs: list[Meta]) -> Meta:
    """torch.cat along dim 0: rows add up, the other dims must agree, dtypes promote."""
    (shape, dtype), *others = inputs
    for other, other_dtype in others:
        if len(other) != len(shape) or other[1:] != shape[1:]:
            raise LayoutError(f"cannot stack rows of shapes {shape} and {other}")
        if other_dtype != dtype:  # only mixed dtypes need torch's promotion table
            import torch

            dtype = torch.promote_types(dtype, other_dtype)
    return (sum(s[0] for s, _ in inputs), *shape[1:]), dtype


@dataclass(frozen=True)
class Reorder(Step):
    """Permute the rows of a fused QKV weight, bias or LoRA-B from one order to another."""

    moves_rows = True

    src: QKVOrder
    dst: QKVOrder
    heads: HeadLayout

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        return [reorder(t, self.src, self.dst, self.heads)]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        (t,) = inputs
        if same_rows(self.src, self.dst, self.heads):
            return [t]
        return [take(t, permutation_rows(self.src, self.dst, self.heads))]

    def describe(self) -> str:
        return f"reorder rows {self.src.value} -> {self.dst.value}"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        check_reorder(shape, self.src, self.dst, self.heads)
        return [(shape, dtype)]


@dataclass(frozen=True)
class CheckRows(Step):
    """Leave a fused QKV tensor's rows where they are, once its row count is the one the heads imply: where
    source and target orders coincide (Phi-3's sequential rows, Falcon-7B's single K/V head), a config whose
    head counts disagree with the file would otherwise pass unnoticed."""

    moves_rows = True
    stacks = True

    order: QKVOrder
    heads: HeadLayout

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        check_reorder(tuple(t.shape), self.order, self.order, self.heads)  # a LayoutError (ValueError)
        return [t]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        return list(inputs)

    def describe(self) -> str:
        return f"rows kept in {self.order.value} order"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        check_reorder(shape, self.order, self.order, self.heads)
        return [(shape, dtype)]


@dataclass(frozen=True)
class Fuse(Step):
    """Separate q, k, v (in that input order) -> one fused tensor with rows in `order`."""

    moves_rows = True

    order: QKVOrder
    heads: HeadLayout

    @property
    def stacks(self) -> bool:  # type: ignore[override]
        return self.order is QKVOrder.SEQUENTIAL

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        q, k, v = tensors
        return [fuse(q, k, v, self.order, self.heads)]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        q, k, v = inputs
        return Reorder(QKVOrder.SEQUENTIAL, self.order, self.heads).labels([q + k + v])

    def describe(self) -> str:
        return f"fuse q, k, v -> {self.order.value}"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        check_parts([shape for shape, _ in inputs], self.heads)
        (q, k, v) = inputs
        shape, dtype = concat_rows([q, k, v])
        check_reorder(shape, QKVOrder.SEQUENTIAL, self.order, self.heads)
        return [(shape, dtype)]


@dataclass(frozen=True)
class TakePart(Step):
    """One of q, k, v out of a fused tensor whose rows are in `order`."""

    moves_rows = True

    part: str  # "q" | "k" | "v"
    order: QKVOrder
    heads: HeadLayout

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        return [split(t, self.order, self.heads)["qkv".index(self.part)]]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        (sequential,) = Reorder(self.order, QKVOrder.SEQUENTIAL, self.heads).labels(inputs)
        start = {"q": 0, "k": self.heads.q_rows, "v": self.heads.q_rows + self.heads.kv_rows}[self.part]
        rows = self.heads.q_rows if self.part == "q" else self.heads.kv_rows
        return [sequential[start:start + rows]]

    def describe(self) -> str:
        return f"take {self.part} from {self.order.value}"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        check_reorder(shape, self.order, QKVOrder.SEQUENTIAL, self.heads)
        rows = self.heads.q_rows if self.part == "q" else self.heads.kv_rows
        return [((rows, *shape[1:]), dtype)]


@dataclass(frozen=True)
class Recipe:
    """One output tensor made from `inputs` by `steps` (no steps: a plain copy of one input)."""

    output: str
    inputs: tuple[str, ...]
    steps: tuple[Step, ...] = ()
    dtype: torch.dtype | None = None  # cast at the end (None: keep the input dtype)

    def apply(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) != len(self.inputs):
            raise ValueError(f"{self.output}: expected {len(self.inputs)} inputs, got {len(tensors)}")
        out = list(tensors)
        for step in self.steps:
            out = step.apply(out)
        if len(out) != 1:
            raise ValueError(f"{self.output}: steps left {len(out)} tensors, expected 1")
        (t,) = out
        return t if self.dtype is None else t.to(self.dtype)

    def labels(self, inputs: list[Labels]) -> Labels:
        """`apply` on row labels (Step.labels): where each output row comes from. Only for a recipe whose
        steps all move rows and that casts nothing."""
        out = list(inputs)
        for step in self.steps:
            out = step.labels(out)
        (t,) = out
        return t

    def meta(self, inputs: list[Meta]) -> Meta | None:
        """The output's shape and dtype without touching data, or None where a step cannot tell."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.output}: expected {len(self.inputs)} inputs, got {len(inputs)}")
        out: list[Meta] | None = list(inputs)
        for step in self.steps:
            out = step.metas(out)
            if out is None:
                return None
        if len(out) != 1:
            raise ValueError(f"{self.output}: steps left {len(out)} tensors, expected 1")
        ((shape, dtype),) = out
        return shape, self.dtype or dtype

    def describe(self) -> str:
        how = "; ".join(s.describe() for s in self.steps) or "copy"
        return f"{self.output} <- {', '.join(self.inputs)} ({how})"


def copy(name: str, output: str | None = None) -> Recipe:
    return Recipe(output or name, (name,))


@dataclass
class Plan:
    """Everything a conversion will write: recipes per output file, plus small text files."""

    recipes: list[Recipe] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # file name -> content (configs)
    notes: list[str] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)  # metadata a self-describing file holds (GGUF's keys)

    def apply_in_memory(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run every recipe on an in-memory state dict (small models, tests)."""
        return {r.output: r.apply([tensors[i] for i in r.inputs]) for r in self.recipes}


def _on_meta_tensors(recipe: Recipe, inputs: list[Meta]) -> Meta:
    """A recipe with a step that has no shape rule, run on meta tensors (about a second on first use)."""
    import torch

    out = recipe.apply([torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in inputs])
    return tuple(out.shape), out.dtype


def output_metas(plan: Plan, names: Collection[str], meta: Callable[[str], Meta]) -> dict[str, Meta]:
    """Shape and dtype of every output tensor from the steps' shape rules, no data read: the source
    holds `names`, `meta(name)` describes one. Any error is a QkvconvError naming the output."""
    layout: dict[str, Meta] = {}
    for recipe in plan.recipes:
        missing = [i for i in recipe.inputs if i not in names]
        if missing:
            raise QkvconvError(f"the source has no tensor {missing[0]!r} (needed for {recipe.output})")
        inputs = [meta(i) for i in recipe.inputs]
        try:
            known = recipe.meta(inputs)
            if known is None:
                known = _on_meta_tensors(recipe, inputs)
        except (ValueError, RuntimeError) as e:
            raise QkvconvError(f"cannot build {recipe.output}: {e}") from None
        if recipe.output in layout:
            raise QkvconvError(f"two recipes write {recipe.output}")
        layout[recipe.output] = TensorMeta(tuple(known[0]), known[1])
    return layout
