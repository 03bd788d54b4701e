"""The streaming conversion engine: execute a Plan from a reader into a writer.

Each source tensor is read once, in file order; every recipe that needs it is run while it is in
memory; it is dropped when its last consumer is done. Outputs go straight to the writer. So peak
memory is bounded by the largest output tensor plus the inputs it needs, whatever the checkpoint
size. Reading the next inputs overlaps with transforming and writing the current ones (a small
thread pool: pread, torch ops and pwrite all release the GIL). An output made only of source rows
as they are (a copy, q/k/v fused in sequential order, a grouped order re-ordered: steps that only
move rows), into a writer that takes raw bytes (both of writers.py's do), is copied from the source
files inside the kernel (copy_file_range), piece by piece, after the NaN/inf check of its inputs
with large sequential reads: those bytes are read once (the NaN/inf check, in numpy on integer views,
model/bits.py) and copied by the kernel. A plan whose every output is such a copy (a conversion that
only moves bytes: io/bytepath.py) runs without importing torch; the chunks the check reads then also
give each source tensor's checksums (`fingerprints`), so the default check never reads the source again.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError, nonfinite_error
from qkvconv.model.bits import Fingerprint, nonfinite_count, scannable
from qkvconv.progress import Progress
from qkvconv.plans.plan import Meta, Plan, Recipe, TensorMeta, output_metas
from qkvconv.io.safetensors_header import RawBytes, dtype_name

if TYPE_CHECKING:  # torch is imported where an output is computed in memory: a plan of copies needs none
    import torch

    from qkvconv.io.readers import TensorReader

Print = tuple[tuple[int, ...], str, Any, Any]  # shape, dtype name, row sums, column sums (numpy int64)


class Writer:
    """What the engine writes into (SafetensorsWriter, TorchWriter)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    # optional: `copy_raw(name, meta, raw)` writes a tensor by copying its stored bytes from a file


def output_layout(plan: Plan, reader: TensorReader) -> dict[str, TensorMeta]:
    """Shape and dtype of every output tensor, from the steps' shape rules (no data is read); a step
    without one runs on meta tensors instead (plans/plan.py output_metas)."""
    def meta(name: str) -> Meta:
        return reader.meta(name)

    return output_metas(plan, set(reader.names()), meta)


def schedule(plan: Plan, reader: TensorReader) -> list[Recipe]:
    """Recipes in the order their inputs appear in the source, consumers of one input together."""
    position = {name: i for i, name in enumerate(reader.names())}
    return sorted(plan.recipes, key=lambda r: (min(position[i] for i in r.inputs), r.output))


def _batches(recipes: list[Recipe]) -> Iterator[list[Recipe]]:
    """Consecutive recipes that share inputs run as one batch (e.g. q, k, v taken from one tensor)."""
    batch: list[Recipe] = []
    inputs: set[str] = set()
    for r in recipes:
        if batch and not inputs.intersection(r.inputs):
            yield batch
            batch, inputs = [], set()
        batch.append(r)
        inputs.update(r.inputs)
    if batch:
        yield batch


class _CopiesRaw:
    """Any writer of writers.py: it copies raw bytes."""

    def copy_raw(self, *args: Any, **kwargs: Any) -> None: ...


def only_copies(plan: Plan, reader: TensorReader) -> bool:
    """Whether every output of `plan` can be copied from the source files as it lies, into a writer that
    copies raw bytes (writers.py's), after a NaN/inf check numpy can make: no torch needed."""
    consumers = Counter(i for r in plan.recipes for i in r.inputs)
    try:
        raws = _raw_copies(plan, reader, _CopiesRaw(), consumers, min_piece_bytes=0)  # type: ignore[arg-type]
    except (ValueError, IndexError):  # shapes that do not fit the plan: output_layout says what is wrong
        return False
    return len(raws) == len(plan.recipes) and all(
        scannable(dtype_name(reader.meta(i).dtype), reader.meta(i).dtype.is_floating_point)
        for r in plan.recipes for i in r.inputs)


def execute(
    plan: Plan, reader: TensorReader, writer: Writer, progress: Progress | None = None, *, allow_nonfinite: bool = False,
    fingerprints: dict[str, Print] | None = None,
) -> Counter[str]:
    """Run every recipe, reading each source tensor once; returns how often each input was read.
    Refuses (QkvconvError) an input with NaN/inf values unless `allow_nonfinite`. `fingerprints`: filled
    with the checksums of each source tensor that is copied file to file (read in the same pass)."""
    progress = progress or Progress()
    reads: Counter[str] = Counter()
    remaining = Counter(i for r in plan.recipes for i in r.inputs)
    cache: dict[str, torch.Tensor] = {}
    batches = list(_batches(schedule(plan, reader)))
    raws = _raw_copies(plan, reader, writer, remaining, min_piece_bytes=0)
    if len(raws) < len(plan.recipes):  # some output is computed in memory: small pieces go that way too
        raws = _raw_copies(plan, reader, writer, remaining)
        from qkvconv.io.readers import map_large_buffers

        map_large_buffers()
    # without torch, many small pieces are gathered by the writer: read into one buffer, written once
    gather = {name for name, (_, pieces) in raws.items() if _small(pieces)}
    scan = _Scanner(allow_nonfinite, fingerprints)

    def load(batch: list[Recipe]) -> dict[str, torch.Tensor]:
        out = {}
        for r in batch:
            if r.output in raws:  # copied by the writer from the files; only checked here
                for name in r.inputs:
                    if reads[name] == 0:
                        reads[name] += 1
                        scan(name, reader)
                continue
            for name in r.inputs:
                if name not in cache and name not in out:
                    out[name] = reader.read(name)
                    reads[name] += 1
                    if not allow_nonfinite:
                        from qkvconv.model.nonfinite import check_finite

                        check_finite(name, out[name])
        return out

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkvconv-io") as pool:
        pending: Future | None = pool.submit(load, batches[0]) if batches else None
        writing: Future | None = None
        for index, batch in enumerate(batches):
            assert pending is not None
            cache.update(pending.result())
            pending = pool.submit(load, batches[index + 1]) if index + 1 < len(batches) else None
            outputs = [(r.output, (*raws[r.output], r.output in gather) if r.output in raws
                        else r.apply([cache[i] for i in r.inputs]).contiguous()) for r in batch]
            for r in batch:
                for name in r.inputs:
                    remaining[name] -= 1
                    if remaining[name] == 0:
                        cache.pop(name, None)
            if writing is not None:
                writing.result()  # at most one batch being written while the next is transformed
            writing = pool.submit(_write_all, writer, outputs, progress)
            reader.release()
        if writing is not None:
            writing.result()
    return reads


class _Scanner:
    """The NaN/inf check of a tensor that is copied file to file: its bytes read in large sequential
    reads into one reused buffer (a cold file reads faster so than through a mapping's page faults, and the
    copy that follows finds the pages cached), each chunk checked in numpy on an integer view (the
    exponent bits), and, where asked, checksummed (model/bits.py) from the same chunk."""

    CHUNK = 32 * 2**20

    def __init__(self, allow_nonfinite: bool, fingerprints: dict[str, Print] | None) -> None:
        self.allow_nonfinite, self.fingerprints = allow_nonfinite, fingerprints
        self._buffer: Any = None

    def __call__(self, name: str, reader: TensorReader) -> None:
        raw, meta = reader.raw(name), reader.meta(name)
        dtype = dtype_name(meta.dtype)
        if raw is None or not scannable(dtype, meta.dtype.is_floating_point):
            if not self.allow_nonfinite:
                from qkvconv.model.nonfinite import check_finite

                check_finite(name, reader.peek(name))
            return
        if self.allow_nonfinite and self.fingerprints is None:
            return
        import numpy as np

        if self._buffer is None:
            self._buffer = np.empty(self.CHUNK, dtype=np.uint8)
        prints = Fingerprint(meta.shape, meta.dtype.itemsize) if self.fingerprints is not None else None
        # chunks end on a row (or, for a tensor that is one row, on 8 bytes): the checksums need whole rows
        step = prints.row_bytes if prints is not None and len(meta.shape) > 1 else 8 * meta.dtype.itemsize
        chunk = max(self.CHUNK // step, 1) * step if step <= self.CHUNK else step
        if chunk > self._buffer.size:
            self._buffer = np.empty(chunk, dtype=np.uint8)
        bad = 0
        with open(raw.path, "rb", buffering=0) as f:
            done = 0
            while done < raw.nbytes:
                want = min(chunk, raw.nbytes - done)
                view = self._buffer[:want]
                got = 0
                while got < want:
                    n = os.preadv(f.fileno(), [memoryview(view[got:])], raw.offset + done + got)
                    if n <= 0:
                        raise QkvconvError(f"{raw.path}: short read at byte {raw.offset + done + got}")
                    got += n
                if not self.allow_nonfinite:
                    bad += nonfinite_count(view, dtype)
                if prints is not None:
                    prints.add(view)
                done += want
        if bad:
            raise nonfinite_error(name, bad)
        if prints is not None and self.fingerprints is not None:
            self.fingerprints[name] = (tuple(meta.shape), dtype, *prints.result())


# A raw copy of many small pieces is slower than one through memory (rotary pairs <-> half moves
# single rows): below this average piece size the output goes through memory.
MIN_PIECE_BYTES = 64 * 1024
_LABEL_BITS = 40  # a row label is (input index << 40) + row


def _row_pieces(recipe: Recipe, metas: list[TensorMeta], raws: list[RawBytes],
                min_piece_bytes: int | None = None) -> tuple[RawBytes, ...] | None:
    """The byte ranges of the source files that make the output, in order, or None when the recipe
    does more than move rows or the ranges would be too small.

    The recipe's own steps run on row labels (Step.labels: one int per input row, naming input and
    row), so where each output row comes from is what those steps' index functions say.
    """
    if recipe.dtype is not None or not all(step.moves_rows for step in recipe.steps):
        return None
    if not recipe.steps and len(raws) == 1:  # a plain copy: one piece
        return (raws[0],)
    if any(len(m.shape) not in (1, 2) or dtype_name(m.dtype) != dtype_name(metas[0].dtype)
           or m.shape[1:] != metas[0].shape[1:] for m in metas):
        return None
    codes = recipe.labels([[(i << _LABEL_BITS) + row for row in range(m.shape[0])] for i, m in enumerate(metas)])
    if not codes:
        return None
    pieces: list[list[int]] = []  # [input, first row, rows]: a piece goes on while rows follow in one input
    mask = (1 << _LABEL_BITS) - 1
    previous = None
    for code in codes:
        if previous is not None and code == previous + 1:
            pieces[-1][2] += 1
        else:
            pieces.append([code >> _LABEL_BITS, code & mask, 1])
        previous = code
    row_bytes = [m.nbytes // m.shape[0] if m.shape[0] else 0 for m in metas]
    out = tuple(RawBytes(raws[i].path, raws[i].offset + row * row_bytes[i], n * row_bytes[i]) for i, row, n in pieces)
    return None if _small(out, min_piece_bytes) else out


def _small(pieces: tuple[RawBytes, ...], min_piece_bytes: int | None = None) -> bool:
    """Pieces too small on average for a copy each (MIN_PIECE_BYTES unless given)."""
    floor = MIN_PIECE_BYTES if min_piece_bytes is None else min_piece_bytes
    return len(pieces) > 1 and sum(p.nbytes for p in pieces) < floor * len(pieces)


def _raw_copies(
    plan: Plan, reader: TensorReader, writer: Writer, consumers: Counter[str], min_piece_bytes: int | None = None
) -> dict[str, tuple[TensorMeta, tuple[RawBytes, ...]]]:
    """Outputs the writer can copy from the source files as they are: made only of source rows, from
    inputs whose bytes the reader can place in its files and that no recipe needs in memory."""
    if not hasattr(writer, "copy_raw"):
        return {}
    candidates: dict[str, tuple[Recipe, tuple[RawBytes, ...]]] = {}
    for r in plan.recipes:
        raws = [reader.raw(i) for i in r.inputs]
        if any(raw is None for raw in raws):
            continue
        metas = [reader.meta(i) for i in r.inputs]
        pieces = _row_pieces(r, metas, raws, min_piece_bytes)  # type: ignore[arg-type]
        if pieces is not None:
            candidates[r.output] = (r, pieces)
    # an input that some recipe needs in memory is read anyway: its other consumers use that copy
    raw_uses = Counter(i for r, _ in candidates.values() for i in r.inputs)
    out = {}
    for output, (r, pieces) in candidates.items():
        if all(raw_uses[i] == consumers[i] for i in r.inputs):
            shape, dtype = r.meta([(reader.meta(i).shape, reader.meta(i).dtype) for i in r.inputs])  # type: ignore[misc]
            out[output] = (TensorMeta(tuple(shape), dtype), pieces)
    return out


def _write_all(
    writer: Writer, outputs: list[tuple[str, torch.Tensor | tuple[TensorMeta, tuple[RawBytes, ...], bool]]],
    progress: Progress,
) -> None:
    for name, item in outputs:
        if isinstance(item, tuple):
            meta, pieces, gather = item
            writer.copy_raw(name, meta, pieces, gather=gather)  # type: ignore[attr-defined]
            progress.advance(meta.nbytes)
        else:
            writer.write(name, item)
            progress.advance(item.numel() * item.element_size())
