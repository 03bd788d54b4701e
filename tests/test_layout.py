"""The layout algebra, exhaustively: every order against every other, round trips, MHA/GQA/MQA,
head sizes that are not n_embd / n_head, and agreement with litgpt's own re-ordering code."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from qkvconv.model.layout import (
    HeadLayout,
    LayoutError,
    QKVOrder,
    canonical_index,
    fuse,
    permutation,
    reorder,
    same_rows,
    split,
)

# (n_head, n_query_groups, head_size): MHA, GQA, MQA, odd and tiny head sizes.
HEADS = [
    (1, 1, 1),
    (4, 4, 8),
    (8, 2, 4),
    (8, 1, 4),
    (6, 3, 5),
    (12, 4, 3),
    (4, 2, 12),  # head_size 12 while n_embd might be 32: not n_embd / n_head
    (32, 8, 2),
    (9, 9, 7),
    (16, 1, 3),
    (8, 8, 1),  # one dim per head: element-interleaved is per-head
    (12, 12, 3),  # CodeGen's 4 blocks of 3 heads
]
FUSED = list(QKVOrder)  # every order qkvconv names, the ones added later included


def labels(order: QKVOrder, H: int, G: int, hs: int) -> list[tuple[str, int, int]]:
    """Row labels (projection, head, dim) written out with plain loops, independent of layout.py."""
    q_per_kv = H // G
    head = lambda kind, h: [(kind, h, d) for d in range(hs)]  # noqa: E731
    rows: list[tuple[str, int, int]] = []
    if order in (QKVOrder.SEQUENTIAL, QKVOrder.SPLIT):
        for kind, n in (("q", H), ("k", G), ("v", G)):
            for h in range(n):
                rows += head(kind, h)
    elif order is QKVOrder.GROUPED:
        for g in range(G):
            for j in range(q_per_kv):
                rows += head("q", g * q_per_kv + j)
            rows += head("k", g) + head("v", g)
    elif order is QKVOrder.PER_HEAD:
        assert G == H
        for h in range(H):
            rows += head("q", h) + head("k", h) + head("v", h)
    elif order is QKVOrder.INTERLEAVED:  # Megatron v1.0: a [heads, head_dim, 3] view
        assert G == H
        for h in range(H):
            for d in range(hs):
                rows += [("q", h, d), ("k", h, d), ("v", h, d)]
    else:  # CodeGen: 4 blocks of H/4 heads, each q rows, v rows, k rows
        assert order is QKVOrder.CODEGEN_MP4 and G == H and H % 4 == 0
        per_block = H // 4
        for b in range(4):
            for kind in "qvk":
                for j in range(per_block):
                    rows += head(kind, b * per_block + j)
    return rows


def valid(order: QKVOrder, H: int, G: int) -> bool:
    if order in (QKVOrder.PER_HEAD, QKVOrder.INTERLEAVED):
        return H == G
    if order is QKVOrder.CODEGEN_MP4:
        return H == G and H % 4 == 0
    return True


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("src,dst", list(itertools.product(FUSED, FUSED)))
def test_every_order_against_every_other(H: int, G: int, hs: int, src: QKVOrder, dst: QKVOrder) -> None:
    heads = HeadLayout(H, G, hs)
    if not (valid(src, H, G) and valid(dst, H, G)):
        with pytest.raises(LayoutError):
            permutation(src, dst, heads)
        return
    src_labels, dst_labels = labels(src, H, G, hs), labels(dst, H, G, hs)
    perm = permutation(src, dst, heads)
    assert [src_labels[i] for i in perm.tolist()] == dst_labels
    # every row accounted for: a bijection
    assert sorted(perm.tolist()) == list(range(heads.rows))


@pytest.mark.parametrize("H,G,hs", HEADS)
def test_same_rows_is_exactly_an_identity_permutation(H: int, G: int, hs: int) -> None:
    """The torch-free predicate the planners use to skip a re-order, against the permutation itself."""
    heads = HeadLayout(H, G, hs)
    for src, dst in itertools.product(FUSED, FUSED):
        if not (valid(src, H, G) and valid(dst, H, G)):
            with pytest.raises(LayoutError, match="order (exists only for MHA|needs n_head divisible by 4)"):
                same_rows(src, dst, heads)
            continue
        assert same_rows(src, dst, heads) == torch.equal(permutation(src, dst, heads), torch.arange(heads.rows))


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("src,dst", list(itertools.permutations(FUSED, 2)))
def test_round_trip_weights_biases(H: int, G: int, hs: int, src: QKVOrder, dst: QKVOrder) -> None:
    heads = HeadLayout(H, G, hs)
    if not (valid(src, H, G) and valid(dst, H, G)):
        return
    weight = torch.randn(heads.rows, 11)
    bias = torch.randn(heads.rows)
    lora_b = torch.randn(heads.rows, 3)
    for t in (weight, bias, lora_b):
        there = reorder(t, src, dst, heads)
        assert there.shape == t.shape
        assert torch.equal(reorder(there, dst, src, heads), t)


@pytest.mark.parametrize("H,G,hs", HEADS)
def test_composition(H: int, G: int, hs: int) -> None:
    heads = HeadLayout(H, G, hs)
    orders = [o for o in FUSED if valid(o, H, G)]
    for a, b, c in itertools.product(orders, repeat=3):
        ab, bc, ac = (permutation(x, y, heads) for x, y in ((a, b), (b, c), (a, c)))
        assert torch.equal(ab[bc], ac)


def test_identities_from_layouts_md() -> None:
    # grouped with G = 1 is sequential; grouped with G = H is per-head
    for H, hs in ((4, 3), (8, 5), (1, 2)):
        assert torch.equal(canonical_index(QKVOrder.GROUPED, HeadLayout(H, 1, hs)), torch.arange((H + 2) * hs))
        mha = HeadLayout(H, H, hs)
        assert torch.equal(canonical_index(QKVOrder.GROUPED, mha), canonical_index(QKVOrder.PER_HEAD, mha))


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("order", FUSED)
def test_split_and_fuse(H: int, G: int, hs: int, order: QKVOrder) -> None:
    heads = HeadLayout(H, G, hs)
    if not valid(order, H, G):
        return
    q, k, v = torch.randn(H * hs, 5), torch.randn(G * hs, 5), torch.randn(G * hs, 5)
    fused = fuse(q, k, v, order, heads)
    got = split(fused, order, heads)
    assert all(torch.equal(x, y) for x, y in zip(got, (q, k, v)))
    # the labels say the same thing: each fused row is the right row of q, k or v
    source = {"q": q, "k": k, "v": v}
    for row, (kind, h, d) in enumerate(labels(order, H, G, hs)):
        assert torch.equal(fused[row], source[kind][h * hs + d])


@pytest.mark.parametrize("H,G,hs", HEADS)
def test_agrees_with_litgpt_reassembly(H: int, G: int, hs: int) -> None:
    """litgpt's own code for its layout change is an oracle written by someone else."""
    from litgpt.scripts.convert_hf_checkpoint import qkv_reassemble as grouped_to_sequential
    from litgpt.scripts.convert_lit_checkpoint import qkv_reassemble as sequential_to_grouped

    config = SimpleNamespace(n_head=H, n_query_groups=G, head_size=hs)
    heads = HeadLayout(H, G, hs)
    w = torch.randn(heads.rows, 7)
    assert torch.equal(
        reorder(w, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads), grouped_to_sequential(w, config)
    )
    assert torch.equal(
        reorder(w, QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads), sequential_to_grouped(w, config)
    )


def test_bad_head_counts_and_shapes() -> None:
    with pytest.raises(LayoutError, match="multiple"):
        HeadLayout(6, 4, 8)
    with pytest.raises(LayoutError, match="positive"):
        HeadLayout(4, 0, 8)
    with pytest.raises(LayoutError, match="expected 48 rows"):
        reorder(torch.zeros(47, 3), QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, HeadLayout(4, 4, 4))
    with pytest.raises(LayoutError, match="per-head"):
        reorder(torch.zeros(32, 3), QKVOrder.PER_HEAD, QKVOrder.PER_HEAD, HeadLayout(4, 2, 4))


def test_attention_kind() -> None:
    assert HeadLayout(8, 8, 4).attention == "MHA"
    assert HeadLayout(8, 2, 4).attention == "GQA"
    assert HeadLayout(8, 1, 4).attention == "MQA"
    assert HeadLayout(1, 1, 4).attention == "MHA"


@pytest.mark.parametrize("H,hs", [(4, 3), (8, 2), (12, 5)])
@pytest.mark.parametrize("version,order", [(1.0, QKVOrder.INTERLEAVED), (2.0, QKVOrder.PER_HEAD)])
def test_agrees_with_transformers_megatron_script(H: int, hs: int, version: float, order: QKVOrder) -> None:
    """transformers' Megatron -> GPT-2 script re-orders query_key_value into GPT-2's sequential c_attn rows:
    checkpoint version 1.0 is element-interleaved, 2.0 and later per-head (someone else's code as oracle).
    Its reverse function for 1.0 is not the inverse of its forward one (it views (3, H, hs) and transposes to
    (hs, 3, H), not (H, hs, 3)); the script only writes version 3.0, so only 2.0's reverse is an oracle."""
    from transformers.models.megatron_gpt2.checkpoint_reshaping_and_interoperability import (
        megatron_to_transformers_fix_query_key_value_ordering as to_gpt2,
        transformers_to_megatron_fix_query_key_value_ordering as to_megatron,
    )

    heads = HeadLayout(H, H, hs)
    for t in (torch.randn(heads.rows, 7), torch.randn(heads.rows)):
        assert torch.equal(reorder(t, order, QKVOrder.SEQUENTIAL, heads), to_gpt2(t, version, 3, H, hs))
        if version >= 2.0:
            assert torch.equal(reorder(t, QKVOrder.SEQUENTIAL, order, heads), to_megatron(t, version, 3, H, hs))


@pytest.mark.parametrize("H,hs", [(4, 3), (8, 2), (16, 4)])
def test_agrees_with_transformers_codegen_attention(H: int, hs: int) -> None:
    """CodeGenAttention.forward's own reshapes (mp_num = 4, split into query, value, key, _split_heads)
    applied to a projection output, against split(..., CODEGEN_MP4)."""
    from transformers.models.codegen.modeling_codegen import CodeGenAttention

    heads = HeadLayout(H, H, hs)
    qkv = torch.randn(2, 3, heads.rows)  # (batch, tokens, fused rows): what qkv_proj returns
    mp_num = 4
    qkv_split = qkv.reshape(qkv.shape[:-1] + (mp_num, -1))
    local_dim = hs * H // mp_num
    query, value, key = torch.split(qkv_split, local_dim, dim=-1)
    theirs = [CodeGenAttention._split_heads(None, x, H, hs, mp_num=mp_num).reshape(2, 3, H * hs)
              for x in (query, key, value)]
    ours = split(qkv.reshape(-1, heads.rows).T, QKVOrder.CODEGEN_MP4, heads)
    for mine, other in zip(ours, theirs):
        assert torch.equal(mine.T.reshape(2, 3, H * hs), other)
    with pytest.raises(LayoutError, match="divisible by 4"):
        permutation(QKVOrder.CODEGEN_MP4, QKVOrder.SEQUENTIAL, HeadLayout(6, 6, 2))
