"""Rotary-embedding row orders inside a head, and GQA expansion: pure index arithmetic, no I/O.

"half" (rotate_half: dims i and i + d/2 rotate together; GPT-NeoX, HF Llama, litgpt) and "pairs"
(dims 2i and 2i + 1; Meta's original Llama, GPT-J, ChatGLM) differ by one permutation of each Q and
K head's first `rope_n_elem` rows (partial rotary leaves the other rows alone). V rows never move.
Like layout.py, every function returns a row index `p` with ``new_rows = old_rows[p]``, and torch is
imported where an index is made: RopeOrder serves torch-free code (the format registry, inspect).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder, canonical_index


class RopeOrder(str, Enum):
    HALF = "half"
    PAIRS = "pairs"


def head_permutation(head_size: int, rope_n_elem: int, src: RopeOrder, dst: RopeOrder) -> torch.Tensor:
    """Index over one head's rows taking `src` rotary order to `dst`."""
    import torch

    if rope_n_elem % 2 or not 0 <= rope_n_elem <= head_size:
        raise LayoutError(f"rope_n_elem must be even and at most head_size={head_size}, got {rope_n_elem}")
    index = torch.arange(head_size)
    if src == dst:
        return index
    d, j = rope_n_elem, torch.arange(rope_n_elem)
    # pairs -> half: new row j takes old row 2j (j < d/2) or 2(j - d/2) + 1 (see docs/layouts.md)
    pairs_to_half = torch.where(j < d // 2, 2 * j, 2 * (j - d // 2) + 1)
    if src is RopeOrder.PAIRS:
        index[:d] = pairs_to_half
    else:
        index[:d] = torch.argsort(pairs_to_half)  # the inverse: half -> pairs
    return index


def _sequential_rope_index(heads: HeadLayout, rope_n_elem: int, src: RopeOrder, dst: RopeOrder) -> torch.Tensor:
    """For sequential (canonical) rows: each Q and K head permuted, V untouched."""
    import torch

    per_head = head_permutation(heads.head_size, rope_n_elem, src, dst)
    hs = heads.head_size
    qk_heads = heads.n_head + heads.n_query_groups
    qk = (torch.arange(qk_heads).unsqueeze(1) * hs + per_head.unsqueeze(0)).flatten()
    v = torch.arange(qk_heads * hs, heads.rows)
    return torch.cat([qk, v])


def rope_permutation(
    order: QKVOrder, heads: HeadLayout, rope_n_elem: int, src: RopeOrder, dst: RopeOrder
) -> torch.Tensor:
    """Row index for a fused QKV matrix (rows in `order`) taking Q/K rotary order `src` to `dst`."""
    import torch

    canon = canonical_index(order, heads)  # position -> canonical
    position = torch.empty_like(canon)
    position[canon] = torch.arange(canon.numel())  # canonical -> position
    return position[_sequential_rope_index(heads, rope_n_elem, src, dst)[canon]]
