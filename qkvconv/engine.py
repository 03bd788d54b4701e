"""The streaming conversion engine: execute a Plan from a reader into a writer.

Each source tensor is read once, in file order; every recipe that needs it is run while it is in
memory; it is dropped when its last consumer is done. Outputs go straight to the writer. So peak
memory is bounded by the largest output tensor plus the inputs it needs, whatever the checkpoint
size. Reading the next inputs overlaps with transforming and writing the current ones (a small
thread pool: pread, torch ops and pwrite all release the GIL). A tensor copied unchanged, into a
writer that takes raw bytes (both of writers.py's do), goes from the source file inside the kernel
(copy_file_range), after its NaN/inf check through a read-only mapping: it never enters this
process's memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qkvconv.errors import QkvconvError
from qkvconv.plan import Plan, Recipe
from qkvconv.readers import RawBytes, TensorMeta, TensorReader, map_large_buffers


class Writer:
    """What the engine writes into (SafetensorsWriter, TorchWriter)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    # optional: `copy_raw(name, meta, raw)` writes a tensor by copying its stored bytes from a file


def output_layout(plan: Plan, reader: TensorReader) -> dict[str, TensorMeta]:
    """Shape and dtype of every output tensor, from the steps' shape rules (no data is read); a step
    without one runs on meta tensors instead."""
    layout: dict[str, TensorMeta] = {}
    names = set(reader.names())
    for recipe in plan.recipes:
        missing = [i for i in recipe.inputs if i not in names]
        if missing:
            raise QkvconvError(f"the source has no tensor {missing[0]!r} (needed for {recipe.output})")
        metas = [reader.meta(i) for i in recipe.inputs]
        try:
            known = recipe.meta([(m.shape, m.dtype) for m in metas])
            if known is None:
                out = recipe.apply([torch.empty(m.shape, dtype=m.dtype, device="meta") for m in metas])
                known = (tuple(out.shape), out.dtype)
        except (ValueError, RuntimeError) as e:
            raise QkvconvError(f"cannot build {recipe.output}: {e}") from None
        if recipe.output in layout:
            raise QkvconvError(f"two recipes write {recipe.output}")
        layout[recipe.output] = TensorMeta(tuple(known[0]), known[1])
    return layout


def schedule(plan: Plan, reader: TensorReader) -> list[Recipe]:
    """Recipes in the order their inputs appear in the source, consumers of one input together."""
    position = {name: i for i, name in enumerate(reader.names())}
    return sorted(plan.recipes, key=lambda r: (min(position[i] for i in r.inputs), r.output))


@dataclass
class Progress:
    """Callback for bytes written, so the CLI can show a bar; the engine itself prints nothing."""

    advance: Callable[[int], None] = lambda n: None


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


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """NaN or inf in a checkpoint is reported, never silently carried into a converted one."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # aminmax propagates NaN and shows inf in one pass without a temporary (about 12x faster than
    # isfinite().all(), which also upcasts bf16); the count below only runs when something is wrong
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # dtypes without the kernel (float8): widen first
        low, high = torch.aminmax(tensor.float())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = int((~torch.isfinite(tensor.float())).sum())
        raise QkvconvError(
            f"{name} holds {bad:,} NaN/inf values; the checkpoint is damaged or was saved mid-divergence "
            "(pass --allow-nonfinite to convert it anyway)"
        )


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

    def load(batch: list[Recipe]) -> dict[str, torch.Tensor]:
        out = {}
        for r in batch:
            if r.output in raws:  # copied by the writer from the file; only checked here
                (name,) = r.inputs
                reads[name] += 1
                if not allow_nonfinite:
                    check_finite(name, reader.peek(name))
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


def _raw_copies(
    plan: Plan, reader: TensorReader, writer: Writer, consumers: Counter[str]
) -> dict[str, tuple[TensorMeta, RawBytes]]:
    """Outputs the writer can copy from the source file as they are: plain copies of an input that no
    other recipe needs, whose bytes the reader can place in its file."""
    if not hasattr(writer, "copy_raw"):
        return {}
    out = {}
    for r in plan.recipes:
        if r.steps or r.dtype is not None or len(r.inputs) != 1 or consumers[r.inputs[0]] != 1:
            continue
        raw = reader.raw(r.inputs[0])
        if raw is not None:
            out[r.output] = (reader.meta(r.inputs[0]), raw)
    return out


def _write_all(
    writer: Writer, outputs: list[tuple[str, torch.Tensor | tuple[TensorMeta, RawBytes]]], progress: Progress
) -> None:
    for name, item in outputs:
        if isinstance(item, tuple):
            meta, raw = item
            writer.copy_raw(name, meta, raw)  # type: ignore[attr-defined]
            progress.advance(raw.nbytes)
        else:
            writer.write(name, item)
            progress.advance(item.numel() * item.element_size())
