"""The streaming conversion engine: execute a Plan from a reader into a writer.

Each source tensor is read once, in file order; every recipe that needs it is run while it is in
memory; it is dropped when its last consumer is done. Outputs go straight to the writer. So peak
memory is bounded by the largest output tensor plus the inputs it needs, whatever the checkpoint
size. Reading the next inputs overlaps with transforming and writing the current ones (a small
thread pool: pread, torch ops and pwrite all release the GIL). An output made only of source rows
as they are (a copy, q/k/v fused in sequential order, a grouped order re-ordered: steps that only
move rows), into a writer that takes raw bytes (both of writers.py's do), is copied from the source
files inside the kernel (copy_file_range), piece by piece, after the NaN/inf check of its inputs
through a read-only mapping: those bytes never enter this process's memory.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from qkvconv.errors import QkvconvError
from qkvconv.model.nonfinite import check_finite, is_finite
from qkvconv.progress import Progress
from qkvconv.plans.plan import Meta, Plan, Recipe, output_metas
from qkvconv.io.readers import RawBytes, TensorMeta, TensorReader, byte_view, map_large_buffers


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


def execute(
    plan: Plan, reader: TensorReader, writer: Writer, progress: Progress | None = None, *, allow_nonfinite: bool = False
) -> Counter[str]:
    """Run every recipe, reading each source tensor once; returns how often each input was read.
    Refuses (QkvconvError) an input with NaN/inf values unless `allow_nonfinite`."""
    map_large_buffers()
    progress = progress or Progress()
    reads: Counter[str] = Counter()
    remaining = Counter(i for r in plan.recipes for i in r.inputs)
    cache: dict[str, torch.Tensor] = {}
    batches = list(_batches(schedule(plan, reader)))
    raws = _raw_copies(plan, reader, writer, remaining)

    scan = _Scanner()

    def load(batch: list[Recipe]) -> dict[str, torch.Tensor]:
        out = {}
        for r in batch:
            if r.output in raws:  # copied by the writer from the files; only checked here
                for name in r.inputs:
                    if reads[name] == 0:
                        reads[name] += 1
                        if not allow_nonfinite:
                            scan(name, reader, raws[r.output])
                continue
            for name in r.inputs:
                if name not in cache and name not in out:
                    out[name] = reader.read(name)
                    reads[name] += 1
                    if not allow_nonfinite:
                        check_finite(name, out[name])
        return out

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkvconv-io") as pool:
        pending: Future | None = pool.submit(load, batches[0]) if batches else None
        writing: Future | None = None
        for index, batch in enumerate(batches):
            assert pending is not None
            cache.update(pending.result())
            pending = pool.submit(load, batches[index + 1]) if index + 1 < len(batches) else None
            outputs = [(r.output, raws.get(r.output) or r.apply([cache[i] for i in r.inputs]).contiguous())
                       for r in batch]
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
    copy that follows finds the pages cached), each chunk checked with aminmax."""

    CHUNK = 32 * 2**20

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def __call__(self, name: str, reader: TensorReader, raw_output: tuple[TensorMeta, tuple[RawBytes, ...]]) -> None:
        raw, meta = reader.raw(name), reader.meta(name)
        size = torch.empty((), dtype=meta.dtype).element_size()
        if raw is None or not meta.dtype.is_floating_point or raw.nbytes % size:
            check_finite(name, reader.peek(name))
            return
        if self._buffer is None:
            self._buffer = torch.empty(self.CHUNK, dtype=torch.uint8)
        view = byte_view(self._buffer)
        with open(raw.path, "rb", buffering=0) as f:
            done = 0
            while done < raw.nbytes:
                n = os.preadv(f.fileno(), [view[:min(self.CHUNK, raw.nbytes - done)]], raw.offset + done)
                n -= n % size
                if n <= 0:
                    raise QkvconvError(f"{raw.path}: short read at byte {raw.offset + done}")
                if not is_finite(self._buffer[:n].view(meta.dtype)):
                    check_finite(name, reader.peek(name))  # the count and the message
                done += n


# A raw copy of many small pieces is slower than one through memory (rotary pairs <-> half moves
# single rows): below this average piece size the output goes through memory.
MIN_PIECE_BYTES = 64 * 1024
_LABEL_BITS = 40  # a row label is (input index << 40) + row


def _row_pieces(recipe: Recipe, metas: list[TensorMeta], raws: list[RawBytes]) -> tuple[RawBytes, ...] | None:
    """The byte ranges of the source files that make the output, in order, or None when the recipe
    does more than move rows or the ranges would be too small.

    The recipe's own steps run on row labels (one int64 per input row, naming input and row), so
    where each output row comes from is whatever those steps do, not a second description of them.
    """
    if recipe.dtype is not None or not all(step.moves_rows for step in recipe.steps):
        return None
    if not recipe.steps and len(raws) == 1:  # a plain copy: one piece
        return (raws[0],)
    if any(len(m.shape) not in (1, 2) or m.dtype != metas[0].dtype or m.shape[1:] != metas[0].shape[1:]
           for m in metas):
        return None
    labels = [(torch.arange(m.shape[0]) + (i << _LABEL_BITS)).reshape(m.shape[0], *([1] * (len(m.shape) - 1)))
              for i, m in enumerate(metas)]
    codes = recipe.apply(labels).reshape(-1)
    if codes.numel() == 0:
        return None
    # a piece starts wherever a row does not follow the previous one in the same input
    starts = torch.ones(codes.numel(), dtype=torch.bool)
    starts[1:] = codes[1:] - codes[:-1] != 1
    first = codes[starts].tolist()
    bounds = starts.nonzero().flatten().tolist() + [codes.numel()]
    row_bytes = [m.nbytes // m.shape[0] if m.shape[0] else 0 for m in metas]
    mask = (1 << _LABEL_BITS) - 1
    pieces = [(code >> _LABEL_BITS, code & mask, bounds[k + 1] - bounds[k]) for k, code in enumerate(first)]
    if len(pieces) > 1 and sum(n * row_bytes[i] for i, _, n in pieces) < MIN_PIECE_BYTES * len(pieces):
        return None
    return tuple(RawBytes(raws[i].path, raws[i].offset + row * row_bytes[i], n * row_bytes[i]) for i, row, n in pieces)


def _raw_copies(
    plan: Plan, reader: TensorReader, writer: Writer, consumers: Counter[str]
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
        pieces = _row_pieces(r, metas, raws)  # type: ignore[arg-type]
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
    writer: Writer, outputs: list[tuple[str, torch.Tensor | tuple[TensorMeta, tuple[RawBytes, ...]]]],
    progress: Progress,
) -> None:
    for name, item in outputs:
        if isinstance(item, tuple):
            meta, pieces = item
            writer.copy_raw(name, meta, pieces)  # type: ignore[attr-defined]
            progress.advance(meta.nbytes)
        else:
            writer.write(name, item)
            progress.advance(item.numel() * item.element_size())
