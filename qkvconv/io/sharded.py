"""Hugging Face weight files: which a directory holds, and sharded weights behind their index. Torch-free:
the shard readers are passed in (readers.py's torch readers, or safetensors_header.py's metadata-only
one, with which `inspect` reads an HF directory without importing torch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError
from qkvconv.io.safetensors_header import SafetensorsHeaders, one_line

if TYPE_CHECKING:
    import torch

# Hugging Face weight files, in the order transformers looks for them.
HF_SAFETENSORS, HF_SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
HF_TORCH, HF_TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map of an HF index file: tensor name -> shard file name."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise QkvconvError(f"{path} is not valid JSON ({one_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise QkvconvError(f"{path} has no weight_map (tensor name -> shard file); it is not a sharded-weights index")
    return weight_map


def _shard_path(index: Path, name: str) -> Path:
    """Where a shard named in an index lives; names that leave the directory are refused."""
    directory = index.parent.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(directory):
        raise QkvconvError(f"{index} names shard {name!r}, outside its directory; refusing to read it")
    if not path.is_file():
        raise QkvconvError(f"{index} names shard {name}, which is missing from {index.parent}")
    return path


class ShardedReader:
    """HF sharded weights: the index's weight_map decides which shard holds which tensor. Each method
    is the shard reader's own (a TensorReader, readers.py), so this one serves whatever they serve."""

    def __init__(self, index: Path, open_shard: Callable[[Path], Any]) -> None:
        self.index = index
        weight_map = _read_index(index)
        shard_names = sorted(set(weight_map.values()))
        self._shards = {s: open_shard(_shard_path(index, s)) for s in shard_names}
        self._where: dict[str, Any] = {}
        for shard in shard_names:
            listed = {t for t, s in weight_map.items() if s == shard}
            held = self._shards[shard].names()
            absent = listed.difference(held)
            if absent:
                raise QkvconvError(f"{index} puts {min(absent)!r} in {shard}, but that file does not hold it")
            self._where.update((t, self._shards[shard]) for t in held if t in listed)

    def _reader(self, name: str) -> Any:
        if name not in self._where:
            raise QkvconvError(f"{self.index} lists no tensor {name!r}")
        return self._where[name]

    def names(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> Any:
        return self._reader(name).meta(name)

    def read(self, name: str) -> Any:
        return self._reader(name).read(name)

    def peek(self, name: str) -> Any:
        return self._reader(name).peek(name)

    def raw(self, name: str) -> Any:
        return self._reader(name).raw(name)

    def release(self) -> None:
        for shard in self._shards.values():
            shard.release()

    def files(self) -> list[Path]:
        return [self.index] + [p for shard in self._shards.values() for p in shard.files()]


def open_headers(directory: Path) -> SafetensorsHeaders | ShardedReader | None:
    """The tensor metadata of an HF directory's safetensors weights (one file or sharded), read without
    torch; None when its weights are torch pickles (or missing: readers.open_reader says which)."""
    if (directory / HF_SAFETENSORS).is_file():
        return SafetensorsHeaders(directory / HF_SAFETENSORS)
    if (directory / HF_SAFETENSORS_INDEX).is_file():
        return ShardedReader(directory / HF_SAFETENSORS_INDEX, SafetensorsHeaders)
    return None


class PrefixedReader:
    """Another reader's tensors under `prefix` + their names: files saved from a transformers base model (no head:
    `h.0.attn.c_attn.weight`, as GPT-2's on the Hub) read under the names of the class with a head
    (`transformer.h.0.attn.c_attn.weight`), as transformers' loading adds its `base_model_prefix`. Torch-free: it
    wraps the headers inspect reads as well as a TensorReader."""

    def __init__(self, inner: Any, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    def _name(self, name: str) -> str:
        if not name.startswith(self.prefix):
            raise KeyError(name)
        return name[len(self.prefix):]

    def names(self) -> list[str]:
        return [self.prefix + n for n in self.inner.names()]

    def meta(self, name: str) -> Any:
        return self.inner.meta(self._name(name))

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(self._name(name))

    def peek(self, name: str) -> torch.Tensor:
        return self.inner.peek(self._name(name))

    def raw(self, name: str) -> Any:
        return self.inner.raw(self._name(name))

    def release(self) -> None:
        self.inner.release()

    def files(self) -> list[Path]:
        return self.inner.files()
