"""The check `convert`, `upgrade` and LoRA merges run before they publish: the result, read back through
its own format's reader, must compute what the source computes. It proves, layer by layer:

- where a tensor is meant to come out unchanged in litgpt's names (every tensor of a conversion that
  only renames, fuses, splits or re-orders rows: the common case), that it holds the same bits as the
  source's: per tensor, the sums of every row and every column of its bits (viewed as integers)
  must agree. A single changed, moved or swapped row, or swapped column, changes them.
- where a transformation changes the numbers (`--rope`, `--kv-heads`, `--fold-norms`, a LoRA merge, a
  dtype change), or the two configs spell the model differently, that the layer computes the same
  function: both sides' block runs on the same random inputs (8 tokens, causal, so every query, key
  and value row and every norm gain takes part), compared to the dtype's tolerance; a mixture of
  experts also compares its router and every expert (verify's probes). The head runs on random inputs
  too (every output row), the embedding compares table to table.

Cheaper than verify's two full forward passes (no full-depth pass, no logits over real tokens), it
holds each layer to a tighter test: inputs do not depend on earlier layers being right. The source's
checksums can be taken while the engine writes (`SourcePrints`, a thread): the source is read from
the page cache the engine has just filled, and what is left after the write is reading the result back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
import atexit
import threading
from dataclasses import asdict
from typing import Any

import torch

from qkvconv.errors import CheckFailed, QkvconvError, UnsupportedFamily
from qkvconv.model import names as L
from qkvconv.model.nonfinite import is_finite
from qkvconv.ops.verify import (DEFAULT_TOLERANCE, Stage, _assumed, _baked, _comparable, _stage, _Zeroed, architecture,
                                resolve_device)
from qkvconv.progress import layers, status
from qkvconv.reference import forward

EMBED_ROWS = 4096
CHECK_TOKENS = 8  # per layer: enough for causal attention to weigh every key row; few enough to be cheap
Print = tuple[tuple[int, ...], torch.dtype, torch.Tensor, torch.Tensor]
_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(t: torch.Tensor) -> Print:
    """Shape, dtype, and the sums of each row and each column of the tensor's bits read as integers
    (8-byte words where a row holds a whole number of them): equal for equal bits, different after any
    change, move or swap of a row or column short of a crafted one. Memory-bound, no float conversion:
    it runs where the tensor is read (the CPU), so a check that finds every tensor unchanged never starts
    a GPU (whose context alone costs a few hundred MB of host memory)."""
    m = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    if m.numel() and (m.shape[1] * m.element_size()) % 8 == 0 and m.is_contiguous():
        bits = m.view(torch.int64)
    else:
        bits = m.contiguous().view(_INTEGER[m.element_size()]).to(torch.int64)
    return tuple(t.shape), t.dtype, bits.sum(dim=1), bits.sum(dim=0)


def print_of(weights: Any, name: str) -> Print:
    """The checksums of a tensor of `weights`; from its parts where the reader hands them over (a tensor
    made by stacking source tensors' rows): the row sums of the stack are the parts' in order, its column
    sums the parts' added, so the whole is never built."""
    parts = weights.parts(name) if hasattr(weights, "parts") else None
    if not parts or len(parts) == 1 or any(p.dim() < 2 for p in parts):
        return fingerprint(parts[0] if parts and len(parts) == 1 else weights(name))
    each = [fingerprint(p) for p in parts]
    shape = (sum(p[0][0] for p in each), *each[0][0][1:])
    columns = each[0][3].clone()
    for p in each[1:]:
        columns += p[3]
    return shape, each[0][1], torch.cat([p[2] for p in each]), columns


def _same(a: Print, b: Print) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def tensor_names(config: dict[str, Any]) -> list[str]:
    """Every tensor of the model in litgpt's names (the pivot both sides are read in)."""
    from qkvconv.formats.hf.plans import litgpt_state_names

    return litgpt_state_names(config)


def groups(names: list[str], n_layer: int) -> dict[str, list[str]]:
    """The tensors by stage: "embed", "layer 0" ... "layer {n-1}", "head"."""
    out: dict[str, list[str]] = {"embed": [], **{f"layer {i}": [] for i in range(n_layer)}, "head": []}
    for n in names:
        if n.startswith("transformer.h."):
            out[f"layer {n.split('.')[2]}"].append(n)
        else:
            out["embed" if n.startswith(L.EMBEDDING) else "head"].append(n)
    return out


def prints(weights: Any, names: dict[str, list[str]], stop: threading.Event | None = None) -> dict[str, Print]:
    """The checksums of every tensor, the pages read given back after each (a 7B layer's pages held at
    once would be most of a GiB); given up (partial) once `stop` is set."""
    out = {}
    for stage in names.values():
        for n in stage:
            if stop is not None and stop.is_set():
                return out
            out[n] = print_of(weights, n)
            weights.release()
    return out


def _unchanged(names: list[str], before: Any, after: Any, before_prints: dict[str, Print] | None) -> bool:
    """Every tensor holds the source's bits (checksums), pages given back tensor by tensor."""
    for n in names:
        same = _same(before_prints[n] if before_prints is not None else print_of(before, n), print_of(after, n))
        before.release()
        after.release()
        if not same:
            return False
    return True


class SourcePrints:
    """The source's checksums, taken in a thread while the engine writes (the pages it reads are the ones
    the engine has just read); the check takes `result()` after the write. A conversion that fails exits
    without waiting for it: at exit it stops after the tensor in hand (a thread still inside torch when the
    interpreter ends aborts the process)."""

    def __init__(self, open_source: Callable[[], Any]) -> None:
        self._outcome: tuple[Any, dict[str, Print]] | BaseException | None = None
        self._stop = threading.Event()
        from qkvconv.formats.hf.variants import thread

        self._thread = thread(self._run, open_source)
        atexit.register(self._give_up)

    def _give_up(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, open_source: Callable[[], Any]) -> None:
        try:
            source = open_source()
            arch = architecture(source)
            self._outcome = source, prints(source, groups(tensor_names(source.config), arch.n_layer), self._stop)
        except BaseException as e:  # handed to the caller of result()
            self._outcome = e

    def result(self) -> tuple[Any, dict[str, Print]]:
        self._thread.join()
        atexit.unregister(self._give_up)
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


def _random_hidden(arch: forward.Architecture, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, CHECK_TOKENS, arch.n_embd, generator=generator).to(device=device, dtype=dtype)


def _run_stage(stage: str, archs: tuple, sides: tuple, x: torch.Tensor) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """Both sides' outputs of one stage on the same input: (name, a, b) for each comparison."""
    (arch_a, arch_b), (a, b) = archs, sides
    if stage == "embed":  # table against table, a block of rows at a time (a 150k vocabulary in float32 is GBs),
        # each times its side's embedding scale as forward.embed applies it (a JAIS GGUF holds the scale in its table)
        ta, tb = a(f"{L.EMBEDDING}.weight"), b(f"{L.EMBEDDING}.weight")
        return ((f"{stage} rows {r}..", forward.scaled_embeddings(arch_a, ta[r:r + EMBED_ROWS].to(x)),
                 forward.scaled_embeddings(arch_b, tb[r:r + EMBED_ROWS].to(x))) for r in range(0, ta.shape[0], EMBED_ROWS))
    if stage == "head":
        return [("logits", forward.head(arch_a, a, x), forward.head(arch_b, b, x))]
    i = int(stage.split()[1])
    probes: tuple[list, list] = ([], [])
    ya = forward.block(arch_a, i, a, x, probe=lambda *t: probes[0].append(t))
    yb = forward.block(arch_b, i, b, x, probe=lambda *t: probes[1].append(t))
    out = [(f"{stage} {what}", pa, pb) for p, q in zip(*probes) for what, pa, pb in zip(("router", "experts"), p, q)]
    return out + [(stage, ya, yb)]


def conversion_check(open_sides: Callable[[], tuple[Any, Any]], device: str, subject: str, undone: str, *,
                     rounds: bool = False, optional: bool = False, source_prints: SourcePrints | None = None) -> str:
    """Raise CheckFailed (`subject` computes something else; `undone`) unless the result matches the source
    as the module docstring says; return what was proved. `open_sides()` gives (source, result) weights; a
    model the reference pass does not implement is reported as skipped, never passed. `rounds`: the
    conversion rounds products to the stored dtype (norm folding): a half-precision result is held to that
    dtype's tolerance. `optional`: a source that cannot be opened (a LoRA run whose base is not found)
    skips the check, said in its line. `source_prints`: the source's checksums, taken during the write."""
    start = time.perf_counter()
    with status("checking: opening both sides"):
        try:
            if source_prints is not None:
                before, before_prints = source_prints.result()
                _, after = open_sides()
            else:
                (before, after), before_prints = open_sides(), None
            arch_a, arch_b = architecture(before), architecture(after)
        except UnsupportedFamily as e:
            return f"check skipped: {e}"
        except QkvconvError as e:
            if not optional:
                raise
            return f"check skipped: {e}"
    arch_a, arch_b, _ = _assumed(before, after, arch_a, arch_b)  # a GGUF's GELU, which the file cannot record
    _comparable(arch_a, arch_b, _baked(before, after))  # a JAIS GGUF's scales, in its weights
    dev = resolve_device(device)
    stored = after.dtype()
    cdtype = torch.float32 if dev.type == "cpu" or stored not in (torch.bfloat16, torch.float16) else stored
    atol, rtol = DEFAULT_TOLERANCE[stored if rounds and stored in (torch.bfloat16, torch.float16) else cdtype]
    # Where the configs differ (rotary order, K/V heads, biases), equal bits in a layer need not compute the
    # same: every layer is computed then. The embedding and head compute alike from equal bits under equal
    # function fields (a head bias shows in the names).
    same_form = _fields(arch_a) == _fields(arch_b)
    names_a, names_b = tensor_names(before.config), tensor_names(after.config)
    stages_a, stages_b = groups(names_a, arch_a.n_layer), groups(names_b, arch_b.n_layer)
    x: torch.Tensor | None = None  # made at the first computed stage: a GPU starts only when one is needed
    identical, computed, worst, nonfinite = 0, [], 0.0, set()
    tick = layers("checking") or (lambda done, total: None)
    tick(0, len(stages_a))
    with torch.inference_mode():
        for done, stage in enumerate(stages_a, 1):
            exact = ((same_form or not stage.startswith("layer ")) and stages_a[stage] == stages_b[stage]
                     and _unchanged(stages_a[stage], before, after, before_prints))
            if exact:
                identical += len(stages_a[stage])
            else:
                computed.append(stage)
                x = _random_hidden(arch_a, cdtype, dev) if x is None else x
                worst = max(worst, _compare(stage, (arch_a, arch_b), (before, after), x, atol, rtol, subject, undone,
                                            nonfinite))
            before.release()
            after.release()
            tick(done, len(stages_a))
    total = len(names_a)
    line = f"checked in {time.perf_counter() - start:.1f} s: "
    if not computed:
        return line + f"all {total} tensors hold the source's bits in litgpt's names (row and column checksums)"
    line += f"{identical} of {total} tensors hold the source's bits; " if identical else ""
    nan = (f"; weights with NaN/inf ({', '.join(sorted(nonfinite)[:3])}) compared NaN for NaN in the same places, "
           "and again read as 0") if nonfinite else ""
    return line + (f"{_span(computed)} computed on random inputs ({CHECK_TOKENS} tokens, on {dev}) against the source's, largest "
                   f"difference {worst:.2g} of its scale (tolerance atol {atol:g} + rtol {rtol:g} x scale){nan}")


def _fields(arch: forward.Architecture) -> dict[str, Any]:
    out = asdict(arch)
    out.pop("name")
    return out


def _compare(stage: str, archs: tuple, sides: tuple, x: torch.Tensor, atol: float, rtol: float,
             subject: str, undone: str, nonfinite: set[str]) -> float:
    """One stage computed on both sides; raises CheckFailed where they differ. Where NaN/inf shows, the
    stage runs again with each side's NaN/inf weights read as 0, as verify does (a NaN spreads over the
    whole output and would leave nothing to compare)."""
    worst = 0.0
    zeroed = (_Zeroed(sides[0]), _Zeroed(sides[1]))
    for attempt in (sides, zeroed):
        finite = True
        for name, a, b in _run_stage(stage, archs, attempt, x):
            s: Stage = _stage(name, a, b, atol, rtol)
            if not s.within:
                where = f"first difference at {name}: max {s.max_abs_diff:.3g} where the source's values reach {s.scale:.3g}"
                if attempt is zeroed:
                    raise CheckFailed(
                        f"{subject} holds NaN/inf in the same places as the source but computes something else with "
                        f"them read as 0 ({where}): either it is wrong past the first NaN, or the conversion summed a "
                        f"NaN into other values (a LayerNorm bias folded through a linear that holds one), which this "
                        f"check cannot tell apart; {undone}")
                raise CheckFailed(f"{subject} computes something else ({where}); {undone}")
            worst = max(worst, s.max_abs_diff / s.scale if s.scale else s.max_abs_diff)
            finite = finite and is_finite(a) and is_finite(b)
        if finite:
            break
    nonfinite.update(zeroed[0].nonfinite + zeroed[1].nonfinite)  # what the second pass read as 0, if it ran
    return worst


def _span(stages: list[str]) -> str:
    """"layer 0 to layer 21 and the head" for people; the list where it is short."""
    named = {"embed": "the embedding", "head": "the head"}
    layer_ids = [int(s.split()[1]) for s in stages if s.startswith("layer ")]
    parts = []
    if layer_ids:
        contiguous = layer_ids == list(range(layer_ids[0], layer_ids[-1] + 1))
        parts.append(f"layers {layer_ids[0]} to {layer_ids[-1]}" if contiguous and len(layer_ids) > 2
                     else ", ".join(f"layer {i}" for i in layer_ids))
    parts += [named[s] for s in stages if s in named]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"




class UpgradeCheck:
    """The check of `upgrade` and of a LoRA merge: the staged files, read as the checkpoint they will
    replace, against the original. `start(original)` before writing takes the original's checksums in a
    thread meanwhile (an upgrade only re-orders rows, so they serve; a merge changes every adapted weight)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.prints: SourcePrints | None = None

    def start(self, original: Any) -> None:
        from qkvconv.formats.weights import litgpt_weights

        self.prints = SourcePrints(lambda: litgpt_weights(original))

    def __call__(self, original: Any, staged: dict) -> str:
        from qkvconv.formats.weights import litgpt_weights

        prints, self.prints = self.prints, None
        return conversion_check(lambda: (litgpt_weights(original), litgpt_weights(original, overrides=staged)),
                                self.device, "the upgraded checkpoint", "nothing was replaced", optional=True,
                                source_prints=prints)


def upgrade_check(device: str = "cpu") -> UpgradeCheck:
    return UpgradeCheck(device)


__all__ = ["SourcePrints", "UpgradeCheck", "conversion_check", "fingerprint", "upgrade_check"]
