"""The interface every checkpoint format implements, and what the commands get from it.

A format says what it can hold (`rope`, `qkv`, `adapter`), how to read a directory of its own into
litgpt's names (the pivot: `source`, or a faster `direct_plan` to some targets), how to write the
pivot (`target_plan`, `files`, `writer`), and how to `inspect` and open one for `verify` (`weights`).
ops/convert.py composes them: source format -> litgpt names -> transformations -> target format,
one plan, each tensor read once. A hook a format does not implement refuses with a message that
names both formats: nothing is converted by a half-implemented path.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError, UnsupportedFamily

if TYPE_CHECKING:
    from qkvconv.io.readers import TensorMeta, TensorReader
    from qkvconv.model.rotary import RopeOrder
    from qkvconv.plans.plan import Plan
    from qkvconv.plans.transforms import ModelPlan


@dataclass
class Source:
    """A full model read into litgpt's names: the plan there, the reader of its files, the config.json
    that describes it (None where the format has none) and whether its head is tied to the embedding."""

    model: ModelPlan
    reader: TensorReader
    config_json: dict[str, Any] | None
    tied: bool


@dataclass(frozen=True)
class Transformations:
    """What a conversion changes besides the format (None / False: nothing)."""

    rope: RopeOrder | None = None  # rotary order of the output
    kv_heads: int | None = None  # key/value heads of the output
    fold_norms: bool = False
    qkv: str | None = None  # "fused" | "split": the output's QKV projection
    # the output written in this base's architecture, with its config.json (hf: a remote-code original from its twin)
    target_base: Path | None = None

    def any(self) -> bool:
        return (self.rope is not None or self.kv_heads is not None or self.fold_norms or self.qkv is not None
                or self.target_base is not None)

    def of_weights(self) -> bool:
        """Transformations only a full model can take (an adapter takes --qkv alone)."""
        return self.rope is not None or self.kv_heads is not None or self.fold_norms


class Format:
    """One checkpoint format. Subclasses set the attributes and implement the hooks they support."""

    name: str = ""
    adapter: bool = False  # a LoRA adapter on a base model, not a model
    rope: RopeOrder | None = None  # the only rotary order it holds (None: either, or not a model)
    rope_refusal: str = ""  # why another order cannot be written, and where it can

    def rope_for(self, source_json: dict[str, Any] | None, written_as: dict[str, Any] | None = None
                 ) -> RopeOrder | None:
        """The only rotary order this format holds for a model from a source with this config.json (None:
        either): `rope`, unless the class written depends on the source (hf: Glm rotates in pairs order) or is
        named by `written_as`, the config.json to write (--target-base)."""
        return self.rope
    qkv: str | None = None  # the only QKV fusion it holds ("fused" | "split"; None: the architecture decides)
    qkv_refusal: str = ""
    configs: tuple[str, ...] = ()  # its config files: a conversion writes its own, never copies another's
    # it can hold models beyond litgpt's fields (learned positions, ALiBi, ...: the reference pass's), so a conversion
    # to it reads the source as `verify` does (reference_source) rather than refusing what litgpt cannot express
    holds_reference: bool = False

    def _cannot(self, what: str) -> QkvconvError:
        return QkvconvError(f"qkvconv cannot {what} the {self.name} format")

    # reading
    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        """The inspect report (ops/inspect.py FIELDS)."""
        raise self._cannot("inspect")

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        """The checkpoint as weights under litgpt names, for the reference forward pass (formats/weights.py)."""
        raise self._cannot("verify")

    def source(self, directory: Path) -> Source:
        """The model under litgpt names, for a conversion through the pivot."""
        raise self._cannot("convert from")

    def reference_source(self, directory: Path) -> Source:
        """The model as `verify` reads it (litgpt's names and the reference pass's extra fields), for a target that
        `holds_reference`; `source` where the format has no such reading."""
        return self.source(directory)

    def direct_plan(self, directory: Path, to: str, bytes_only: bool = False) -> tuple[Plan, TensorReader] | None:
        """A plan straight into format `to` without the pivot (copies stay copies), or None. `bytes_only`:
        read through the torch-free readers of io/bytepath.py (None where they cannot read the files)."""
        return None

    # writing
    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        """The pivot model written in this format (notes go to `model.notes`)."""
        raise self._cannot("convert to")

    def expressible(self, cfg: dict[str, Any], source_json: dict[str, Any] | None) -> None:
        """Raise a QkvconvError saying why, when this format cannot hold a model with this litgpt config
        (norm folding asks before it adds biases the target may have no place for)."""

    def files(self, layout: dict[str, TensorMeta], max_shard_size: int | None) -> dict[str, list[str]]:
        """Output file -> the tensors it holds."""
        raise self._cannot("write")

    def writer(self, directory: Path, layout: dict[str, TensorMeta], max_shard_size: int | None
               ) -> AbstractContextManager[Any]:
        raise self._cannot("write")


class TorchFileFormat(Format):
    """A format whose weights are one torch .pth file (litgpt, Meta)."""

    weights_file: str = ""

    def files(self, layout: dict[str, TensorMeta], max_shard_size: int | None) -> dict[str, list[str]]:
        return {self.weights_file: list(layout)}

    def writer(self, directory: Path, layout: dict[str, TensorMeta], max_shard_size: int | None
               ) -> AbstractContextManager[Any]:
        from qkvconv.io.writers import TorchWriter

        return TorchWriter(directory / self.weights_file, layout)


def tensor_summary(reader: Any) -> tuple[Any, int]:
    """(dtype or counts per dtype, parameter count) from tensor metadata alone (for inspect). A meta's
    dtype is a torch dtype (readers.py) or torch's name for it (safetensors_header.py): the same name."""
    dtypes: Counter[str] = Counter()
    for name in reader.names():
        meta = reader.meta(name)
        dtypes[str(meta.dtype).removeprefix("torch.")] += meta.numel
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()}
    return dtype, sum(dtypes.values())


def file_list(directory: Path) -> list[dict[str, Any]]:
    """The files of a checkpoint directory with their sizes (qkvconv's own temporary files left out)."""
    from qkvconv.io.transaction import is_temporary

    return [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir())
            if p.is_file() and not is_temporary(p)]


def rope_report(cfg: dict[str, Any] | None, source: str) -> dict[str, Any] | None:
    """inspect's `rope` field from a litgpt config: the rotary order of each Q/K head's rows (`half`: dims i
    and i + n/2 rotate together; `pairs`: dims 2i and 2i + 1), the share of a head's dims that rotate, and
    where that was read (`source`). None where the config is unknown (an adapter whose base is not found)."""
    if cfg is None:
        return None
    from qkvconv.model.architecture import Architecture

    try:
        arch = Architecture.from_litgpt_config(cfg)
        interleave, fraction = arch.rope_interleave, arch.rope_n_elem / arch.head_size
    except (UnsupportedFamily, TypeError, ValueError, ZeroDivisionError):
        # a model the forward pass does not cover still has a rotary order; a malformed config has none
        interleave, fraction = cfg.get("rope_interleave", False), cfg.get("rotary_percentage", 0.25)
        if not isinstance(interleave, bool) or isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            return None
    order = "pairs" if interleave else "half"
    return {"order": order, "fraction": fraction, "evidence": source}
