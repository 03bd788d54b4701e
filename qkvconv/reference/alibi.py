"""ALiBi: position enters attention as a bias on the scores, slope_h * key position, one slope per head.

Two slope schemes, each as transformers 5.3 computes it (the reference pass mirrors them op for op):
- "bloom": models/bloom/modeling_bloom.py `build_alibi_tensor`: the ALiBi paper's geometric slopes for the largest
  power of two c <= n_head (base 2^(-8/c), powers 1..c), then the odd powers of the 2c scheme for the remaining
  heads; the bias is slope * key position (0 .. T-1).
- "mpt": models/mpt/modeling_mpt.py `build_mpt_alibi_tensor`: slopes 1 / 2^(k * alibi_bias_max / p) for k = 1..p,
  p the power of two >= n_head, re-ordered (odd positions first) and cut to n_head where n_head is not a power of
  two; the bias is slope * (key position - (T - 1)) (the table is built for max_seq_len and its last T columns
  taken; MptModel.forward passes no alibi_bias_max, so transformers always uses 8).

Per query row the two biases differ by a constant, which the softmax ignores; with alibi_bias_max 8 the slopes are
the same numbers (tests/test_fused_verify.py compares both functions for 1..64 heads), rounded differently.
"""

from __future__ import annotations

import math

import torch


def slopes(kind: str, n_head: int, bias_max: float = 8.0) -> torch.Tensor:
    """(n_head,) float32 slopes of the scheme `kind` ("bloom" | "mpt")."""
    if kind == "bloom":
        closest = 2 ** math.floor(math.log2(n_head))
        base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
        out = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
        if closest != n_head:
            extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
            remaining = min(closest, n_head - closest)
            out = torch.cat([out, torch.pow(extra, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
        return out
    if kind == "mpt":
        p = 2 ** math.ceil(math.log2(n_head))
        base = torch.arange(1, p + 1, dtype=torch.int64).float() * (bias_max / p)
        out = 1.0 / torch.pow(2, base)
        if p != n_head:
            out = torch.cat([out[1::2], out[::2]])[:n_head]
        return out
    raise ValueError(f"unknown ALiBi slopes {kind!r}")


def bias(kind: str, n_head: int, T: int, device: torch.device, bias_max: float = 8.0) -> torch.Tensor:
    """(n_head, 1, T) float32: the bias each head adds to the scores of every query for key positions 0..T-1."""
    s = slopes(kind, n_head, bias_max).to(device)
    if kind == "bloom":
        positions = torch.arange(T, device=device, dtype=torch.float32)  # (cumsum of an all-ones mask) - 1
    else:
        positions = torch.arange(1 - T, 1, device=device, dtype=torch.int32)  # the last T of arange(1 - L, 1)
    return (s[:, None] * positions[None, :])[:, None, :]
