"""A model's weights under current litgpt names and order, whatever layout they are stored in.

The reference forward pass (forward.py) asks for `transformer.h.{i}.attn.qkv.weight` with sequential
rows; a `ModelWeights` answers from a legacy or current litgpt file, a LoRA run on top of its base
(legacy or current LoRA semantics; the update is merged per tensor, in float64, when asked for), and
so on. Tensors are read one at a time from mmapped files, so a caller that walks the layers in
order holds about one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkvconv.errors import QkvconvError
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.io.config_files import read_yaml
from qkvconv.formats.litgpt import (
    CONFIG,
    HYPERPARAMETERS,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    QKV_KEY,
    WEIGHTS,
    LitgptCheckpoint,
    LoraHyperparameters,
    ModelShape,
    StateDictFile,
    check_full_shapes,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    current_name,
    qkv_naming,
)
from qkvconv.model.lora import lora_update
from qkvconv.plans.plan import Recipe


def _current_key(name: str) -> tuple[str, str | None]:
    """(current plain name, 'attn'|'qkv'|None): the name under current litgpt and which QKV naming it had."""
    m = QKV_KEY.match(name)
    return current_name(name, drop_linear=True), (m.group(2) if m else None)


def merged(t: torch.Tensor, name: str, a: torch.Tensor, b: torch.Tensor, lora: LoraHyperparameters,
           heads: HeadLayout, *, legacy: bool = False) -> torch.Tensor:
    """Weight `name` (current litgpt name and order) plus its litgpt LoRA update, summed in float64,
    handed over in float32 (or the stored dtype if wider)."""
    delta = lora_update(bool(QKV_KEY.match(name)), a, b, lora.settings, heads, legacy=legacy)
    return (t.double() + delta).to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class ModelWeights:
    """Tensors by current litgpt name (sequential QKV rows), LoRA updates merged in on access."""

    description: str
    config: dict[str, Any]
    heads: HeadLayout
    base: StateDictFile
    adapter: StateDictFile | None = None
    lora: LoraHyperparameters | None = None

    def __post_init__(self) -> None:
        self._index: dict[str, tuple[str, str | None]] = {}
        for key in self.base.tensors:
            current, naming = _current_key(key)
            self._index[current] = (key, naming)
        self._lora: dict[str, tuple[str, bool]] = {}  # current weight name -> (adapter stem, legacy)
        if self.adapter is not None:
            for key in self.adapter.tensors:
                if key.endswith("lora_A"):
                    stem = key[: -len("lora_A")]
                    current, naming = _current_key(stem + "weight")
                    self._lora[current] = (stem, naming == "attn")
            missing = [k for k in self._lora if k not in self._index]
            if missing:
                raise QkvconvError(f"{self.description}: LoRA tensors for {missing[0]} have no base weight")

    def __call__(self, name: str) -> torch.Tensor:
        key, naming = self._index[name]  # KeyError for an absent tensor, as forward.py expects
        t = self.base.tensors[key]
        if naming == "attn":
            t = reorder(t, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, self.heads)
        if name in self._lora:
            t = self._with_update(name, t)
        return t

    def _with_update(self, name: str, t: torch.Tensor) -> torch.Tensor:
        assert self.adapter is not None and self.lora is not None
        stem, legacy = self._lora[name]
        return merged(t, name, self.adapter.tensors[stem + "lora_A"], self.adapter.tensors[stem + "lora_B"],
                      self.lora, self.heads, legacy=legacy)

    def release(self) -> None:
        """Drop the resident pages read so far: call between layers to hold about one layer."""
        self.base.release()
        if self.adapter is not None:
            self.adapter.release()

    def dtype(self) -> torch.dtype:
        return next(iter(self.base.tensors.values())).dtype


def litgpt_weights(
    ckpt: LitgptCheckpoint, *, base: Path | None = None, overrides: dict[str, Path] | None = None,
    base_option: str = "--base",
) -> ModelWeights | AdaptedWeights:
    """Weights of a litgpt checkpoint directory; `overrides` replaces files by name (a staged upgrade).
    A LoRA run's base may be a litgpt or (as `convert --to litgpt-lora` of a PEFT adapter leaves it) an HF
    directory."""
    files = {n: ckpt.directory / n for n in (WEIGHTS, LORA_WEIGHTS, CONFIG, HYPERPARAMETERS)}
    files.update(overrides or {})
    config = read_yaml(files[CONFIG]) if files[CONFIG].is_file() else ckpt.config
    config, _ = migrate_config(config)
    shape = ModelShape.from_config(config, files[CONFIG])
    if ckpt.lora_weights is None:
        sd = load_state_dict_file(files[WEIGHTS])
        check_full_shapes(sd, shape)
        return ModelWeights(str(ckpt.directory), config, shape.heads, sd)
    hyper = LoraHyperparameters.from_yaml(read_yaml(files[HYPERPARAMETERS]), files[HYPERPARAMETERS])
    base_dir = ckpt.find_base(base, option=base_option, hf=True)
    if base_dir is None:
        raise QkvconvError(
            f"cannot find the base checkpoint of the LoRA run {ckpt.directory} (hyperparameters.yaml "
            f"checkpoint_dir={ckpt.hyperparameters.checkpoint_dir if ckpt.hyperparameters else None!r}); "
            f"pass {base_option} DIR"
        )
    adapter = load_state_dict_file(files[LORA_WEIGHTS])
    check_lora_shapes(adapter, shape, hyper)
    if not (base_dir / WEIGHTS).is_file():  # a Hugging Face base
        if qkv_naming(adapter.tensors, files[LORA_WEIGHTS]) == LEGACY_NAMING:
            raise QkvconvError(f"{ckpt.directory} is a legacy LoRA run on the Hugging Face base {base_dir}: "
                               f"upgrade it first (qkvconv upgrade {ckpt.directory} --out DIR --base LITGPT_BASE)")
        inner = hf_weights(base_dir)
        return AdaptedWeights(f"{ckpt.directory} (LoRA on {base_dir})", inner, dict(adapter.tensors), hyper,
                              shape.heads)
    base_sd = load_state_dict_file(base_dir / WEIGHTS)
    check_full_shapes(base_sd, shape)
    return ModelWeights(f"{ckpt.directory} (LoRA on {base_dir})", config, shape.heads, base_sd, adapter, hyper)


@dataclass
class PlannedWeights:
    """A model stored in another layout (Hugging Face), seen under litgpt names: each requested tensor
    is made by its recipe from the source tensors, read when asked for."""

    description: str
    config: dict[str, Any]
    reader: Any  # TensorReader
    recipes: dict[str, Recipe]
    # how the stored rows were read where software reads them more than one way (GPT-BigCode multi-head): verify
    # reports it
    readings: list[str] = field(default_factory=list)

    def __call__(self, name: str) -> torch.Tensor:
        recipe = self.recipes[name]  # KeyError for an absent tensor, as forward.py expects
        return recipe.apply([self.reader.read(i) for i in recipe.inputs])

    def parts(self, name: str) -> list[torch.Tensor] | None:
        """The tensor as whole source tensors whose rows, stacked in order, make it, read in place (valid
        until release()), where the recipe only stacks them: a copy, q/k/v fused in sequential order. A
        check takes their checksums without building the tensor. None where the recipe does more."""
        recipe = self.recipes[name]
        if all(step.stacks for step in recipe.steps) and len(recipe.steps) <= 1:
            return [self.reader.peek(i) for i in recipe.inputs]
        return None

    def release(self) -> None:
        self.reader.release()

    def dtype(self) -> torch.dtype:
        return self.reader.meta(self.reader.names()[0]).dtype


def hf_weights(directory: Path) -> PlannedWeights:
    """A Hugging Face checkpoint directory, read through the family table's HF -> litgpt plan (for the transformers
    classes litgpt cannot express, the reference pass's reading of them: formats/hf/reference.py)."""
    from qkvconv.formats.hf.config import HF_CONFIG, detect_family
    from qkvconv.formats.hf.plans import plan_hf_for_reference
    from qkvconv.formats.hf.reference import base_model_prefix, qkv_reading, reference_config_from_hf
    from qkvconv.formats.hf.variants import read_config_json
    from qkvconv.io.readers import open_reader
    from qkvconv.io.sharded import PrefixedReader

    config_json = read_config_json(directory / HF_CONFIG)
    reader = open_reader(directory)
    family = detect_family(config_json)
    prefix = base_model_prefix(family, reader.names()) if family is not None else None
    if prefix is not None:  # saved from the base model, as transformers loads it
        reader = PrefixedReader(reader, prefix)
    plan = plan_hf_for_reference(config_json, reader.names())
    reading = qkv_reading(config_json)
    return PlannedWeights(str(directory), reference_config_from_hf(config_json), reader,
                          {r.output: r for r in plan.recipes}, [reading] if reading else [])


@dataclass
class AdaptedWeights:
    """A base model (any layout) with a PEFT adapter merged in on access.

    The adapter is imported as a litgpt LoRA run (peft_format: exact, checked, a scaling that differs
    between modules folded into lora_B) and held in memory: adapters are small."""

    description: str
    inner: ModelWeights | PlannedWeights
    adapter: dict[str, torch.Tensor]
    lora: LoraHyperparameters
    heads: HeadLayout

    @property
    def config(self) -> dict[str, Any]:
        return self.inner.config

    def __call__(self, name: str) -> torch.Tensor:
        t = self.inner(name)
        stem = name.removesuffix("weight")
        if name.endswith(".weight") and stem + "lora_A" in self.adapter:
            return merged(t, name, self.adapter[stem + "lora_A"], self.adapter[stem + "lora_B"], self.lora, self.heads)
        return t

    def release(self) -> None:
        self.inner.release()

    def dtype(self) -> torch.dtype:
        return self.inner.dtype()


def open_weights(
    source: Path, *, base: Path | None = None, base_option: str = "--base"
) -> ModelWeights | PlannedWeights | AdaptedWeights:
    """Any supported checkpoint directory (or a file in it), as weights under current litgpt names, by
    its format's `weights`; `base`: the base of a LoRA run or PEFT adapter, where its own files do not
    say (`base_option` names the option it came from, for errors)."""
    from qkvconv import formats

    if not source.exists():
        raise QkvconvError(f"{source} does not exist")
    entry, path = formats.locate(source)
    return entry.load().weights(path if entry.single_file else source, base=base, base_option=base_option)
