"""Row steps the Hugging Face mappings need beyond plans/plan.py's q/k/v steps: take or concatenate row
blocks (Phi-3's fused gate_up_proj, Falcon's per-head blocks) and a tied head checked against the
embedding it copies. Torch is imported where tensors are touched (`apply`): the shape rules (`metas`)
serve inspect, which imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qkvconv.errors import QkvconvError
from qkvconv.model.layout import LayoutError
from qkvconv.plans.plan import Labels, Meta, Step, concat_rows

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TakeRows(Step):
    """Row block `index` of `parts` equal blocks (Phi-3's gate_up_proj: gate rows, then up rows)."""

    moves_rows = True

    index: int
    parts: int

    def _check(self, shape: tuple[int, ...]) -> None:
        if not shape or shape[0] % self.parts:
            raise LayoutError(f"{shape[0] if shape else 0} rows do not split into {self.parts} equal blocks")

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        self._check(tuple(t.shape))
        return [t.chunk(self.parts, dim=0)[self.index]]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        (t,) = inputs
        size = len(t) // self.parts
        return [t[self.index * size:(self.index + 1) * size]]

    def describe(self) -> str:
        return f"take row block {self.index + 1} of {self.parts}"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        self._check(shape)
        return [((shape[0] // self.parts, *shape[1:]), dtype)]


@dataclass(frozen=True)
class ConcatRows(Step):
    """Stack the inputs' rows in input order (litgpt fc_1, fc_2 -> Phi-3 gate_up_proj)."""

    moves_rows = True
    stacks = True

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        return [torch.cat(tensors, dim=0)]

    def labels(self, inputs: list[Labels]) -> list[Labels]:
        return [[label for t in inputs for label in t]]

    def describe(self) -> str:
        return "concatenate rows"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        return [concat_rows(inputs)]


def _untied() -> QkvconvError:
    return QkvconvError(
        "the output head differs from the token embedding, but config.json ties them "
        "(tie_word_embeddings); write the head separately with tie_word_embeddings=false"
    )


@dataclass(frozen=True)
class Tied(Step):
    """All inputs must be equal (a tied embedding and output head); the output is the first."""

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        from qkvconv.model.nonfinite import same_bits

        first, *others = tensors
        for other in others:
            if other.shape != first.shape or (not first.is_meta and not same_bits(other, first)):
                raise _untied()
        return [first]

    def describe(self) -> str:
        return "check tied tensors are equal"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        first, *others = inputs
        if any(shape != first[0] for shape, _ in others):
            raise _untied()
        return [first]




@dataclass(frozen=True)
class NormalizeRows(Step):
    """Each row divided by its L2 norm (at least 1e-12), as torch.nn.functional.normalize(w) computes it:
    Baichuan 2's NormHead normalises the head's rows at run time, so its twin's plain head holds them normalised.
    Computed in float32 (the remote code normalises in the model's dtype: as exact, or more)."""

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        (t,) = tensors
        return [torch.nn.functional.normalize(t.float(), dim=1).to(t.dtype)]

    def describe(self) -> str:
        return "divide each row by its L2 norm (a head normalised at run time)"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        if len(shape) != 2:
            raise LayoutError(f"a head to normalise has 2 dimensions, not {len(shape)}")
        return [(shape, dtype)]


@dataclass(frozen=True)
class Transpose(Step):
    """A weight stored [in, out] (GPT-2's Conv1D: x @ W + b) as the [out, in] a Linear holds; a bias (1-D) as it is.
    Only `verify` reads through it: no conversion writes these families."""

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        return [t.T.contiguous() if t.dim() == 2 else t]

    def describe(self) -> str:
        return "transpose [in, out] (Conv1D) to [out, in]"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        ((shape, dtype),) = inputs
        return [((shape[1], shape[0]) if len(shape) == 2 else shape, dtype)]
