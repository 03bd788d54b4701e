"""Read checkpoint tensors one at a time, so converting a model needs about one tensor of memory.

    reader = open_reader(Path("Llama-3-8B"))        # .pth/.pt/.bin/.lora, .safetensors, or an HF directory
    for name in reader.names():                      # file order
        meta = reader.meta(name)                     # shape and dtype, nothing read yet
        tensor = reader.read(name)                   # an owned, contiguous CPU copy
        ...
        reader.release()                             # give back the pages read so far

safetensors headers are parsed and checked by safetensors_header.py (torch-free, so `inspect` can
use it alone), and each tensor is read with preadv straight into a fresh tensor: no mmap, so the memory used is exactly what was read. torch pickles are opened with
weights_only=True (no code from a checkpoint ever runs) and, when they are zip files, mmap=True;
`read` copies, so `release` can drop the mapping's pages (qkvconv.pages). Every problem with a file
is one QkvconvError saying which file and what is wrong.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from qkvconv.errors import QkvconvError
from qkvconv.plans.plan import TensorMeta
from qkvconv.io.pages import MappedFile

from qkvconv.io.safetensors_header import DTYPES, Header, RawBytes, one_line, pread_exact, read_header
from qkvconv.io.sharded import HF_SAFETENSORS, HF_SAFETENSORS_INDEX, HF_TORCH, HF_TORCH_INDEX, ShardedReader

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".lora")
SAFETENSORS_SUFFIX = ".safetensors"

# safetensors dtype names -> the torch dtypes this torch has (the float8 and unsigned ones are newer)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, torch_name) for name, (torch_name, _) in DTYPES.items() if hasattr(torch, torch_name)
}


class TensorReader(Protocol):
    """One checkpoint, read a tensor at a time."""

    def names(self) -> list[str]: ...
    def meta(self, name: str) -> TensorMeta: ...
    def read(self, name: str) -> torch.Tensor: ...
    def peek(self, name: str) -> torch.Tensor: ...  # read-only, valid until release(): no copy where mapped
    def raw(self, name: str) -> RawBytes | None: ...  # None: the bytes are not stored as they are
    def release(self) -> None: ...
    def files(self) -> list[Path]: ...


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview, without copying (no numpy)."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only


_mallopt = getattr(_libc, "mallopt", None)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_buffers(threshold: int = 2**20) -> None:
    """Let glibc serve every buffer of `threshold` bytes or more with its own mmap, returned to the OS
    on free.

    A fixed threshold also switches off glibc's dynamic one (see give_back_heap), so tensor-sized
    buffers no longer pile up in the heap for malloc_trim to hand back page by page: HF -> litgpt on
    TinyLlama into tmpfs, median of 8 alternating runs, 4.4 s -> 4.0 s (system time -0.6 s), same peak
    RSS. Process-wide, like every malloc setting; harmless for the rest of the process.
    """
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, threshold)


def give_back_heap() -> None:
    """Return freed heap memory to the OS.

    glibc raises its mmap threshold after the first large free, so later tensor-sized buffers come
    from the heap; torch's aligned allocations then rarely fit a freed hole exactly, and a loop of
    read/convert/write grew by one tensor per step (measured: +200 MB over a 200 MB checkpoint).
    malloc_trim(0) hands the free pages back (about 0.2 ms a call).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _missing(path: Path, name: str) -> QkvconvError:
    return QkvconvError(f"{path} has no tensor {name!r}")


# ---------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class _Entry:
    meta: TensorMeta
    begin: int  # byte offsets into the data section, as in the header
    end: int


def _entries(header: Header) -> dict[str, _Entry]:
    return {name: _Entry(TensorMeta(e.shape, SAFETENSORS_DTYPES[e.dtype]), e.begin, e.end)
            for name, e in header.entries.items()}


class SafetensorsReader:
    """One .safetensors file; each tensor read with preadv into memory it owns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (kept for the reader's life)
        except OSError as e:
            raise QkvconvError(f"cannot open {path}: {e.strerror}") from None
        try:
            header = read_header(self._file.fileno(), path, known=SAFETENSORS_DTYPES)
        except BaseException:
            self._file.close()
            raise
        self.metadata, self._data_start, self._order = header.metadata, header.data_start, header.names()
        self._entries = _entries(header)
        self._map: mmap.mmap | None = None

    def names(self) -> list[str]:
        return list(self._order)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._entries:
            raise _missing(self.path, name)
        return self._entries[name].meta

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None:
            raise _missing(self.path, name)
        data = torch.empty(entry.meta.nbytes, dtype=torch.uint8)  # uninitialised: no page is touched twice
        pread_exact(self._file.fileno(), byte_view(data), self._data_start + entry.begin, self.path)
        return data.view(entry.meta.dtype).reshape(entry.meta.shape)

    def peek(self, name: str) -> torch.Tensor:
        """The tensor in a shared read-only mapping of the file (made on first use): no copy."""
        entry = self._entries.get(name)
        if entry is None:
            raise _missing(self.path, name)
        if entry.meta.nbytes == 0:
            return torch.empty(entry.meta.shape, dtype=entry.meta.dtype)
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # "not writable": peeked tensors are only compared, never written
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(self._map, dtype=torch.uint8, count=entry.meta.nbytes,
                                    offset=self._data_start + entry.begin)
        return data.view(entry.meta.dtype).reshape(entry.meta.shape)

    def raw(self, name: str) -> RawBytes:
        entry = self._entries.get(name)
        if entry is None:
            raise _missing(self.path, name)
        return RawBytes(self.path, self._data_start + entry.begin, entry.meta.nbytes)

    def release(self) -> None:
        """Drop the mapping's resident pages (peeks); freed copies (reads) go back to the OS."""
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)
        give_back_heap()

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------- torch pickles


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _zip_byteorder(path: Path) -> str | None:
    """The `byteorder` record of a torch.save zip ("little" | "big"), None when it has none (torch <
    1.9 wrote none and only little-endian files). Read with torch's reader: zipfile would check CRC-32
    fields, which torch.save (crc32 off) and qkvconv's TorchWriter leave 0."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        if not reader.has_record("byteorder"):
            return None
        return bytes(reader.get_record("byteorder")).decode("ascii", "replace").strip()
    except (OSError, RuntimeError, ValueError):
        return "unknown"


def _is_legacy_pickle(path: Path) -> bool:
    """A torch.save file of the pre-1.6 format: a bare pickle (protocol 2 opcode first), not a zip."""
    with open(path, "rb") as f:
        return f.read(2) == b"\x80\x02"


def safe_torch_load(path: Path, mmap: bool) -> Any:
    """torch.load with weights_only=True; every failure becomes one QkvconvError. `mmap`: the caller
    streams the file (litgpt checkpoints), which the legacy pickle format cannot serve."""
    if mmap and path.is_file() and not _is_zip(path) and _is_legacy_pickle(path):
        raise QkvconvError(
            f"{path} is in torch's legacy serialization format (torch.save before 1.6, or "
            "_use_new_zipfile_serialization=False), which cannot be memory-mapped: re-save it in the zip format "
            f"with python -c \"import torch; p='{path}'; torch.save(torch.load(p, weights_only=True), p)\""
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise QkvconvError(
            f"{path} holds more than tensors and was refused (weights_only=True; qkvconv never runs code "
            f"from a checkpoint): {one_line(e)}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error) as e:
        raise QkvconvError(f"cannot read {path}: the file is truncated or corrupt ({one_line(e)})") from None


def split_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], bool, dict[str, Any]]:
    """(tensors, wrapped, other top-level entries) of a plain or {"model": ...}-wrapped state dict."""
    wrapped, extra = False, {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        wrapped, extra = True, {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise QkvconvError(f"{path} is not a state dict (expected a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise QkvconvError(f"{path}: entry {bad[0]!r} is not a tensor; this is not a state dict")
    return dict(obj), wrapped, extra


class TorchReader:
    """A torch.save'd state dict (.pth/.pt/.bin/.lora), plain or wrapped as {"model": ...}.

    Zip files (torch >= 1.6) are memory-mapped, so only what is read becomes resident, and
    `release` drops it again. Legacy (non-zip) pickles cannot be mapped: they load whole.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise QkvconvError(f"{path} does not exist")
        self.path = path
        self.mmapped = _is_zip(path)
        self._tensors, self.wrapped, self.extra = split_state_dict(safe_torch_load(path, self.mmapped), path)
        self._mapped = MappedFile(path, (t.data_ptr() for t in self._tensors.values())) if self.mmapped else None
        # raw bytes are what this machine reads only when the file and the machine are little-endian
        self._raw_ok = self.mmapped and sys.byteorder == "little" and _zip_byteorder(path) in ("little", None)

    def names(self) -> list[str]:
        return list(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._tensors:
            raise _missing(self.path, name)
        return TensorMeta.of(self._tensors[name])

    def read(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise _missing(self.path, name)
        source = self._tensors[name]
        copy = source.detach().clone(memory_format=torch.contiguous_format)
        if self._mapped is not None:  # the mapped bytes are not needed again: keep RSS at one copy
            self._mapped.release_range(source.data_ptr(), source.untyped_storage().nbytes())
        return copy

    def peek(self, name: str) -> torch.Tensor:
        """The tensor in the mapped file itself, for comparing: no copy (about 2x faster than read);
        do not modify it, and drop it before release()."""
        if name not in self._tensors:
            raise _missing(self.path, name)
        return self._tensors[name].detach() if self.mmapped else self.read(name)

    def raw(self, name: str) -> RawBytes | None:
        """The tensor's record in the zip, when it is the whole record (torch.save's tensors are)."""
        if name not in self._tensors:
            raise _missing(self.path, name)
        t = self._tensors[name]
        nbytes = t.numel() * t.element_size()
        if not self._raw_ok or self._mapped is None or not t.is_contiguous() or \
                t.untyped_storage().nbytes() != nbytes or nbytes == 0:
            return None
        offset = self._mapped.file_offset(t.data_ptr(), nbytes)
        return None if offset is None else RawBytes(self.path, offset, nbytes)

    def release(self) -> None:
        """Drop the mapping's resident pages and return freed copies to the OS; read tensors stay valid."""
        if self._mapped is not None:
            self._mapped.release()
        give_back_heap()

    def files(self) -> list[Path]:
        return [self.path]


# ---------------------------------------------------------------------------------------- entry point


def _open_directory(directory: Path) -> TensorReader:
    if (directory / HF_SAFETENSORS).is_file():
        return SafetensorsReader(directory / HF_SAFETENSORS)
    if (directory / HF_SAFETENSORS_INDEX).is_file():
        return ShardedReader(directory / HF_SAFETENSORS_INDEX, SafetensorsReader)
    if (directory / HF_TORCH).is_file():
        return TorchReader(directory / HF_TORCH)
    if (directory / HF_TORCH_INDEX).is_file():
        return ShardedReader(directory / HF_TORCH_INDEX, TorchReader)
    raise QkvconvError(
        f"no weights in {directory}: expected {HF_SAFETENSORS}, {HF_SAFETENSORS_INDEX}, {HF_TORCH} or {HF_TORCH_INDEX}"
    )


def _sniff(path: Path) -> str | None:
    """Tell the format from the first bytes: a zip (torch.save), a pickle, or a safetensors header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def open_reader(path: Path) -> TensorReader:
    """A reader for a torch pickle, a .safetensors file, or a directory of Hugging Face weights."""
    path = Path(path)
    if path.is_dir():
        return _open_directory(path)
    if not path.exists():
        raise QkvconvError(f"{path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        return SafetensorsReader(path)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchReader(path)
    kind = _sniff(path)  # a staged file under a temporary name, or a file renamed by the user
    if kind == "safetensors":
        return SafetensorsReader(path)
    if kind == "torch":
        return TorchReader(path)
    raise QkvconvError(
        f"{path}: unknown weights format (expected {SAFETENSORS_SUFFIX}, {', '.join(PICKLE_SUFFIXES)} or a directory)"
    )
