"""Write a checkpoint one tensor at a time, in any order, keeping none of it in memory.

    layout = {name: reader.meta(name) for name in reader.names()}     # told everything up front
    writer = SafetensorsWriter(out_dir, layout, max_shard_size=5 * 2**30)
    for name in reader.names():
        writer.write(name, convert(reader.read(name)))                 # straight to disk
    files = writer.close()                                             # checks, fsyncs; abort() deletes

Both writers know every offset from the layout alone. SafetensorsWriter writes each shard's header
when it opens and each tensor with pwrite at its place. TorchWriter writes a zip that torch.load
reads as torch.save's own: the pickle (built from the layout: it only names storages by key), the
local headers and every record's place are laid out first (torch_zip.py), each tensor then goes
with pwrite to its record `data/<key>`. Both also take `copy_raw`: a tensor's bytes copied from
another file inside the kernel (copy_file_range), for tensors a conversion leaves as they are.

A tensor that does not match the announced layout, or a close() with tensors missing, is a bug in
the caller (LayoutViolation); a file that cannot be written is the environment (QkvconvError).

save_torch is plain torch.save for what is small and already in memory (LoRA adapters), with the
same QkvconvError when the file cannot be written.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from qkvconv.io import torch_zip
from qkvconv.errors import QkvconvError
from qkvconv.io.transaction import fsync_dir
from qkvconv.io.safetensors_header import DTYPES, MAX_IO_BYTES, RawBytes, dtype_name, pread_exact
from qkvconv.io.torch_pickle import layout_pickle, storable
from qkvconv.plans.plan import TensorMeta

if TYPE_CHECKING:  # torch is imported where a tensor is written: copies of bytes need none (bytepath.py)
    import torch

SAFETENSORS_NAMES = {torch_name: name for name, (torch_name, _) in DTYPES.items()}  # "bfloat16" -> "BF16"
HEADER_ALIGNMENT = 8  # the safetensors library pads its JSON header with spaces to a multiple of 8


class LayoutViolation(ValueError):
    """The caller broke its promise: a tensor outside the layout, of another shape or dtype, or missing."""


class _Layout:
    """The announced tensors, and which of them have been written; shared checks of both writers."""

    def __init__(self, layout: dict[str, TensorMeta]) -> None:
        self.metas = dict(layout)
        self.arrived: list[str] = []
        self._seen: set[str] = set()

    def accept(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as contiguous CPU memory, after checking it against the layout."""
        self.accept_meta(name, TensorMeta.of(tensor))
        return tensor.detach().to("cpu").contiguous()

    def accept_meta(self, name: str, got: TensorMeta) -> None:
        """Check a tensor's shape and dtype against the layout and mark it written."""
        meta = self.metas.get(name)
        if meta is None:
            raise LayoutViolation(f"{name!r} is not in the layout this writer was opened with")
        if name in self._seen:
            raise LayoutViolation(f"{name!r} was already written")
        if got.shape != meta.shape or dtype_name(got.dtype) != dtype_name(meta.dtype):
            raise LayoutViolation(f"{name!r}: got {got.shape} {got.dtype}, the layout says {meta.shape} {meta.dtype}")
        self._seen.add(name)
        self.arrived.append(name)

    def check_complete(self) -> None:
        missing = [n for n in self.metas if n not in self._seen]
        if missing:
            raise LayoutViolation(f"{len(missing)} tensors were never written, first {missing[0]!r}")


def _create(path: Path) -> int:
    """A new file for writing; an existing file is never overwritten (the caller picks fresh names).

    Created 0666 less the umask, like open(path, "w"): a new file's mode is the user's to choose (a
    file that replaces another takes that one's mode when it is swapped in: transaction.py).
    """
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except FileExistsError:
        raise QkvconvError(f"cannot write {path}: it already exists") from None
    except OSError as e:
        raise QkvconvError(f"cannot write {path}: {e.strerror}") from None


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done:done + MAX_IO_BYTES], offset + done)
        except OSError as e:
            raise QkvconvError(f"cannot write {path}: {e.strerror}") from None


def _copy_range(src: int, dst: int, raw: RawBytes, offset: int, path: Path) -> None:
    """raw.nbytes from file `src` at raw.offset to file `dst` at `offset`, inside the kernel
    (copy_file_range: the bytes never enter this process); plain reads and writes where the kernel or
    the filesystems cannot."""
    done = 0
    while done < raw.nbytes:
        want = min(raw.nbytes - done, MAX_IO_BYTES)
        try:
            n = os.copy_file_range(src, dst, want, raw.offset + done, offset + done)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise QkvconvError(f"cannot write {path}: {e.strerror}") from None
            n = _copy_by_hand(src, dst, want, raw.offset + done, offset + done, path)
        if n == 0:
            raise QkvconvError(f"{raw.path} ends at byte {raw.offset + done}, in the middle of a tensor; it is truncated")
        done += n


class _RawSources:
    """The files copy_raw reads from, each opened once, closed with the writer."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def accept(
        self, layout: "_Layout", name: str, meta: TensorMeta, pieces: Sequence[RawBytes]
    ) -> list[tuple[int, RawBytes]]:
        """Check the tensor against the layout and its byte ranges; each piece with its file's descriptor."""
        total = sum(piece.nbytes for piece in pieces)
        if meta.nbytes != total:
            raise LayoutViolation(f"{name!r}: {total} bytes in {len(pieces)} piece(s) for a tensor of {meta.nbytes}")
        layout.accept_meta(name, meta)
        return [(self._fd(piece.path), piece) for piece in pieces]

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _copy_pieces(pieces: list[tuple[int, RawBytes]], dst: int, offset: int, path: Path, gather: bool = False) -> None:
    """The pieces one after another into `dst` from `offset`. `gather`: many small pieces, read into one
    buffer and written at once (a copy each would cost more than the bytes)."""
    if gather:
        data = bytearray(sum(piece.nbytes for _, piece in pieces))
        view, at = memoryview(data), 0
        for src, piece in pieces:
            pread_exact(src, view[at:at + piece.nbytes], piece.offset, piece.path)
            at += piece.nbytes
        _pwrite_all(dst, view, offset, path)
        return
    for src, piece in pieces:
        _copy_range(src, dst, piece, offset, path)
        offset += piece.nbytes


def _copy_by_hand(src: int, dst: int, nbytes: int, src_offset: int, dst_offset: int, path: Path) -> int:
    data = os.pread(src, min(nbytes, 64 * 2**20), src_offset)
    _pwrite_all(dst, memoryview(data), dst_offset, path)
    return len(data)


# ---------------------------------------------------------------------------------------- safetensors


def plan_shards(layout: dict[str, TensorMeta], max_shard_size: int | None, prefix: str = "model") -> dict[str, list[str]]:
    """File name -> tensor names, split exactly as HF save_pretrained (huggingface_hub) splits.

    Tensors are taken in layout order; a shard is closed when the next tensor would push it over
    max_shard_size; a tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, meta in layout.items():
        if max_shard_size is not None and meta.nbytes > max_shard_size:
            shards.append([name])
            continue
        if max_shard_size is not None and current and size + meta.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += meta.nbytes
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {f"{prefix}.safetensors": shards[0]}
    n = len(shards)
    return {f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors": names for i, names in enumerate(shards)}


def _header(names: list[str], layout: dict[str, TensorMeta], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The padded header of one shard and each tensor's absolute file offset.

    Tensors go widest dtype first (as the safetensors library orders them), layout order within a
    width, so every tensor starts at a multiple of its element size: loaders can view it in place.
    """
    ordered = sorted(names, key=lambda n: -layout[n].dtype.itemsize)  # stable: layout order kept
    entries: dict[str, Any] = {"__metadata__": metadata}
    relative: dict[str, int] = {}
    position = 0
    for name in ordered:
        meta = layout[name]
        entries[name] = {"dtype": SAFETENSORS_NAMES[dtype_name(meta.dtype)], "shape": list(meta.shape),
                         "data_offsets": [position, position + meta.nbytes]}
        relative[name] = position
        position += meta.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    start = 8 + len(text)
    header = len(text).to_bytes(8, "little") + text
    return header, {name: start + offset for name, offset in relative.items()}


def _check_safetensors_layout(layout: dict[str, TensorMeta], metadata: dict[str, str]) -> None:
    for name, meta in layout.items():
        if name == "__metadata__":
            raise LayoutViolation("'__metadata__' is reserved by safetensors and cannot name a tensor")
        if dtype_name(meta.dtype) not in SAFETENSORS_NAMES:
            raise LayoutViolation(f"{name!r}: safetensors has no dtype for {meta.dtype}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LayoutViolation("safetensors metadata must map strings to strings")


class SafetensorsWriter:
    """Safetensors file(s) named and split like HF save_pretrained, written tensor by tensor."""

    def __init__(self, directory: Path, layout: dict[str, TensorMeta], *, max_shard_size: int | None = None,
                 prefix: str = "model", metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        metadata = {"format": "pt", **(metadata or {})}
        _check_safetensors_layout(layout, metadata)
        self._layout = _Layout(layout)
        self.shard_files: dict[str, list[str]] = plan_shards(layout, max_shard_size, prefix)
        self._fds: dict[str, int] = {}
        self._sources = _RawSources()
        self._where: dict[str, tuple[str, int]] = {}  # tensor -> (file name, absolute offset)
        self._written: list[Path] = []
        self._open = True
        self._finished = False
        try:
            for file_name, names in self.shard_files.items():
                self._open_shard(file_name, names, metadata)
        except BaseException:
            self.abort()
            raise

    @property
    def index_name(self) -> str:
        return f"{self.prefix}.safetensors.index.json"

    def _open_shard(self, file_name: str, names: list[str], metadata: dict[str, str]) -> None:
        path = self.directory / file_name
        header, offsets = _header(names, self._layout.metas, metadata)
        fd = _create(path)
        self._fds[file_name] = fd
        self._written.append(path)
        _pwrite_all(fd, memoryview(header), 0, path)
        size = len(header) + sum(self._layout.metas[n].nbytes for n in names)
        try:
            os.ftruncate(fd, size)  # the file has its final size from the start; data fills it in
        except OSError as e:
            raise QkvconvError(f"cannot write {path}: {e.strerror}") from None
        self._where.update((n, (file_name, offsets[n])) for n in names)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Check `tensor` against the layout and write it at its place in its shard."""
        if not self._open:
            raise LayoutViolation("this writer is closed")
        from qkvconv.io.readers import byte_view

        data = self._layout.accept(name, tensor)
        file_name, offset = self._where[name]
        _pwrite_all(self._fds[file_name], byte_view(data), offset, self.directory / file_name)

    def copy_raw(self, name: str, meta: TensorMeta, pieces: Sequence[RawBytes], *, gather: bool = False) -> None:
        """Write tensor `name` (of shape and dtype `meta`) as these byte ranges of other files, in order
        (`gather`: small pieces, read into memory and written at once)."""
        if not self._open:
            raise LayoutViolation("this writer is closed")
        sources = self._sources.accept(self._layout, name, meta, pieces)
        file_name, offset = self._where[name]
        _copy_pieces(sources, self._fds[file_name], offset, self.directory / file_name, gather)

    def _index(self) -> bytes:
        total = sum(m.nbytes for m in self._layout.metas.values())
        weight_map = {n: f for f, names in self.shard_files.items() for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")

    def finish(self) -> None:
        """Check every tensor arrived and write the index: the files are complete and can be read (a check
        can read them back while close() makes them durable), not yet durable."""
        if not self._open:
            raise LayoutViolation("this writer is closed")
        if self._finished:
            return
        self._layout.check_complete()
        if len(self.shard_files) > 1:
            path = self.directory / self.index_name
            fd = _create(path)
            self._fds[self.index_name] = fd  # synced and closed with the shards, last
            self._written.append(path)
            _pwrite_all(fd, memoryview(self._index()), 0, path)
        self._finished = True

    def close(self) -> list[Path]:
        """finish(), and make the files durable, the index last; the files written."""
        self.finish()
        self._sources.close()
        for file_name in list(self._fds):
            fd = self._fds.pop(file_name)
            try:
                os.fsync(fd)
            except OSError as e:
                raise QkvconvError(f"cannot write {self.directory / file_name}: {e.strerror}") from None
            finally:
                os.close(fd)
        fsync_dir(self.directory)
        self._open = False
        return list(self._written)

    def abort(self) -> None:
        """Delete everything this writer created."""
        self._sources.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()
        self._open = False

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.close()


# ---------------------------------------------------------------------------------------- torch zip


def _storage_alignment() -> int:
    """torch.save's record alignment (configurable since torch 2.5; 64 before and by default). Read from
    torch only where it is loaded: a setting exists only in a process that imported torch."""
    if "torch" not in sys.modules:
        return 64
    try:
        from torch.utils.serialization import config
    except ImportError:
        return 64
    return int(getattr(config.save, "storage_alignment", 64))


# What torch.save (torch 1.6 to 2.13) writes in these records
_FORMAT_VERSION = b"3\n"


class TorchWriter:
    """A torch.save-compatible .pth zip, laid out first (torch_zip.py), then written tensor by tensor.

    Storage keys are the tensors' positions in the layout, so the pickle, every local header and
    every record's place are known before the first tensor arrives: tensors are written with pwrite
    in any order (or copied from another file inside the kernel, copy_raw), the file has its final
    size from the start, and close() writes the central directory. The records follow key order;
    `.format_version` (which lets torch compute offsets from its own header sizes) is not written,
    so torch reads each record's offset from its header, as for any zip.
    """

    def __init__(self, path: Path, layout: dict[str, TensorMeta], *, wrapped: bool = False) -> None:
        self.path = Path(path)
        for name, meta in layout.items():
            if not storable(meta.dtype):
                raise LayoutViolation(f"{name!r}: torch.save cannot store {meta.dtype}")
        self._layout = _Layout(layout)
        self._keys = {name: str(i) for i, name in enumerate(layout)}
        self._folder = self.path.stem or "archive"  # torch.save(path) names the folder after the file
        small = {
            "data.pkl": layout_pickle(layout, self._keys, wrapped),
            ".storage_alignment": str(_storage_alignment()).encode(),
            "byteorder": sys.byteorder.encode(),
        }
        tail = {"version": _FORMAT_VERSION, ".data/serialization_id": str(uuid.uuid4().int).encode()}
        sizes = [(n, len(b)) for n, b in small.items()] + [(f"data/{self._keys[n]}", m.nbytes) for n, m in layout.items()]
        sizes += [(n, len(b)) for n, b in tail.items()]
        self._records, self._directory_at = torch_zip.layout(self._folder, sizes, _storage_alignment())
        self._data_at = {r.name: r.data_offset for r in self._records}
        self._sources = _RawSources()
        self._finished = False
        self._fd: int | None = _create(self.path)  # O_EXCL: never clobber
        try:
            end = torch_zip.end_of_archive(self._folder, self._records, self._directory_at)
            os.ftruncate(self._fd, self._directory_at + len(end))  # its final size now: a size limit fails here
            for r in self._records:
                _pwrite_all(self._fd, memoryview(r.header), r.header_offset, self.path)
            for name, data in {**small, **tail}.items():
                _pwrite_all(self._fd, memoryview(data), self._data_at[name], self.path)
        except OSError as e:
            self.abort()
            raise QkvconvError(f"cannot write {self.path}: {e.strerror}") from None
        except BaseException:
            self.abort()
            raise

    def _place(self, name: str) -> int:
        """Where tensor `name` (already accepted by the layout) goes in the file."""
        return self._data_at[f"data/{self._keys[name]}"]

    def _check_open(self) -> None:
        if self._fd is None:
            raise LayoutViolation("this writer is closed")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Check `tensor` against the layout and write its bytes at its record's place."""
        self._check_open()
        from qkvconv.io.readers import byte_view

        data = self._layout.accept(name, tensor)
        self._guarded(_pwrite_all, self._fd, byte_view(data), self._place(name), self.path)

    def copy_raw(self, name: str, meta: TensorMeta, pieces: Sequence[RawBytes], *, gather: bool = False) -> None:
        """Write tensor `name` (of shape and dtype `meta`) as these byte ranges of other files, in order
        (`gather`: small pieces, read into memory and written at once)."""
        self._check_open()
        sources = self._sources.accept(self._layout, name, meta, pieces)
        self._guarded(_copy_pieces, sources, self._fd, self._place(name), self.path, gather)

    def _guarded(self, action: Callable[..., object], *args: Any) -> None:
        """Run a write; a failure removes the partial file before it is reported."""
        try:
            action(*args)
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        """Check every tensor arrived and write the central directory: the file is complete and can be read
        (a check can read it back while close() makes it durable), not yet durable."""
        if self._fd is None:
            raise LayoutViolation("this writer is closed")
        if self._finished:
            return
        self._layout.check_complete()
        end = torch_zip.end_of_archive(self._folder, self._records, self._directory_at)
        self._guarded(_pwrite_all, self._fd, memoryview(end), self._directory_at, self.path)
        self._finished = True

    def close(self) -> Path:
        """finish(), and make the file durable."""
        self.finish()

        def sync() -> None:
            assert self._fd is not None
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise QkvconvError(f"cannot write {self.path}: {e.strerror}") from None

        self._guarded(sync)
        self._close_files()
        return self.path

    def _close_files(self) -> None:
        self._sources.close()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def abort(self) -> None:
        """Delete the file (also after close)."""
        self._close_files()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "TorchWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self._fd is not None:
            self.close()


def save_torch(payload: object, path: Path) -> None:
    """torch.save of a small payload held in memory (a LoRA adapter, a state dict the caller built),
    with a file that cannot be written (a full disk, no permission) as a QkvconvError."""
    import torch

    try:
        torch.save(payload, path)
    except OSError as e:
        raise QkvconvError(f"cannot write {path}: {e.strerror or e}") from None
    except RuntimeError as e:  # torch wraps write failures (e.g. a full disk) in RuntimeError
        raise QkvconvError(f"cannot write {path}: {str(e).splitlines()[0]}") from None
