"""torch.save's pickle of a state dict, read and written without torch. Pure data, no code run.

A torch.save zip (torch_zip.py lays one out) holds `data.pkl`: the state dict pickled with each
tensor's data left out, named by a persistent id `("storage", torch.<X>Storage, key, location,
numel)` and rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)`; the
bytes are the record `data/<key>`. Conversions that only move bytes (bytepath.py) need no more than
where each tensor's bytes lie, so they read the pickle here, without importing torch (seconds):

    headers = TorchZipHeaders(Path("lit_model.pth"))   # names, meta (shape, DType), raw byte ranges
    layout_pickle(layout, keys, wrapped)              # the data.pkl torch.save writes (writers.TorchWriter)

The unpickler is restricted: it resolves the handful of globals torch.save writes for a state dict (the
rebuild functions, storage classes, dtypes, OrderedDict) to descriptors and refuses every other
global, as torch.load(weights_only=True) does; nothing from the file is ever called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.io.safetensors_header import DType, RawBytes, dtype_name, one_line
from qkvconv.plans.plan import TensorMeta

# torch's typed storage classes by dtype name (torch.storage._dtype_to_storage_type_map)
STORAGE_TYPES: dict[str, str] = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage",
    "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage",
    "bool": "BoolStorage", "bfloat16": "BFloat16Storage", "complex128": "ComplexDoubleStorage",
    "complex64": "ComplexFloatStorage", "qint8": "QInt8Storage", "qint32": "QInt32Storage",
    "quint8": "QUInt8Storage", "quint4x2": "QUInt4x2Storage", "quint2x4": "QUInt2x4Storage",
}
# dtypes torch.save stores as untyped (byte) storages, rebuilt by _rebuild_tensor_v3 (torch.storage._new_dtypes)
UNTYPED_DTYPES = frozenset({
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "complex32", "uint16", "uint32", "uint64", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16",
})
_STORAGE_DTYPES = {storage: name for name, storage in STORAGE_TYPES.items()}


def storable(dtype: object) -> bool:
    """Whether torch.save can store tensors of this dtype (a torch.dtype or a DType)."""
    name = dtype_name(dtype)
    return name in STORAGE_TYPES or name in UNTYPED_DTYPES


# ------------------------------------------------------------------------------------------- writing


class _Global:
    """A global as the pickle names it (module, name), written without importing the module."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # the pickler wants a callable; never called
        raise TypeError(f"{self.module}.{self.name} is only named, never called")


class _Reduce:
    """An object that pickles as `func(*args)`."""

    def __init__(self, func: _Global, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args  # type: ignore[return-value]


class _Storage:
    """Stands in the pickle for the storage of one tensor; the pickler turns it into a persistent id."""

    def __init__(self, key: str, meta: TensorMeta) -> None:
        self.key, self.meta = key, meta


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _tensor(key: str, meta: TensorMeta, named: dict[tuple[str, str], _Global]) -> _Reduce:
    """Pickles exactly as a fresh contiguous CPU tensor of this meta does in torch.save
    (Tensor._reduce_ex_internal). `named`: one _Global per name, so the pickle memoizes each as torch's does."""
    def g(module: str, name: str) -> _Global:
        return named.setdefault((module, name), _Global(module, name))

    name = dtype_name(meta.dtype)
    args = (_Storage(key, meta), 0, tuple(meta.shape), _strides(tuple(meta.shape)), False,
            _Reduce(g("collections", "OrderedDict"), ()))
    if name in UNTYPED_DTYPES:
        return _Reduce(g("torch._utils", "_rebuild_tensor_v3"), args + (g("torch", name),))
    return _Reduce(g("torch._utils", "_rebuild_tensor_v2"), args)


class _LayoutPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """pickle's own (Python) pickler, but a _Global is written by name, and a _Storage as torch.save's
    persistent id ('storage', storage class, key, location, size)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_global

    def __init__(self, file: io.BytesIO, named: dict[tuple[str, str], _Global]) -> None:
        super().__init__(file, protocol=2)
        self._named = named

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, _Storage):
            return None
        name, meta = dtype_name(obj.meta.dtype), obj.meta
        if name in UNTYPED_DTYPES:
            storage = self._named.setdefault(("torch.storage", "UntypedStorage"), _Global("torch.storage", "UntypedStorage"))
            return ("storage", storage, obj.key, "cpu", meta.nbytes)
        storage = self._named.setdefault(("torch", STORAGE_TYPES[name]), _Global("torch", STORAGE_TYPES[name]))
        return ("storage", storage, obj.key, "cpu", meta.numel)


def layout_pickle(layout: dict[str, TensorMeta], keys: dict[str, str], wrapped: bool) -> bytes:
    """The data.pkl torch.save would write for a state dict of this layout (protocol 2, as torch uses)."""
    named: dict[tuple[str, str], _Global] = {}
    state_dict = {name: _tensor(keys[name], meta, named) for name, meta in layout.items()}
    buffer = io.BytesIO()
    _LayoutPickler(buffer, named).dump({"model": state_dict} if wrapped else state_dict)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str | None  # None: untyped (the tensor's dtype comes from _rebuild_tensor_v3)
    numel: int


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of the pickle: its storage record, dtype, shape, strides and offset (in elements)."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage_bytes: int

    @property
    def whole_record(self) -> bool:
        """The tensor is its storage record, contiguous from byte 0: its bytes can be copied as they lie."""
        meta = TensorMeta(self.shape, self.dtype)
        return self.offset == 0 and self.stride == _strides(self.shape) and self.storage_bytes == meta.nbytes


def _rebuild(storage: _StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *rest: Any,
             dtype: str | None = None) -> StoredTensor:
    name = dtype or storage.dtype
    if name is None:
        raise pickle.UnpicklingError("an untyped storage without a dtype")
    try:
        dt = DType(name)
    except ValueError:
        raise pickle.UnpicklingError(f"dtype {name} is not one a conversion moves as bytes") from None
    size = storage.numel if storage.dtype is None else storage.numel * dt.itemsize
    return StoredTensor(storage.key, dt, tuple(shape), tuple(stride), int(offset), size)


def _rebuild_v2(storage: _StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                requires_grad: bool, hooks: Any, metadata: Any = None) -> StoredTensor:
    return _rebuild(storage, offset, shape, stride)


def _rebuild_v3(storage: _StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                requires_grad: bool, hooks: Any, dtype: Any, metadata: Any = None) -> StoredTensor:
    return _rebuild(storage, offset, shape, stride, dtype=dtype)


def _parameter(data: StoredTensor, requires_grad: bool, hooks: Any, *state: Any) -> StoredTensor:
    return data


class _DTypeName(str):
    """A torch dtype named in the pickle (the dtype argument of _rebuild_tensor_v3)."""


class _StorageClass(str):
    """A torch storage class named in a persistent id."""


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch", "UntypedStorage"): _StorageClass("UntypedStorage"),
    ("torch.storage", "UntypedStorage"): _StorageClass("UntypedStorage"),
    **{("torch", storage): _StorageClass(storage) for storage in STORAGE_TYPES.values()},
    **{("torch", name): _DTypeName(name) for name in (*STORAGE_TYPES, *UNTYPED_DTYPES)},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only _GLOBALS; any other global is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a state dict")
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageClass)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage = str(pid[1])
        return _StorageRef(pid[2], None if storage == "UntypedStorage" else _STORAGE_DTYPES[storage], pid[4])


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


def _records(path: Path, fd: int) -> tuple[str, dict[str, tuple[int, int]]]:
    """The archive's folder and each record's (data offset, size), from the central directory and the
    local headers (zipfile would check CRC-32 fields on reading, which torch.save may leave 0)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    if not infos:
        raise QkvconvError(f"{path} is an empty zip, not a torch.save file")
    folder = infos[0].filename.split("/", 1)[0]
    out = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise QkvconvError(f"{path}: record {info.filename} is compressed; torch.save stores records as they are")
        header = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
        if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != 0x04034B50:
            raise QkvconvError(f"{path}: no local header for {info.filename}; the file is corrupt")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        out[info.filename.split("/", 1)[-1]] = (start, info.file_size)
    return folder, out


class TorchZipHeaders:
    """A torch.save zip's state dict (plain or {"model": ...}-wrapped) as names, metas (shape, DType) and
    byte ranges, read without torch: the reader interface of a conversion that only moves bytes. `raw` is
    None for a tensor that is not its whole record, or when the file is not little-endian (its bytes are
    then not what this machine reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise QkvconvError(f"cannot open {path}: {e.strerror}") from None
        try:
            _, self._records = _records(path, fd)
            if "data.pkl" not in self._records:
                raise QkvconvError(f"{path} has no data.pkl; it is not a torch.save file")
            start, size = self._records["data.pkl"]
            obj = _Unpickler(io.BytesIO(os.pread(fd, size, start))).load()
            order = self._records.get("byteorder")
            byteorder = os.pread(fd, order[1], order[0]).decode("ascii", "replace").strip() if order else "little"
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                IndexError, AttributeError, struct.error, OSError) as e:
            raise QkvconvError(f"{path} cannot be read without torch ({one_line(e)})") from None
        finally:
            os.close(fd)
        self.wrapped = isinstance(obj, dict) and isinstance(obj.get("model"), dict)
        self.extra = {k: v for k, v in obj.items() if k != "model"} if self.wrapped else {}
        tensors = obj["model"] if self.wrapped else obj
        if not isinstance(tensors, dict) or not all(isinstance(t, StoredTensor) for t in tensors.values()):
            raise QkvconvError(f"{path} is not a state dict of tensors")
        self._tensors: dict[str, StoredTensor] = dict(tensors)
        self._little = byteorder == "little" and sys.byteorder == "little"

    def names(self) -> list[str]:
        return list(self._tensors)

    def _get(self, name: str) -> StoredTensor:
        if name not in self._tensors:
            raise QkvconvError(f"{self.path} has no tensor {name!r}")
        return self._tensors[name]

    def meta(self, name: str) -> TensorMeta:
        t = self._get(name)
        return TensorMeta(t.shape, t.dtype)

    def raw(self, name: str) -> RawBytes | None:
        t = self._get(name)
        record = self._records.get(f"data/{t.key}")
        if not self._little or not t.whole_record or record is None or record[1] != t.storage_bytes:
            return None
        return RawBytes(self.path, record[0], record[1])

    def release(self) -> None:
        """Nothing is held: the bytes are read by whoever copies or scans them."""

    def files(self) -> list[Path]:
        return [self.path]
