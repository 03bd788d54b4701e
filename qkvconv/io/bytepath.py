"""Conversions that only move bytes, without torch: readers of where tensors lie, and the checksums of a
checkpoint seen under litgpt's names.

Most conversions between Hugging Face safetensors and litgpt (q/k/v stacked into one `attn.qkv` and split
again, plain re-sharding) compute nothing: every output tensor is rows of source tensors. The engine copies
those inside the kernel (engine.py) and needs of the source only its tensors' byte ranges, which the
safetensors header and torch.save's pickle give without torch (safetensors_header.py, torch_pickle.py).
Importing torch alone costs more than half of copying a 1B-parameter checkpoint, so such a conversion and
its default check (ops/bitcheck.py) never import it:

    reader = open_bytes(path)               # names, meta (shape, DType), raw byte ranges; None: not here
    prints = litgpt_prints(reader, recipes, known)  # check.fingerprint of each tensor under litgpt's names
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.io.safetensors_header import SafetensorsHeaders, dtype_name
from qkvconv.io.sharded import open_headers
from qkvconv.io.torch_pickle import TorchZipHeaders
from qkvconv.plans.plan import Recipe

Print = tuple[tuple[int, ...], str, Any, Any]  # engine.Print: shape, dtype name, row sums, column sums


def open_bytes(path: Path) -> Any:
    """A torch-free reader (names, meta, raw, release, files) of a safetensors file or HF directory, or of
    a torch.save zip; None for anything else (a legacy pickle, .bin shards), or a file these cannot read
    (the torch readers then say what is wrong with it)."""
    try:
        if path.is_dir():
            return open_headers(path)
        if path.suffix == ".safetensors":
            return SafetensorsHeaders(path)
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        return TorchZipHeaders(path) if zipped else None
    except (QkvconvError, OSError):
        return None


def _vector(reader: Any, recipe: Recipe, metas: list[Any], codes: list[int], bits: int) -> Print:
    """The checksums of a 1-D output (a fused bias): one row, so its elements are gathered (they are few)."""
    import numpy as np

    from qkvconv.model.bits import Fingerprint

    size = metas[0].dtype.itemsize
    parts = []
    for name in recipe.inputs:
        raw = reader.raw(name)
        with open(raw.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), raw.nbytes, raw.offset)
        if len(data) != raw.nbytes:
            raise QkvconvError(f"{raw.path} ends in the middle of {name}; it is truncated")
        parts.append(np.frombuffer(data, dtype=np.uint8).reshape(-1, size))
    mask = (1 << bits) - 1
    gathered = np.concatenate([parts[c >> bits][c & mask] for c in codes]) if codes else np.zeros(0, np.uint8)
    prints = Fingerprint((len(codes),), size)
    prints.add(gathered.reshape(-1))
    return ((len(codes),), dtype_name(metas[0].dtype), *prints.result())


def _compose(recipe: Recipe, metas: list[Any], prints: list[Print], reader: Any) -> Print | None:
    """The checksums of a recipe's output from its inputs': where the output is every row of its inputs
    once (a copy, q/k/v stacked, a re-order), its row sums are theirs in the output's order and its column
    sums theirs added; a 1-D output is gathered from the files. None where it is neither (a part taken
    out of a fused tensor)."""
    import numpy as np

    if len(recipe.inputs) == 1 and not recipe.steps and recipe.dtype is None:
        return prints[0]
    if recipe.dtype is not None or not all(s.moves_rows for s in recipe.steps):
        return None
    if any(len(m.shape) != len(metas[0].shape) or m.shape[1:] != metas[0].shape[1:] or
           dtype_name(m.dtype) != dtype_name(metas[0].dtype) for m in metas) or len(metas[0].shape) not in (1, 2):
        return None
    bits = 40
    labels = [[(i << bits) + row for row in range(m.shape[0])] for i, m in enumerate(metas)]
    codes = recipe.labels(labels)
    if len(metas[0].shape) == 1:
        return _vector(reader, recipe, metas, codes, bits)
    if sorted(codes) != [c for rows in labels for c in rows]:
        return None
    rows = np.concatenate([p[2] for p in prints])
    starts = np.cumsum([0] + [m.shape[0] for m in metas])
    index = np.array([starts[c >> bits] + (c & ((1 << bits) - 1)) for c in codes], dtype=np.int64)
    columns = prints[0][3].copy()
    for p in prints[1:]:
        columns += p[3]
    return (len(codes), *metas[0].shape[1:]), prints[0][1], rows[index], columns


def litgpt_prints(reader: Any, recipes: dict[str, Recipe], names: list[str],
                  known: dict[str, Print]) -> dict[str, Print] | None:
    """check.fingerprint of each of `names` (litgpt's), each made by its recipe from the reader's tensors;
    `known`: checksums already taken (the engine's, while it copied), the others read here, two tensors at
    a time (numpy and preadv release the GIL: both cores sum). None where a tensor cannot be composed so
    (the check then runs with torch)."""
    from concurrent.futures import ThreadPoolExecutor

    from qkvconv.io.engine import _Scanner

    if any(name not in recipes for name in names):
        return None
    missing = list(dict.fromkeys(i for n in names for i in recipes[n].inputs if i not in known))
    if any(reader.raw(i) is None for i in missing):
        return None
    local = threading.local()  # a scanner (and its buffer) per thread

    def read(name: str) -> None:
        if not hasattr(local, "scan"):
            local.scan = _Scanner(True, known)
        local.scan(name, reader)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkvconv-check") as pool:
        list(pool.map(read, missing))
    reader.release()
    if any(i not in known for i in missing):  # a dtype the scan cannot read (float8)
        return None
    out = {}
    for name in names:
        recipe = recipes[name]
        composed = _compose(recipe, [reader.meta(i) for i in recipe.inputs], [known[i] for i in recipe.inputs], reader)
        if composed is None:
            return None
        out[name] = composed
    return out


_buffers = threading.local()  # same_bytes's two read buffers, per thread


def _read(raw: Any, offset: int, nbytes: int, which: int) -> bytearray:
    """`nbytes` of a tensor's bytes from `offset` into one of this thread's two reused buffers (bytearrays:
    two of them compare with memcmp, several times faster than numpy's array_equal)."""
    from qkvconv.io.safetensors_header import pread_exact

    key = f"b{which}_{nbytes}"
    buffer = getattr(_buffers, key, None)
    if buffer is None:
        for old in [k for k in vars(_buffers) if k.startswith(f"b{which}_")]:
            delattr(_buffers, old)
        buffer = bytearray(nbytes)
        setattr(_buffers, key, buffer)
    with open(raw.path, "rb", buffering=0) as f:
        pread_exact(f.fileno(), memoryview(buffer), raw.offset + offset, raw.path)
    return buffer


def same_bytes(old: Any, old_name: str, new: Any, new_name: str, rows: list[int] | None = None,
               chunk: int = 32 * 2**20) -> bool | None:
    """Whether tensor `new_name` of `new` holds exactly the bytes of `old_name` of `old` (with `rows`: its
    rows, taken in that order), read from both files in chunks, without torch; None where a reader cannot
    place the bytes (the caller compares with torch)."""
    a, b = old.raw(old_name), new.raw(new_name)
    if a is None or b is None:
        return None
    ma, mb = old.meta(old_name), new.meta(new_name)
    if tuple(ma.shape) != tuple(mb.shape) or dtype_name(ma.dtype) != dtype_name(mb.dtype) or a.nbytes != b.nbytes:
        return False
    if rows is None or not ma.shape or ma.shape[0] == 0:
        return all(_read(a, at, min(chunk, a.nbytes - at), 0) == _read(b, at, min(chunk, b.nbytes - at), 1)
                   for at in range(0, a.nbytes, chunk))
    if sorted(rows) != list(range(ma.shape[0])):
        return False
    import numpy as np

    row_bytes = a.nbytes // ma.shape[0]
    source = np.frombuffer(bytes(_read(a, 0, a.nbytes, 0)), dtype=np.uint8).reshape(ma.shape[0], row_bytes)
    step = max(chunk // max(row_bytes, 1), 1)  # a fused QKV tensor is taken whole, its re-ordered rows in chunks
    for start in range(0, len(rows), step):
        count = min(step, len(rows) - start)
        if source[rows[start:start + count]].tobytes() != bytes(_read(b, start * row_bytes, count * row_bytes, 1)):
            return False
    return True
