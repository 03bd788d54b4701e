"""Legacy -> current LoRA on the fused QKV layer, checked against both litgpt versions' own code:
legacy updates recorded by litgpt 0.5.4 (fixtures/legacy/lora_deltas.pt) and the current
litgpt's LoRAQKVLinear."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.model.lora import (
    PARTS,
    block_of_rows,
    block_sizes,
    target_rows,
    LoraSettings,
    apply_reorder,
    expand_rank,
    plan_reorder,
    qkv_delta,
)

DELTAS = Path(__file__).parent.parent / "fixtures" / "legacy" / "lora_deltas.pt"
LEGACY_CASES = torch.load(DELTAS, weights_only=True)["cases"]
ENABLES = [e for e in itertools.product([False, True], repeat=3) if any(e)]
HEADS = [(4, 4, 3), (8, 2, 2), (8, 1, 2), (6, 3, 5), (4, 2, 6), (1, 1, 4), (12, 4, 1), (16, 4, 3)]


def case_id(c: dict) -> str:
    flags = "".join(n for n, on in zip("qkv", c["enable"]) if on)
    return f"H{c['n_head']}-G{c['n_query_groups']}-hs{c['head_size']}-{flags}"


@pytest.mark.parametrize("case", LEGACY_CASES, ids=case_id)
def test_legacy_semantics_match_litgpt_054(case: dict) -> None:
    heads = HeadLayout(case["n_head"], case["n_query_groups"], case["head_size"])
    settings = LoraSettings(case["r"], case["alpha"], tuple(case["enable"]))
    ours = qkv_delta(case["lora_A"], case["lora_B"], settings, heads, legacy=True)
    torch.testing.assert_close(ours.float(), case["delta"], rtol=1e-5, atol=1e-6)


def current_litgpt_delta(a: torch.Tensor, b: torch.Tensor, settings: LoraSettings, heads: HeadLayout) -> torch.Tensor:
    from litgpt.lora import LoRAQKVLinear

    layer = LoRAQKVLinear(
        a.shape[1], heads.rows, head_size=heads.head_size, n_head=heads.n_head,
        n_query_groups=heads.n_query_groups, r=settings.r, lora_alpha=settings.alpha,
        enable_lora=list(settings.enable),
    )
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer.get_lora_AB().detach()


@pytest.mark.parametrize("case", LEGACY_CASES, ids=case_id)
def test_converted_adapter_reproduces_legacy_update_in_current_litgpt(case: dict) -> None:
    """The converted adapter, run by current litgpt, gives the legacy update re-ordered to sequential."""
    heads = HeadLayout(case["n_head"], case["n_query_groups"], case["head_size"])
    enable = tuple(case["enable"])
    plan = plan_reorder(enable, heads)
    new_a, new_b = apply_reorder(case["lora_A"], case["lora_B"], plan)
    new_settings = LoraSettings(case["r"] * plan.rank_factor, case["alpha"] * plan.rank_factor, enable)
    expected = reorder(case["delta"], QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
    got = current_litgpt_delta(new_a, new_b, new_settings, heads)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("enable", ENABLES, ids=lambda e: "".join(n for n, on in zip("qkv", e) if on))
def test_plan_is_exact_and_minimal(H: int, G: int, hs: int, enable: tuple[bool, bool, bool]) -> None:
    heads = HeadLayout(H, G, hs)
    r, alpha, n_embd = 3, 5, 7
    settings = LoraSettings(r, alpha, enable)
    n = sum(enable)
    sizes = [s for s, on in zip((H * hs, G * hs, G * hs), enable) if on]
    a, b = torch.randn(n * r, n_embd, dtype=torch.float64), torch.randn(sum(sizes), r, dtype=torch.float64)
    plan = plan_reorder(enable, heads)
    # Rank must grow exactly when all three are enabled and grouped differs from sequential (G > 1).
    assert plan.expand == (all(enable) and G > 1)
    new_a, new_b = apply_reorder(a, b, plan)
    assert new_a.shape == (n * r * plan.rank_factor, n_embd)
    assert new_b.shape == (sum(sizes), r * plan.rank_factor)
    new_settings = LoraSettings(r * plan.rank_factor, alpha * plan.rank_factor, enable)
    old = qkv_delta(a, b, settings, heads, legacy=True)
    new = qkv_delta(new_a, new_b, new_settings, heads, legacy=False)
    torch.testing.assert_close(reorder(old, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads), new)
    if not all(enable):
        # Only names change: the tensors are the same.
        assert torch.equal(new_a, a) and torch.equal(new_b, b)


def test_naive_rename_is_wrong_when_all_enabled() -> None:
    """The trap docs/layouts.md warns about: keeping lora_A/lora_B as they are changes the model."""
    heads = HeadLayout(8, 2, 2)
    settings = LoraSettings(2, 4, (True, True, True))
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(heads.rows, 2, dtype=torch.float64)
    old = reorder(qkv_delta(a, b, settings, heads, legacy=True), QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
    naive = qkv_delta(a, b, settings, heads, legacy=False)
    assert (old - naive).abs().max() > 0.1


def test_expand_rank_keeps_the_update() -> None:
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    ea, eb = expand_rank(a, b, 3)
    assert ea.shape == (6, 6) and eb.shape == (9, 6)
    torch.testing.assert_close(eb @ ea, b @ a)
    assert expand_rank(a, b, 1) == (a, b)


# The inverse directions, as references for join_adapters and from_fused_adapter (the library only ever
# goes one way; these show that way keeps B @ A).


def split_adapter(
    lora_a: torch.Tensor, lora_b: torch.Tensor, enable: tuple[bool, bool, bool], heads: HeadLayout
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A current litgpt fused-QKV adapter -> {part: (A, B)} for the enabled parts, each rank r."""
    n = sum(enable)
    r = lora_a.shape[0] // n
    parts = [p for p, on in zip(PARTS, enable) if on]
    b_blocks = torch.split(lora_b, block_sizes(enable, heads), dim=0)
    return {p: (lora_a[c * r:(c + 1) * r], b_blocks[c]) for c, p in enumerate(parts)}


def to_fused_adapter(
    lora_a: torch.Tensor, lora_b: torch.Tensor, enable: tuple[bool, bool, bool], heads: HeadLayout, order: QKVOrder
) -> tuple[torch.Tensor, torch.Tensor]:
    """A current litgpt fused-QKV adapter -> one plain adapter (A, B) on the fused matrix with rows
    in `order`, rank r * n_enabled (every row sees all A blocks; its own block's columns set)."""
    n = sum(enable)
    r = lora_a.shape[0] // n
    rows_b = torch.zeros(heads.rows, n * r, dtype=lora_b.dtype)
    rows = target_rows(enable, heads, legacy=False)
    cols = block_of_rows(enable, heads).unsqueeze(1) * r + torch.arange(r).unsqueeze(0)
    rows_b[rows.unsqueeze(1), cols] = lora_b
    return lora_a, reorder(rows_b, QKVOrder.SEQUENTIAL, order, heads)


@pytest.mark.parametrize("H,G,hs", HEADS)
@pytest.mark.parametrize("enable", ENABLES, ids=lambda e: "".join(n for n, on in zip("qkv", e) if on))
def test_split_join_and_fused_adapters_keep_the_update(H: int, G: int, hs: int, enable) -> None:
    from qkvconv.model.lora import from_fused_adapter, join_adapters

    heads = HeadLayout(H, G, hs)
    r, n_embd = 2, 5
    sizes = [s for s, on in zip((H * hs, G * hs, G * hs), enable) if on]
    a = torch.randn(sum(enable) * r, n_embd, dtype=torch.float64)
    b = torch.randn(sum(sizes), r, dtype=torch.float64)
    settings = LoraSettings(r, r, enable)  # scaling 1
    delta = qkv_delta(a, b, settings, heads, legacy=False)  # (rows, n_embd), sequential
    parts = split_adapter(a, b, enable, heads)
    q, k, v = torch.split(delta, [H * hs, G * hs, G * hs])
    for p, (pa, pb) in parts.items():
        torch.testing.assert_close(pb @ pa, {"q": q, "k": k, "v": v}[p])
    ja, jb, je = join_adapters(parts, heads)
    assert je == enable and torch.equal(ja, a) and torch.equal(jb, b)
    for order in (QKVOrder.SEQUENTIAL, QKVOrder.GROUPED) + ((QKVOrder.PER_HEAD,) if H == G else ()):
        fa, fb = to_fused_adapter(a, b, enable, heads, order)
        assert fa.shape[0] == sum(enable) * r
        torch.testing.assert_close(fb @ fa, reorder(delta, QKVOrder.SEQUENTIAL, order, heads))
        la, lb, le = from_fused_adapter(fa, fb, heads, order)
        back = qkv_delta(la, lb, LoraSettings(fa.shape[0], fa.shape[0], le), heads, legacy=False)
        torch.testing.assert_close(back, delta)


def test_join_pads_different_ranks() -> None:
    from qkvconv.model.lora import join_adapters

    heads = HeadLayout(4, 2, 2)
    parts = {"q": (torch.randn(2, 3), torch.randn(8, 2)), "v": (torch.randn(4, 3), torch.randn(4, 4))}
    a, b, enable = join_adapters(parts, heads)
    assert enable == (True, False, True) and a.shape == (8, 3) and b.shape == (12, 4)
    delta = qkv_delta(a, b, LoraSettings(4, 4, enable), heads, legacy=False)
    torch.testing.assert_close(delta[:8].float(), parts["q"][1] @ parts["q"][0])
    torch.testing.assert_close(delta[12:].float(), parts["v"][1] @ parts["v"][0])
