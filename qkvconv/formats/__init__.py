"""Checkpoint formats (litgpt, Hugging Face, PEFT, Meta): how each is detected, read into litgpt's
names (the pivot), written from them, and inspected. Imports `model`, `plans`, `io`.

This module is the registry, and imports no format module (nor torch): detecting a directory and
listing `--to` choices cost nothing, and a format's module is imported when it is used.

    entry = detect(Path("checkpoints/llama"))   # FormatEntry('hf', ...) from the files it holds
    fmt = entry.load()                          # the Format object: qkvconv/formats/hf.py's FORMAT
    fmt.inspect(directory)                      # the report; fmt.read(directory), fmt.write_plan(...), ...

A new format is one module (a `Format` subclass, see base.py, as `FORMAT`) plus one `FormatEntry` line
below. The order of ENTRIES is the order of detection: the first entry whose markers all match wins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qkvconv.errors import QkvconvError

if TYPE_CHECKING:
    from qkvconv.formats.base import Format


@dataclass(frozen=True)
class FormatEntry:
    """One format in the registry: its `--to` name, where its module lives, how a directory shows it."""

    name: str
    module: str  # the module whose FORMAT implements it (imported on first use)
    summary: str  # for --help and error messages
    markers: tuple[str, ...] = ()  # glob patterns a directory must all match ("a|b": either); () = written only
    attribute: str = "FORMAT"
    adapter: bool = False  # a LoRA adapter on a base model (the Format says so too; here for torch-free listings)
    single_file: str | None = None  # a format that is one file with this suffix (GGUF): the file is the checkpoint
    writable: bool = True  # False: read (inspected) only, so not a `--to` choice

    def matches(self, directory: Path) -> bool:
        return bool(self.markers) and all(any(any(directory.glob(p)) for p in pattern.split("|"))
                                          for pattern in self.markers)

    def load(self) -> Format:
        return getattr(importlib.import_module(self.module), self.attribute)


ENTRIES: tuple[FormatEntry, ...] = (
    FormatEntry("litgpt-lora", "qkvconv.formats.litgpt.format", "litgpt LoRA run (lit_model.pth.lora)",
                ("lit_model.pth.lora",), attribute="LORA", adapter=True),
    FormatEntry("litgpt", "qkvconv.formats.litgpt.format", "litgpt checkpoint (lit_model.pth, sequential attn.qkv)",
                ("lit_model.pth",)),
    FormatEntry("litgpt-legacy", "qkvconv.formats.litgpt.format",
                "litgpt <= 0.5.4 (grouped attn.attn); read as litgpt", attribute="LEGACY"),
    FormatEntry("peft", "qkvconv.formats.peft.format", "PEFT LoRA adapter (adapter_config.json)",
                ("adapter_config.json",), adapter=True),
    FormatEntry("hf", "qkvconv.formats.hf.format", "Hugging Face transformers (config.json, safetensors)",
                ("config.json",)),
    FormatEntry("meta", "qkvconv.formats.meta", "Meta's original Llama (params.json, consolidated.00.pth)",
                ("params.json", "consolidated.*.pth")),
    FormatEntry("gguf", "qkvconv.formats.gguf.format", "llama.cpp's GGUF (one .gguf file)", ("*.gguf",),
                single_file=".gguf"),
    FormatEntry("megatron", "qkvconv.formats.megatron", "Megatron-LM (model_optim_rng.pt per rank); inspect only",
                ("latest_checkpointed_iteration.txt|mp_rank_00*/model*rng.pt",), writable=False),
    FormatEntry("nemo", "qkvconv.formats.megatron", "NeMo 1, unpacked (model_config.yaml, model_weights.ckpt); "
                "inspect only", ("model_config.yaml", "model_weights.ckpt|mp_rank_00/model_weights.ckpt"),
                attribute="NEMO", writable=False),
)
BY_NAME = {e.name: e for e in ENTRIES}
NAMES = tuple(e.name for e in ENTRIES if e.writable)  # the `--to` choices
MODEL_NAMES = tuple(e.name for e in ENTRIES if not e.adapter and e.writable)  # formats that hold a full model


def get(name: str) -> FormatEntry:
    """The entry of a format name (`--to` choices are the writable ones, NAMES)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise QkvconvError(f"--to must be one of {', '.join(NAMES)}, got {name!r}") from None


def _single_file(path: Path) -> FormatEntry | None:
    """The entry of a single-file format whose file `path` is (by its magic where the format has one)."""
    for entry in ENTRIES:
        if entry.single_file and path.suffix == entry.single_file:
            return entry
    from qkvconv.formats.gguf.reading import is_gguf  # torch-free

    return BY_NAME["gguf"] if is_gguf(path) else None


def locate(source: Path) -> tuple[FormatEntry, Path]:
    """The format of `source` (a checkpoint directory, a file in one, or a single-file checkpoint such as a
    .gguf) and the path its Format reads: the file itself for single-file formats, else the directory."""
    if source.is_file():
        entry = _single_file(source)
        if entry is not None:
            return entry, source
        source = source.parent
    return detect(source), source


def detect(directory: Path) -> FormatEntry:
    """The format of a checkpoint directory, from the files it holds (or of a single-file checkpoint)."""
    if directory.is_file() and (entry := _single_file(directory)) is not None:
        return entry
    if directory.is_dir():
        for entry in ENTRIES:
            if entry.matches(directory):
                return entry
    known = "; ".join(f"{e.name}: {' + '.join(e.markers)}" for e in ENTRIES if e.markers)
    raise QkvconvError(f"{directory} holds no checkpoint qkvconv knows (expected {known})")


def detect_name(directory: Path) -> str:
    return detect(directory).name
