"""The layout algebra of fused QKV weights: pure index arithmetic, no I/O.

A fused QKV matrix has (H + 2G) * hs rows. Every fused order is a labelling of those rows
with (projection, head, dim); converting between two orders is one row permutation.
We describe each order by its *canonical index*: for every row position, the index that
row has in sequential order (all Q heads, then all K heads, then all V heads). Two orders
are then related by `permutation(src, dst, heads)`, which satisfies
``dst_rows = src_rows[permutation(src, dst, heads)]``. Biases and LoRA-B rows use the same
index because they follow the weight rows exactly (see docs/layouts.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: QKVOrder and HeadLayout serve torch-free code
    import torch


class LayoutError(ValueError):
    """An order or head configuration that cannot exist (e.g. per-head order with GQA)."""


class QKVOrder(str, Enum):
    """Row orders of a fused QKV weight (SPLIT: three separate tensors, rows as SEQUENTIAL)."""

    SEQUENTIAL = "sequential"  # Q heads, K heads, V heads (litgpt >= 0.5.5 `attn.qkv`)
    GROUPED = "grouped"  # per KV group: its Q heads, then K_g, V_g (litgpt <= 0.5.4 `attn.attn`)
    PER_HEAD = "per-head"  # per head: q_h, k_h, v_h (GPT-NeoX, Bloom); MHA only
    SPLIT = "split"  # separate q/k/v tensors (HF Llama); concatenated they are sequential
    # CodeGen 1/2 `qkv_proj`: 4 blocks (transformers' hard-coded mp_num = 4, the TPU cores it was trained
    # on), block b holding heads [b*H/4, (b+1)*H/4) as their q rows, then v rows, then k rows; MHA only
    CODEGEN_MP4 = "codegen-mp4"
    # Megatron GPT checkpoint version 1.0 `query_key_value`: [heads, head_dim, 3], so q, k, v alternate
    # element by element inside each head; MHA only (transformers' megatron_gpt2 conversion script)
    INTERLEAVED = "element-interleaved"


# orders that exist only with one key/value head per query head
MHA_ONLY = (QKVOrder.PER_HEAD, QKVOrder.CODEGEN_MP4, QKVOrder.INTERLEAVED)
CODEGEN_BLOCKS = 4


@dataclass(frozen=True)
class HeadLayout:
    """Head counts of one attention layer: H query heads, G key/value heads, head size hs."""

    n_head: int
    n_query_groups: int
    head_size: int

    def __post_init__(self) -> None:
        if min(self.n_head, self.n_query_groups, self.head_size) < 1:
            raise LayoutError(f"head counts must be positive, got {self}")
        if self.n_head % self.n_query_groups:
            raise LayoutError(
                f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.n_head // self.n_query_groups

    @property
    def q_rows(self) -> int:
        return self.n_head * self.head_size

    @property
    def kv_rows(self) -> int:
        return self.n_query_groups * self.head_size

    @property
    def rows(self) -> int:
        """Rows of the fused matrix: (H + 2G) * hs."""
        return self.q_rows + 2 * self.kv_rows

    @property
    def attention(self) -> str:
        """MHA (G = H), MQA (G = 1 < H) or GQA (1 < G < H)."""
        if self.n_query_groups == self.n_head:
            return "MHA"
        if self.n_query_groups == 1:
            return "MQA"
        return "GQA"


def _per_head_needs_mha(heads: HeadLayout, order: QKVOrder = QKVOrder.PER_HEAD) -> LayoutError:
    return LayoutError(
        f"{order.value} order exists only for MHA (n_head == n_query_groups), got H={heads.n_head}, G={heads.n_query_groups}"
    )


def check_order(order: QKVOrder, heads: HeadLayout) -> None:
    """Raise LayoutError unless rows in `order` can exist for these heads (MHA-only orders; CodeGen's
    four blocks need a head count divisible by 4)."""
    if order in MHA_ONLY and heads.n_query_groups != heads.n_head:
        raise _per_head_needs_mha(heads, order)
    if order is QKVOrder.CODEGEN_MP4 and heads.n_head % CODEGEN_BLOCKS:
        raise LayoutError(f"codegen-mp4 order needs n_head divisible by {CODEGEN_BLOCKS}, got H={heads.n_head}")


def canonical_rows(order: QKVOrder, heads: HeadLayout) -> list[int]:
    """For each row position in `order`, the index of that row in sequential order (plain ints: the
    byte path computes where rows lie without torch)."""
    H, G, hs = heads.n_head, heads.n_query_groups, heads.head_size
    check_order(order, heads)
    if order in (QKVOrder.SEQUENTIAL, QKVOrder.SPLIT):
        return list(range(heads.rows))
    if order is QKVOrder.INTERLEAVED:  # position = (h * hs + d) * 3 + part
        return [pos % 3 * H * hs + pos // 3 for pos in range(heads.rows)]
    if order is QKVOrder.CODEGEN_MP4:  # position = ((block * 3 + part) * H/4 + local head) * hs + d
        local = H // CODEGEN_BLOCKS * hs
        projection = (0, 2, 1)  # the parts are q, v, k
        return [projection[pos // local % 3] * H * hs + pos // (3 * local) * local + pos % local
                for pos in range(heads.rows)]
    # GROUPED, and PER_HEAD which is GROUPED with G == H: blocks of (q_per_kv + 2) heads.
    q = heads.q_per_kv
    out = []
    for pos in range(heads.rows):
        slot_head, dim = divmod(pos, hs)
        group, slot = divmod(slot_head, q + 2)
        if slot < q:
            out.append((group * q + slot) * hs + dim)
        else:
            out.append((H + (G if slot > q else 0)) * hs + group * hs + dim)
    return out


def canonical_index(order: QKVOrder, heads: HeadLayout) -> torch.Tensor:
    """canonical_rows as a tensor."""
    import torch

    return torch.tensor(canonical_rows(order, heads), dtype=torch.int64)


def permutation_rows(src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> list[int]:
    """Row index `p` with ``dst_rows = src_rows[p]`` for any two orders (plain ints)."""
    position_in_src = [0] * heads.rows  # canonical -> src position
    for position, canonical in enumerate(canonical_rows(src, heads)):
        position_in_src[canonical] = position
    return [position_in_src[c] for c in canonical_rows(dst, heads)]


def _row_order(order: QKVOrder, heads: HeadLayout) -> QKVOrder:
    """The order whose canonical index `order` has for these heads: element-interleaved with one dim per
    head is per-head, per-head is grouped with G = H, grouped with G = 1 is sequential (one group: all Q
    heads, then K, then V), split is sequential. CodeGen's blocks hold v before k, so never coincide."""
    check_order(order, heads)
    if order is QKVOrder.INTERLEAVED and heads.head_size == 1:
        order = QKVOrder.PER_HEAD
    if order is QKVOrder.PER_HEAD:
        order = QKVOrder.GROUPED
    if order is QKVOrder.SPLIT or (order is QKVOrder.GROUPED and heads.n_query_groups == 1):
        return QKVOrder.SEQUENTIAL
    return order


def same_rows(src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> bool:
    """Whether `permutation(src, dst, heads)` is the identity, without torch: planners skip a re-order
    that moves nothing (MQA's grouped rows are sequential; per-head is grouped for MHA). With G > 1
    grouped puts K_0 where sequential has Q head q_per_kv, so it never coincides with sequential.
    tests/test_layout.py checks this against the permutation for many head layouts."""
    return _row_order(src, heads) is _row_order(dst, heads)


def permutation(src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> torch.Tensor:
    """Row index `p` with ``dst_rows = src_rows[p]`` for any two orders."""
    import torch

    return torch.tensor(permutation_rows(src, dst, heads), dtype=torch.int64)


def check_reorder(shape: tuple[int, ...], src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> None:
    """Raise LayoutError unless rows of this shape can go from `src` to `dst` (what reorder checks)."""
    if not shape or shape[0] != heads.rows:
        raise LayoutError(
            f"expected {heads.rows} rows for H={heads.n_head}, G={heads.n_query_groups}, "
            f"hs={heads.head_size}, got shape {tuple(shape)}"
        )
    check_order(src, heads)
    check_order(dst, heads)


def check_parts(shapes: list[tuple[int, ...]], heads: HeadLayout) -> None:
    """Raise LayoutError unless these are q, k, v of this head layout (what fuse checks)."""
    for name, shape, rows in zip("qkv", shapes, (heads.q_rows, heads.kv_rows, heads.kv_rows)):
        if not shape or shape[0] != rows:
            raise LayoutError(f"{name} has {shape[0] if shape else 0} rows, expected {rows}")


def reorder(tensor: torch.Tensor, src: QKVOrder, dst: QKVOrder, heads: HeadLayout) -> torch.Tensor:
    """Re-order the rows (dim 0) of a fused weight, bias or LoRA-B from `src` to `dst`."""
    check_reorder(tuple(tensor.shape), src, dst, heads)
    if {src, dst} <= {QKVOrder.SEQUENTIAL, QKVOrder.SPLIT} or src == dst:
        return tensor
    return tensor.index_select(0, permutation(src, dst, heads))


def split(tensor: torch.Tensor, order: QKVOrder, heads: HeadLayout) -> tuple[torch.Tensor, ...]:
    """Fused rows in `order` -> separate (q, k, v) tensors."""
    import torch

    sequential = reorder(tensor, order, QKVOrder.SEQUENTIAL, heads)
    return tuple(torch.split(sequential, [heads.q_rows, heads.kv_rows, heads.kv_rows], dim=0))


def fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: QKVOrder, heads: HeadLayout) -> torch.Tensor:
    """Separate (q, k, v) tensors -> one fused tensor with rows in `order`."""
    import torch

    check_parts([tuple(q.shape), tuple(k.shape), tuple(v.shape)], heads)
    return reorder(torch.cat([q, k, v], dim=0), QKVOrder.SEQUENTIAL, order, heads)
