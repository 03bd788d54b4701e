"""NaN and inf: finding them in a checkpoint, and comparing tensors that hold them.

A checkpoint with NaN/inf is refused unless the user passes --allow-nonfinite; once allowed, it must
convert exactly and pass the same checks as any other. IEEE comparison says NaN != NaN, which would
fail every check of such a conversion (and blame the conversion), so every comparison in qkvconv goes
through this module: exact copies compare bytes (a NaN equals the same NaN in the same place), and
comparisons with a tolerance require the same NaN/inf in the same places and hold the finite rest to
the tolerance. A NaN or inf on one side only is always a difference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qkvconv.errors import nonfinite_error

# an integer dtype of each element size: a float tensor viewed as one compares bit for bit
_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in the tensor (always true for integer tensors).

    aminmax propagates NaN and shows inf in one pass without a temporary (about 12x faster than
    isfinite().all(), which also upcasts bf16): cheap enough to run on every tensor of a checkpoint."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # dtypes without the kernel (float8): widen first
        low, high = torch.aminmax(tensor.float())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """NaN or inf in a checkpoint is reported, never silently carried into a converted one."""
    if not is_finite(tensor):
        raise nonfinite_error(name, int((~torch.isfinite(tensor.float())).sum()))


def check_all_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """check_finite on every tensor of a file held in memory (a LoRA adapter), before anything is made of it."""
    for name, tensor in tensors.items():
        check_finite(name, tensor)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes: the test of an exact copy. Unlike torch.equal, a NaN equals the
    same NaN in the same place (and -0.0 differs from 0.0: a copy keeps the sign)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_complex():
        return same_bits(torch.view_as_real(a), torch.view_as_real(b))
    if a.is_floating_point():
        integer = _SAME_SIZE_INTEGER[a.element_size()]
        return torch.equal(a.view(integer), b.view(integer))
    return torch.equal(a, b)


def matched_finite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Where both tensors are finite (a bool mask), or None when they differ in shape or in a non-finite
    value: a NaN where the other holds no NaN, an inf where the other holds no inf of the same sign."""
    if a.shape != b.shape:
        return None
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return None
    if not bool(finite.all()):
        x, y = a[~finite], b[~finite]
        if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
            return None
    return finite


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the positions finite on both sides (0 when there are none); inf when the
    non-finite values are not the same in the same places."""
    finite = matched_finite(a, b)
    if finite is None:
        return float("inf")
    diff = (a.double() - b.double()).abs()[finite]
    return float(diff.max()) if diff.numel() else 0.0


def within(a: torch.Tensor, b: torch.Tensor, limit: torch.Tensor | float) -> bool:
    """The same NaN/inf in the same places, and |a - b| <= limit (a number, or one per element)
    wherever both are finite."""
    finite = matched_finite(a, b)
    if finite is None:
        return False
    close = (a.double() - b.double()).abs() <= limit
    return bool(close[finite].all())
