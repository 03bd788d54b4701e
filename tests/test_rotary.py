"""Rotary order permutations and GQA expansion: exhaustive over head layouts and orders, checked
against transformers' Meta-Llama conversion formula and against attention scores."""

from __future__ import annotations

import itertools

import pytest
import torch

from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder, reorder
from qkvconv.plans.transforms import kv_repeat_index
from qkvconv.model.rotary import (
    RopeOrder,
    head_permutation,
    rope_permutation,
)

HEADS = [(4, 4, 8), (8, 2, 4), (8, 1, 6), (6, 3, 10), (2, 2, 2)]
ORDERS = [QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, QKVOrder.PER_HEAD]


def hf_llama_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute` (Meta pairs -> HF half), verbatim."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def projection_rope_permutation(  # q_proj / k_proj rows, head by head
    n_heads: int, head_size: int, rope_n_elem: int, src: RopeOrder, dst: RopeOrder) -> torch.Tensor:
    """Row index for a separate q_proj (n_heads = H) or k_proj (n_heads = G) weight or bias."""
    per_head = head_permutation(head_size, rope_n_elem, src, dst)
    return (torch.arange(n_heads).unsqueeze(1) * head_size + per_head.unsqueeze(0)).flatten()


@pytest.mark.parametrize("n_heads,hs", [(1, 2), (4, 8), (3, 16), (8, 128)])
def test_pairs_to_half_matches_transformers_conversion(n_heads: int, hs: int) -> None:
    w = torch.randn(n_heads * hs, 5)
    index = projection_rope_permutation(n_heads, hs, hs, RopeOrder.PAIRS, RopeOrder.HALF)
    assert torch.equal(w[index], hf_llama_permute(w, n_heads))


@pytest.mark.parametrize("hs,n", [(8, 8), (8, 4), (16, 4), (6, 2), (10, 0)])
def test_round_trip_and_partial_rotary(hs: int, n: int) -> None:
    there = head_permutation(hs, n, RopeOrder.PAIRS, RopeOrder.HALF)
    back = head_permutation(hs, n, RopeOrder.HALF, RopeOrder.PAIRS)
    assert torch.equal(there[back], torch.arange(hs))
    assert torch.equal(there[n:], torch.arange(n, hs))  # dims past rope_n_elem never move
    assert sorted(there.tolist()) == list(range(hs))


def test_bad_rope_sizes() -> None:
    with pytest.raises(LayoutError):
        head_permutation(8, 3, RopeOrder.PAIRS, RopeOrder.HALF)
    with pytest.raises(LayoutError):
        head_permutation(8, 10, RopeOrder.PAIRS, RopeOrder.HALF)


def rotate(x: torch.Tensor, order: RopeOrder, n: int, pos: int) -> torch.Tensor:
    """Apply rotary at position `pos` to the first n dims of each row of x (rows = head dims last)."""
    theta = 1.0 / (10000 ** (torch.arange(0, n, 2).double() / n))
    c, s = torch.cos(pos * theta), torch.sin(pos * theta)
    y = x.clone()
    if order is RopeOrder.HALF:
        a, b = x[..., : n // 2], x[..., n // 2 : n]
        y[..., : n // 2], y[..., n // 2 : n] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0:n:2], x[..., 1:n:2]
        y[..., 0:n:2], y[..., 1:n:2] = a * c - b * s, b * c + a * s
    return y


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fused_rope_permutation_preserves_attention_scores(H: int, G: int, hs: int, order: QKVOrder, fraction: float) -> None:
    if order is QKVOrder.PER_HEAD and H != G:
        return
    heads = HeadLayout(H, G, hs)
    n = int(hs * fraction) // 2 * 2
    w = torch.randn(heads.rows, 7, dtype=torch.float64)
    new = w[rope_permutation(order, heads, n, RopeOrder.PAIRS, RopeOrder.HALF)]
    x = torch.randn(3, 7, dtype=torch.float64)  # three positions
    def scores(weight: torch.Tensor, rope: RopeOrder) -> torch.Tensor:
        seq = reorder(weight, order, QKVOrder.SEQUENTIAL, heads)
        q, k, v = torch.split(x @ seq.T, [H * hs, G * hs, G * hs], dim=-1)
        q = torch.stack([rotate(q[p].view(H, hs), rope, n, p) for p in range(3)])  # (T, H, hs)
        k = torch.stack([rotate(k[p].view(G, hs), rope, n, p) for p in range(3)])  # (T, G, hs)
        k = k.repeat_interleave(H // G, dim=1)
        return torch.einsum("thd,shd->hts", q, k), v
    s_old, v_old = scores(w, RopeOrder.PAIRS)
    s_new, v_new = scores(new, RopeOrder.HALF)
    torch.testing.assert_close(s_old, s_new)
    assert torch.equal(v_old, v_new)  # V rows untouched


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("src,dst", list(itertools.product(ORDERS, ORDERS)))
def test_expand_kv_heads(H: int, G: int, hs: int, src: QKVOrder, dst: QKVOrder) -> None:
    if QKVOrder.PER_HEAD == src and H != G:
        return
    heads = HeadLayout(H, G, hs)
    w = torch.randn(heads.rows, 5)
    new = HeadLayout(H, H, hs)
    out = reorder(reorder(w, src, QKVOrder.SEQUENTIAL, heads)[kv_repeat_index(heads, H)], QKVOrder.SEQUENTIAL, dst, new)
    q, k, v = torch.split(reorder(w, src, QKVOrder.SEQUENTIAL, heads), [H * hs, G * hs, G * hs])
    nq, nk, nv = torch.split(reorder(out, dst, QKVOrder.SEQUENTIAL, new), [H * hs, H * hs, H * hs])
    assert torch.equal(nq, q)
    # llama's repeat_kv: K/V head g serves query heads g*q_per_kv .. (g+1)*q_per_kv - 1
    rep = lambda t: t.view(G, hs, -1).repeat_interleave(H // G, dim=0).reshape(H * hs, -1)  # noqa: E731
    assert torch.equal(nk, rep(k)) and torch.equal(nv, rep(v))
