"""Prove two checkpoints compute the same function: one forward pass of each, compared stage by stage.

Both sides run the same random tokens through the reference forward pass (forward.py), one layer at
a time: embed both, compare; run block i of both, compare; and so on. So checking two models needs
about two layers of weights in memory (plus embeddings), not two models. Each stage reports the max
absolute difference of the hidden states; the logits also report top-1 agreement.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch

from qkvconv import forward
from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.progress import layers
from qkvconv.weights import ModelWeights

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
    max_abs_diff: float
    scale: float  # max |reference| at this stage, for judging the difference
    within: bool


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

    @property
    def passed(self) -> bool:
        return all(s.within for s in self.stages)

    @property
    def first_difference(self) -> str | None:
        return next((s.name for s in self.stages if not s.within), None)

    @property
    def logits_max_abs_diff(self) -> float:
        return self.stages[-1].max_abs_diff if self.stages else float("nan")

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
REPRESENTATION_FIELDS = frozenset({"rope_interleave", "n_query_groups", "qkv_bias", "proj_bias", "lm_head_bias"})


def _comparable(a: forward.Architecture, b: forward.Architecture) -> None:
    """Fail (exit 1) when the two configs describe different functions: they cannot be equal."""
    diffs = [
        f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
        for f in fields(a)
        if f.name not in REPRESENTATION_FIELDS | {"name"} and getattr(a, f.name) != getattr(b, f.name)
    ]
    if diffs:
        raise CheckFailed(f"the two checkpoints have different architectures ({'; '.join(diffs[:3])})")


def verify(
    reference: ModelWeights,
    candidate: ModelWeights,
    *,
    device: str = "cpu",
    tokens: int = 16,
    batch: int = 2,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Run both models on the same random tokens, stage by stage; never raises on a mismatch
    (the report says it), only on bad input. `progress(done, total)` hears of each layer compared."""
    start = time.perf_counter()
    dev = resolve_device(device)
    arch_a, arch_b = architecture(reference), architecture(candidate)
    _comparable(arch_a, arch_b)
    cdtype = compute_dtype(reference, dev, dtype)
    d_atol, d_rtol = DEFAULT_TOLERANCE[cdtype]
    # --atol alone means a purely absolute tolerance; neither means the dtype's defaults
    atol, rtol = (d_atol if atol is None else atol), ((d_rtol if atol is None else 0.0) if rtol is None else rtol)
    if tokens < 1:
        raise QkvconvError("--tokens must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, arch_a.padded_vocab_size, (batch, tokens), generator=generator).to(dev)
    report = VerifyReport(reference.description, candidate.description, str(dev), str(cdtype).removeprefix("torch."),
                          tokens, seed, atol, rtol)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = float((a.float() - b.float()).abs().max())
        scale = float(a.float().abs().max())
        report.stages.append(Stage(name, diff, scale, diff <= atol + rtol * scale and diff == diff))

    with torch.inference_mode():
        xa = forward.embed(arch_a, reference, ids, dtype=cdtype)
        xb = forward.embed(arch_b, candidate, ids, dtype=cdtype)
        compare("embed", xa, xb)
        for i in range(arch_a.n_layer):
            xa = forward.block(arch_a, i, reference, xa)
            reference.release()
            xb = forward.block(arch_b, i, candidate, xb)
            candidate.release()
            compare(f"layer {i}", xa, xb)
            if progress is not None:
                progress(i + 1, arch_a.n_layer)
        la, lb = forward.head(arch_a, reference, xa), forward.head(arch_b, candidate, xb)
        compare("logits", la, lb)
        report.top1_agreement = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(dev))
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def upgrade_check(device: str = "cpu"):
    """A forward-pass check for `upgrade`: the staged result must compute what the original computes."""
    from qkvconv.litgpt_format import LitgptCheckpoint
    from qkvconv.weights import litgpt_weights

    def check(original: LitgptCheckpoint, staged: dict) -> str:
        try:
            before = litgpt_weights(original)
        except QkvconvError as e:
            return f"forward-pass check skipped: {e}"
        after = litgpt_weights(original, overrides=staged)
        try:
            report = verify(before, after, device=device, progress=layers("checking"))
        except forward.UnsupportedFamily as e:
            return f"forward-pass check skipped: {e}"
        if not report.passed:
            raise CheckFailed(
                f"the upgraded checkpoint computes something else (first difference at {report.first_difference}, "
                f"logits differ by {report.logits_max_abs_diff:.3g}); nothing was replaced"
            )
        exact = "bitwise equal" if all(s.max_abs_diff == 0 for s in report.stages) else (
            f"max logit difference {report.logits_max_abs_diff:.2g}")
        return (f"forward pass on {report.device} ({report.dtype}, {report.tokens} tokens): every layer and the logits "
                f"agree, {exact}")

    return check
