"""The safetensors header, parsed and checked without torch: names, shapes, dtype names and byte ranges.

`inspect` of a Hugging Face directory needs only these, and importing torch costs seconds; readers.py
builds its torch reader on the same parse, so both refuse a damaged file with the same message.

    header = read_header(fd, path)                  # 8-byte little-endian length, then a JSON object
    header.entries["lm_head.weight"]                # Entry(dtype="BF16", shape=(V, E), begin, end)
    SafetensorsHeaders(path).meta("lm_head.weight") # TensorMeta(shape, DType("bfloat16")): torch's name
    SafetensorsHeaders(path).raw("lm_head.weight")  # RawBytes(path, offset, nbytes): where its bytes lie

The conversions that only move bytes (io/bytepath.py) read a checkpoint through these alone: a dtype is
then a `DType`, torch's name with its element size, never a torch.dtype.

Nothing in a header is trusted before it is checked against the dtype table and the size of the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Container
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.plans.plan import TensorMeta

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
MAX_IO_BYTES = 1 << 30  # one preadv/pwrite call moves at most this much (Linux caps at ~2 GiB)

# safetensors dtype name -> (torch's name for it, bytes per element). readers.py maps the names to
# torch dtypes (where the installed torch has them); inspect reports torch's name.
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}
_SIZES = {name: size for name, size in DTYPES.values()} | {"complex64": 8, "complex128": 16}


class DType(str):
    """A dtype by torch's name ("bfloat16"), with what the byte path needs of it: a str, so it equals and
    prints as the name inspect reports; `itemsize` and `is_floating_point` as a torch.dtype has them, so a
    TensorMeta holding one counts its bytes the same way."""

    itemsize: int
    is_floating_point: bool

    def __new__(cls, name: str) -> "DType":
        size = _SIZES.get(name)
        if size is None:
            raise ValueError(f"unknown dtype {name!r}")
        self = super().__new__(cls, name)
        self.itemsize = size
        self.is_floating_point = name.startswith(("float", "bfloat"))
        return self


def dtype_name(dtype: object) -> str:
    """torch's name of a torch.dtype ("torch.bfloat16") or a DType ("bfloat16"): "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RawBytes:
    """Where a tensor's bytes lie, exactly as it holds them, in a file: a writer can copy them inside
    the kernel (copy_file_range) without them passing through this process."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Entry:
    """One tensor of a header: its safetensors dtype name, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int  # file offset of the data section (the offsets above count from here)

    def names(self) -> list[str]:
        """Tensor names in the order their data lies in the file."""
        return [n for n, _ in sorted(self.entries.items(), key=lambda item: item[1].begin)]


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pread_exact(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` from `offset`; a file that ends early is truncated."""
    done = 0
    while done < len(buffer):
        try:
            n = os.preadv(fd, [buffer[done:done + MAX_IO_BYTES]], offset + done)
        except OSError as e:
            raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
        if n == 0:
            raise QkvconvError(f"{path} ends at byte {offset + done}, in the middle of a tensor; the file is truncated")
        done += n


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    buffer = bytearray(size)
    pread_exact(fd, memoryview(buffer), offset, path)
    return bytes(buffer)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, spec: Any, data_size: int, known: Container[str]) -> Entry:
    """One header entry, checked against the dtype table and the size of the file."""
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise QkvconvError(f"{path}: header entry {name!r} lacks dtype, shape or data_offsets; the file is corrupt")
    dtype = spec["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES or dtype not in known:
        raise QkvconvError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise QkvconvError(f"{path}: tensor {name!r} has an invalid shape {shape!r}; the header is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise QkvconvError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the header is corrupt")
    entry = Entry(dtype, tuple(shape), *offsets)
    nbytes = entry.numel * DTYPES[dtype][1]
    if entry.end < entry.begin or entry.end - entry.begin != nbytes:
        raise QkvconvError(
            f"{path}: tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
            f"span {entry.end - entry.begin}; the header is corrupt"
        )
    if entry.end > data_size:
        raise QkvconvError(
            f"{path}: tensor {name!r} ends at data byte {entry.end} but the file holds only {data_size} bytes of "
            f"data; the file is truncated or its header is corrupt"
        )
    return entry


def _check_no_overlap(path: Path, entries: dict[str, Entry]) -> None:
    previous: tuple[str, int] | None = None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if previous is not None and e.begin < previous[1] and e.end > e.begin:
            raise QkvconvError(f"{path}: tensors {previous[0]!r} and {name!r} overlap; the header is corrupt")
        if e.end > e.begin:
            previous = (name, e.end)


def read_header(fd: int, path: Path, known: Container[str] = DTYPES) -> Header:
    """Parse and check the header of the open safetensors file `fd`. `known`: the dtype names the caller
    can hold (readers.py: those the installed torch has); any other is refused as unknown."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise QkvconvError(f"{path} is {size} bytes, too short for a safetensors file; it is truncated")
    (header_len,) = struct.unpack("<Q", _pread(fd, 8, 0, path))
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise QkvconvError(
            f"{path}: the header claims {header_len} bytes but the file has {size}; "
            f"the file is truncated or not a safetensors file"
        )
    try:
        header = json.loads(_pread(fd, header_len, 8, path).decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise QkvconvError(f"{path}: the safetensors header is not valid JSON ({one_line(e)})") from None
    if not isinstance(header, dict):
        raise QkvconvError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QkvconvError(f"{path}: __metadata__ must map names to strings")
    data_size = size - 8 - header_len
    entries = {name: _parse_entry(path, name, spec, data_size, known) for name, spec in header.items()}
    _check_no_overlap(path, entries)
    return Header(metadata, entries, 8 + header_len)


class SafetensorsHeaders:
    """One .safetensors file's tensor metadata, for reports that read no tensor data (inspect) and for
    conversions that only move its bytes (bytepath.py): the reader interface's names/meta/raw/files,
    without torch. A meta is a TensorMeta (shape, DType)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 (as readers.py opens it: same errors)
        except OSError as e:
            raise QkvconvError(f"cannot open {path}: {e.strerror}") from None
        with file:
            self.header = read_header(file.fileno(), path)

    def names(self) -> list[str]:
        return self.header.names()

    def _entry(self, name: str) -> Entry:
        entry = self.header.entries.get(name)
        if entry is None:
            raise QkvconvError(f"{self.path} has no tensor {name!r}")
        return entry

    def meta(self, name: str) -> TensorMeta:
        entry = self._entry(name)
        return TensorMeta(entry.shape, DType(DTYPES[entry.dtype][0]))

    def raw(self, name: str) -> RawBytes:
        entry = self._entry(name)
        return RawBytes(self.path, self.header.data_start + entry.begin, entry.end - entry.begin)

    def release(self) -> None:
        """Nothing is held: the bytes are read by whoever copies or scans them."""

    def files(self) -> list[Path]:
        return [self.path]
