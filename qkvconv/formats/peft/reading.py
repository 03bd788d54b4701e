"""Reading a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin)
into its (lora_A, lora_B) pair per HF module, checked.

    adapter = _read_peft(Path("adapter"))                  # refuses what policy.py lists; NaN/inf unless allowed
    adapter.rank_alpha(name), adapter.scaling(name)        # from rank_pattern / alpha_pattern, as peft does
    modules = _modules_of(adapter, table, lit_cfg, heads)  # each module in the base's table, shapes checked

Every tensor must be a LoRA matrix, or peft's copy of a targeted module's base weight
(save_embedding_layers), which must have the base's shape; anything else is refused, named. Each
module's rank must be the one the config gives it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkvconv.errors import QkvconvError
from qkvconv.formats.peft.modules import (
    ADAPTER_KEY,
    BASE_COPY_KEY,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    _in_out,
    _Module,
    _ModuleTable,
)
from qkvconv.formats.peft.policy import _what_is, unsupported_features
from qkvconv.io.config_files import read_json
from qkvconv.io.readers import TensorMeta, open_reader
from qkvconv.io.sources import check_inside
from qkvconv.model.layout import HeadLayout
from qkvconv.model.nonfinite import check_finite


def is_peft_dir(path: Path) -> bool:
    """A directory with adapter_config.json (a PEFT adapter of any kind; reading it checks it is LoRA)."""
    return path.is_dir() and (path / PEFT_CONFIG).is_file()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key): the first key that
    matches the end of the module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise QkvconvError(f"{PEFT_CONFIG}: pattern {key!r} is not a valid regular expression ({e})") from None
    return default


@dataclass
class _PeftAdapter:
    """A PEFT LoRA adapter as read: per HF module (A, B) with its rank and alpha from the config."""

    directory: Path
    config: dict[str, Any]
    weights: Path
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_copies: dict[str, TensorMeta]

    def rank_alpha(self, module: str) -> tuple[int, float]:
        c = self.config
        r = _pattern_value(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = _pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8))
        bad_r = isinstance(r, bool) or not isinstance(r, int) or r < 1
        if bad_r or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise QkvconvError(f"{PEFT_CONFIG}: {module} gets rank {r!r} and alpha {alpha!r}; expected a positive "
                               "integer and a number")
        return r, float(alpha)

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _weights_file(directory: Path) -> Path:
    for name in PEFT_WEIGHTS:
        if (directory / name).is_file():
            return check_inside(directory / name, directory)
    raise QkvconvError(f"{directory} has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")


def _peft_config(directory: Path) -> dict[str, Any]:
    if not is_peft_dir(directory):
        raise QkvconvError(f"{directory} is not a PEFT adapter directory (no {PEFT_CONFIG})")
    return read_json(directory / PEFT_CONFIG)


def _read_peft(directory: Path, *, allow_nonfinite: bool = False) -> _PeftAdapter:
    """Open a PEFT LoRA adapter; refuse what litgpt cannot hold, with the first reason, and NaN/inf
    values (naming the tensor) unless `allow_nonfinite`."""
    config = _peft_config(directory)
    problems = unsupported_features(config)
    if problems:
        raise QkvconvError(f"cannot convert {directory} to litgpt LoRA: {problems[0]}")
    weights = _weights_file(directory)
    reader = open_reader(weights)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, TensorMeta] = {}
    for name in reader.names():
        if m := ADAPTER_KEY.match(name):
            tensors.setdefault(m.group(1), {})[m.group(2)] = reader.read(name)
            if not allow_nonfinite:
                check_finite(name, tensors[m.group(1)][m.group(2)])
        elif m := BASE_COPY_KEY.match(name):
            if m.group(2) == "weight":  # its shape says which layer it copies; a bias adds nothing to check
                base_copies[m.group(1)] = reader.meta(name)
        else:
            raise QkvconvError(
                f"cannot convert {directory} to litgpt LoRA: {_what_is(name)} has no litgpt LoRA equivalent"
            )
    if not tensors:
        raise QkvconvError(f"{weights} holds no LoRA matrices")
    pairs = {}
    for module, ab in tensors.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise QkvconvError(f"{weights}: {module} has {next(iter(ab))} but not its partner")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise QkvconvError(
                f"{weights}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, not a LoRA pair"
            )
        pairs[module] = (a, b)
    adapter = _PeftAdapter(directory, config, weights, pairs, base_copies)
    for module, (a, _) in pairs.items():
        r, _alpha = adapter.rank_alpha(module)
        if a.shape[0] != r:
            raise QkvconvError(
                f"{weights}: {module} has rank {a.shape[0]}, but {PEFT_CONFIG} (r / rank_pattern) gives it {r}"
            )
    return adapter


def _modules_of(
    adapter: _PeftAdapter, table: _ModuleTable, lit_cfg: dict[str, Any], heads: HeadLayout
) -> dict[str, _Module]:
    """The table entry of every adapted module, after checking its shape; refuse modules litgpt lacks."""
    found = {}
    for name, (a, b) in adapter.pairs.items():
        module = table.by_hf.get(name)
        if module is None:
            raise QkvconvError(
                f"the PEFT adapter targets {name}, which has no litgpt LoRA equivalent in "
                f"{table.family.architecture} (litgpt adapts q/k/v, the attention output, the MLP and the head; "
                "or the config.json given is not this adapter's base)"
            )
        out, in_ = _in_out(module, lit_cfg, heads)
        if tuple(a.shape[1:]) != (in_,) or b.shape[0] != out:
            raise QkvconvError(
                f"{adapter.weights}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but the base "
                f"config.json makes that layer ({out}, {in_}); the adapter belongs to another model"
            )
        found[name] = module
    for name, meta in adapter.base_copies.items():
        module = table.by_hf.get(name)
        if module is None or name not in adapter.pairs or meta.shape != _in_out(module, lit_cfg, heads):
            raise QkvconvError(
                f"{adapter.weights} carries base weights of {name} {meta.shape}, which are not those of the base "
                "model config.json describes (a resized vocabulary?); litgpt LoRA runs hold only LoRA matrices"
            )
    return found
