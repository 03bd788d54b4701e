"""Prove two checkpoints compute the same function: one forward pass of each, compared stage by stage.

Both sides run the same random tokens through the reference forward pass (reference/forward.py), one layer at
a time: embed both, compare; run block i of both, compare; and so on. So checking two models needs
about two layers of weights in memory (plus embeddings), not two models. Each stage reports the max
absolute difference of the hidden states; the logits also report top-1 agreement.

NaN/inf weights (verify compares and reports them; convert and upgrade refuse them unless allowed):
stages are compared NaN for NaN (the same non-finite values in the same places, the finite rest to
the tolerance), so a NaN on one side only is a difference. A NaN spreads: past the first layer that
holds one every stage is NaN on both sides and compares nothing. So when a stage holds NaN/inf, a
second pass runs with each side's NaN/inf weights read as 0 (and named in the report), which holds the
rest of the two models to the same test as any other. Weights are only scanned in that second pass:
a scan of every weight would cost a checkpoint's worth of CPU reads on every verify.

Determinism: both sides run the same functions (but where REPRESENTATION_FIELDS differ, as pairs
rotary) on tensors of the same shapes, one after the other in one process, so on CPU they share kernels
and thread count, and a run repeats bit for bit (a checkpoint against itself is exactly 0), under load
too. The thread count is not neutral (on a 16-core host, 512- and 2048-wide models moved by ~2e-6
between some counts; the 32-wide fixtures never), but it is the same for both sides. Two mechanisms were
found that change numbers from run to run. Memory: the page release between layers could zero the freed
mapping of another owner of the same file (pages.py); the CLI's commands were not seen to free one first,
library callers could. And the math library's first call in a process, when it is a parallel one, can
take another code path on one thread (the reference side's first GELU, so a Bloom against itself failed in
about 1 process of 12): forward.settle_math makes that first call before any stage.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qkvconv.reference import forward
from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.model.nonfinite import is_finite, max_difference
from qkvconv.formats.weights import ModelWeights

# Default tolerances per compute dtype: (atol, rtol), with a stage passing when
# max|a - b| <= atol + rtol * max|a|. Pure re-orderings are bitwise equal in float32 on CPU.
DEFAULT_TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


@dataclass
class Stage:
    name: str
    max_abs_diff: float  # where both sides are finite; inf where a NaN/inf is not the same on both sides
    scale: float  # max |reference| (finite values) at this stage, for judging the difference
    within: bool
    nonfinite: int = 0  # NaN/inf values of the reference at this stage (the candidate holds the same)


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    device: str
    dtype: str
    tokens: int
    seed: int
    atol: float
    rtol: float
    stages: list[Stage] = field(default_factory=list)
    top1_agreement: float = 0.0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int | None = None
    # weights holding NaN/inf, per side; only looked for when a stage held NaN/inf (see the module's doc)
    nonfinite_weights: dict[str, list[str]] = field(default_factory=lambda: {"reference": [], "candidate": []})
    # why the tolerance is what it is, where a side's storage set it (a quantized GGUF), and what else the
    # reader should know (a setting one side's file cannot record, taken from the other side)
    tolerance_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(s.within for s in self.stages)

    @property
    def first_difference(self) -> str | None:
        return next((s.name for s in self.stages if not s.within), None)

    @property
    def logits_max_abs_diff(self) -> float:
        """The largest logit difference of any pass (with NaN/inf weights there are two)."""
        logits = [s.max_abs_diff for s in self.stages if s.name.startswith("logits")]
        return max(logits) if logits else float("nan")

    @property
    def nonfinite_summary(self) -> str | None:
        """What was made of NaN/inf weights, in words; None when neither side has any."""
        sides = {side: names for side, names in self.nonfinite_weights.items() if names}
        if not sides:
            return None
        listed = "; ".join(f"{side}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for side, names in sides.items())
        return (f"weights with NaN/inf ({listed}) compared as they are, NaN for NaN in the same places, "
                "and again read as 0")

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(passed=self.passed, first_difference=self.first_difference, logits_max_abs_diff=self.logits_max_abs_diff)
        return d


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QkvconvError("--device cuda: no CUDA GPU is available to this torch build; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise QkvconvError(f"--device must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


def compute_dtype(weights: ModelWeights, device: torch.device, dtype: str | None) -> torch.dtype:
    """float32 on CPU (exact comparisons); on a GPU the stored half-precision dtype, for speed."""
    if dtype is not None:
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[dtype]
        except KeyError:
            raise QkvconvError(f"--dtype must be float32, bfloat16, float16 or float64, got {dtype!r}") from None
    stored = weights.dtype()
    if device.type == "cuda" and stored in (torch.bfloat16, torch.float16):
        return stored
    return torch.float32


def architecture(weights: ModelWeights) -> forward.Architecture:
    return forward.Architecture.from_litgpt_config(weights.config)


# Config fields in which two layouts of one model may differ (pairs vs half rotary, K/V heads repeated
# for MHA, a zero bias made explicit by norm folding): each side runs with its own, the numbers decide.
REPRESENTATION_FIELDS = frozenset({"rope_interleave", "n_query_groups", "qkv_bias", "proj_bias", "mlp_bias",
                                   "lm_head_bias", "norm_bias"})

DEFAULT_TOKENS = 16  # enough for every position-dependent path (RoPE, causal mask) to matter; fast on CPU
LITGPT_BLOCK_SIZE = 4096  # litgpt.Config's default block_size


def block_size(weights: ModelWeights) -> int:
    """The longest sequence the model is defined for (litgpt's block_size, HF's max_position_embeddings).

    Read from the config, not part of forward.Architecture: it changes no computation, and files of one
    model may record different ones (Mistral-7B: 32768 on the Hub, 4096 in litgpt; Meta's params.json
    has none)."""
    return int(weights.config.get("block_size") or LITGPT_BLOCK_SIZE)


def _check_tolerance(option: str, value: float | None) -> None:
    """A negative (or NaN) tolerance fails every stage, identical checkpoints included: that is a usage
    error (exit 2), not a verdict about the checkpoints (exit 1)."""
    if value is not None and not value >= 0:
        raise QkvconvError(f"{option} must be a number >= 0, got {value}")


def sequence_length(tokens: int | None, reference: int, candidate: int) -> int:
    """The number of tokens to run: `tokens` (default 16, or block_size where shorter), refused past
    either side's block_size (`reference`, `candidate`).

    Past block_size the model is not defined: litgpt refuses such input (GPT.forward: "Cannot forward
    sequence of length T, max seq length is only block_size") and builds its rotary cache and masks only
    that far, so agreement computed there proves nothing about the model as anyone runs it. The forward
    pass here would compute it anyway (its rotary angles are made for exactly the T positions asked
    for: nothing is read past a cache), so the limit has to be checked here.
    """
    limit = min(reference, candidate)
    if tokens is None:
        return min(DEFAULT_TOKENS, limit)
    if tokens < 1:
        raise QkvconvError(f"--tokens must be at least 1, got {tokens}")
    if tokens > limit:
        whose = "the model's" if reference == candidate else (
            "the reference's" if reference == limit else "the candidate's")
        raise QkvconvError(
            f"--tokens {tokens} is longer than {whose} block_size ({limit}), the longest sequence it is "
            f"defined for (model_config.yaml block_size, config.json max_position_embeddings); "
            f"pass --tokens {limit} or less"
        )
    return tokens


ZEROED = " (NaN/inf weights as 0)"  # the names of the second pass's stages


class _Zeroed:
    """One side's weights for the second pass: NaN/inf values handed over as 0, each such weight noted."""

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.nonfinite: list[str] = []

    def __call__(self, name: str) -> torch.Tensor:
        t = self.weights(name)
        if is_finite(t):
            return t
        if name not in self.nonfinite:
            self.nonfinite.append(name)
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def release(self) -> None:
        self.weights.release()


def _stage(name: str, a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> Stage:
    """Compare one stage: the same NaN/inf in the same places, the finite rest within atol + rtol * scale."""
    a, b = a.float(), b.float()
    finite = torch.isfinite(a)
    scale = float(a[finite].abs().max()) if bool(finite.any()) else 0.0
    diff = max_difference(a, b)
    return Stage(name, diff, scale, diff <= atol + rtol * scale, int((~finite).sum()))


def _forward_pass(
    report: VerifyReport, archs: tuple[forward.Architecture, forward.Architecture], sides: tuple[Any, Any],
    ids: torch.Tensor, cdtype: torch.dtype, suffix: str = "", progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Both sides, layer by layer, each stage compared and appended to the report (names + `suffix`);
    returns whether any stage held NaN/inf on either side."""
    (arch_a, arch_b), (reference, candidate) = archs, sides
    nonfinite = False

    def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal nonfinite
        report.stages.append(_stage(name + suffix, a, b, report.atol, report.rtol))
        nonfinite = nonfinite or not (is_finite(a) and is_finite(b))

    stages = arch_a.n_layer + 1  # the blocks, then the head
    tick = progress or (lambda done, total: None)
    tick(0, stages)
    with torch.inference_mode():
        xa = forward.embed(arch_a, reference, ids, dtype=cdtype)
        xb = forward.embed(arch_b, candidate, ids, dtype=cdtype)
        compare("embed", xa, xb)
        for i in range(arch_a.n_layer):
            # the tokens reach some experts only: the router and every expert are compared on the MLP's input
            probes: tuple[list, list] = ([], [])
            xa = forward.block(arch_a, i, reference, xa, probe=lambda *t: probes[0].append(t))
            reference.release()
            xb = forward.block(arch_b, i, candidate, xb, probe=lambda *t: probes[1].append(t))
            candidate.release()
            for pa, pb in zip(*probes):
                for what, a, b in zip(("router", "experts"), pa, pb):
                    compare(f"layer {i} {what}", a, b)
            compare(f"layer {i}", xa, xb)
            tick(i + 1, stages)
        la, lb = forward.head(arch_a, reference, xa), forward.head(arch_b, candidate, xb)
        compare("logits", la, lb)
        report.top1_agreement = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
    tick(stages, stages)
    return nonfinite


def _assumed(reference: Any, candidate: Any, arch_a: forward.Architecture, arch_b: forward.Architecture
             ) -> tuple[forward.Architecture, forward.Architecture, list[str]]:
    """Settings a side's file cannot record (a GGUF's GELU: llama.cpp's is the tanh approximation, the file
    says nothing) are taken from the other side, and the notes say so: the check is then about the weights."""
    from dataclasses import replace

    notes = []
    for side, other, arch, other_arch in ((reference, candidate, arch_a, arch_b), (candidate, reference, arch_b, arch_a)):
        same_gelu = _tanh_gelu(arch) and _tanh_gelu(other_arch)  # GPT-2's gelu_new is the tanh formula written out
        for name in sorted(getattr(side, "assumed", ())):  # a frozenset: its order changes from process to process
            mine, theirs = getattr(arch, name), getattr(other_arch, name)
            if mine != theirs and not getattr(other, "assumed", ()) and same_gelu:
                arch_a, arch_b = (replace(arch_a, **{name: theirs}), arch_b) if side is reference else \
                    (arch_a, replace(arch_b, **{name: theirs}))
            elif mine != theirs and not getattr(other, "assumed", ()):
                notes.append(f"{side.description} cannot record {name} (llama.cpp computes {mine!r}); compared with "
                             f"the other side's {theirs!r}: llama.cpp's own run differs by that approximation")
                if side is reference:
                    arch_a = replace(arch_a, **{name: theirs})
                else:
                    arch_b = replace(arch_b, **{name: theirs})
    return arch_a, arch_b, notes


def _tanh_gelu(arch: forward.Architecture) -> bool:
    """The MLP's activation is the tanh approximation of GELU (torch's, or transformers' gelu_new formula)."""
    return arch.mlp_activation == "gelu_new" or (arch.mlp_activation, arch.gelu_approximate) == ("gelu", "tanh")


class _QuantizedAlike:
    """The reference with each weight quantized (and dequantized) the way the candidate GGUF stores it, by
    gguf's own quantizer: a correct Q8_0 file then computes exactly what this reference computes, so
    a wrong row anywhere fails at float32's tolerance instead of hiding in the rounding (F16/BF16 tensors:
    the reference's values rounded to that type)."""

    def __init__(self, weights: Any, candidate: Any) -> None:
        self.weights, self.candidate = weights, candidate
        self.description = weights.description
        self.quantized: dict[str, str] = {}

    def __call__(self, name: str) -> torch.Tensor:
        from qkvconv.formats.gguf.format import requantize

        t = self.weights(name)
        kind = self.candidate.quantized_as(name) if name in self.candidate.recipes else None
        if kind is None:
            return t
        self.quantized[name] = kind
        return requantize(t, kind).to(t.dtype if t.dtype == torch.float64 else torch.float32)

    def release(self) -> None:
        self.weights.release()

    def dtype(self) -> torch.dtype:
        return self.weights.dtype()


def _storage_tolerance(reference: Any, candidate: Any) -> Any:
    """The tolerance a side's lossy storage (a quantized or half-precision GGUF against a wider reference)
    needs, the larger of the two sides'; None where the dtype's defaults hold."""
    found = [t for side, other in ((reference, candidate), (candidate, reference))
             if hasattr(side, "tolerance") and (t := side.tolerance(other.dtype())) is not None]
    return max(found, key=lambda t: t.rtol, default=None)


def _baked(reference: Any, candidate: Any) -> frozenset[str]:
    """Settings a side's weights hold instead of its config (a JAIS GGUF: token_embd and output already
    multiplied by the embedding and logit scales, as llama.cpp's converter writes them): the two sides compute
    the same numbers with different values of these, so only the stages compare them."""
    return frozenset(getattr(reference, "baked", ())) | frozenset(getattr(candidate, "baked", ()))


def _comparable(a: forward.Architecture, b: forward.Architecture, baked: frozenset[str] = frozenset()) -> None:
    """Fail (exit 1) when the two configs describe different functions: they cannot be equal (`baked`: fields
    a side's weights hold, compared by the stages only)."""
    fa, fb = a.function_fields(), b.function_fields()
    diffs = [f"{k}: {fa[k]!r} vs {fb[k]!r}" for k in fa
             if k not in REPRESENTATION_FIELDS and k not in baked and fa[k] != fb[k]]
    if diffs:
        raise CheckFailed(f"the two checkpoints have different architectures ({'; '.join(diffs[:3])})")


def verify(
    reference: ModelWeights,
    candidate: ModelWeights,
    *,
    device: str = "cpu",
    tokens: int | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Run both models on the same random tokens, stage by stage; never raises on a mismatch
    (the report says it), only on bad input. `progress(done, total)` hears of each layer compared (and of
    the head, the last stage). `tokens`: the sequence length, at most block_size (default: 16, or
    block_size where shorter)."""
    start = time.perf_counter()
    _check_tolerance("--atol", atol)
    _check_tolerance("--rtol", rtol)
    dev = resolve_device(device)
    arch_a, arch_b = architecture(reference), architecture(candidate)
    arch_a, arch_b, notes = _assumed(reference, candidate, arch_a, arch_b)
    baked = _baked(reference, candidate)
    _comparable(arch_a, arch_b, baked)
    notes += [f"{name} {getattr(arch_a, name)!r} vs {getattr(arch_b, name)!r}: one side's weights hold it (llama.cpp's "
              "converter multiplies it into token_embd / output); the stages compare the numbers"
              for name in sorted(baked) if getattr(arch_a, name) != getattr(arch_b, name)]
    tokens = sequence_length(tokens, block_size(reference), block_size(candidate))
    cdtype = compute_dtype(reference, dev, dtype)
    d_atol, d_rtol = DEFAULT_TOLERANCE[cdtype]
    storage = _storage_tolerance(reference, candidate) if atol is None and rtol is None else None
    if storage is not None:
        d_atol, d_rtol = max(d_atol, storage.atol), max(d_rtol, storage.rtol)
    # --atol alone means a purely absolute tolerance; neither means the dtype's defaults
    atol, rtol = (d_atol if atol is None else atol), ((d_rtol if atol is None else 0.0) if rtol is None else rtol)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch_a.padded_vocab_size, (batch, tokens), generator=generator).to(dev)
    # which reading of the fused rows each side was given, where software reads them more than one way
    notes += [f"{side}: {reading}" for side, w in (("reference", reference), ("candidate", candidate))
              for reading in getattr(w, "readings", ())]
    report = VerifyReport(reference.description, candidate.description, str(dev), str(cdtype).removeprefix("torch."),
                          tokens, seed, atol, rtol, notes=notes)
    if storage is not None:
        report.tolerance_reason = f"{storage.why}: atol {storage.atol:g}, rtol {storage.rtol:g} (set by the stored type)"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    quantized = None
    lossy = [w for w in (candidate, reference) if hasattr(w, "quantized_as") and getattr(w, "storage", "F32") != "F32"]
    if storage is None and len(lossy) == 1:  # the float side quantized as the GGUF side stores each weight
        if lossy[0] is candidate:
            reference = quantized = _QuantizedAlike(reference, candidate)
        else:
            candidate = quantized = _QuantizedAlike(candidate, reference)
    if _forward_pass(report, (arch_a, arch_b), (reference, candidate), ids, cdtype, progress=progress):
        zeroed = (_Zeroed(reference), _Zeroed(candidate))
        _forward_pass(report, (arch_a, arch_b), zeroed, ids, cdtype, ZEROED)
        report.nonfinite_weights = {"reference": zeroed[0].nonfinite, "candidate": zeroed[1].nonfinite}
    if quantized is not None and quantized.quantized:
        kinds = sorted(set(quantized.quantized.values()))
        report.tolerance_reason = (f"the reference's weights were quantized to {', '.join(kinds)} with gguf's quantizer "
                                   f"({len(quantized.quantized)} tensors) and compared at float32's tolerance")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(dev))
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report
