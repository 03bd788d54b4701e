"""Where the rows of a fused-QKV LoRA adapter land, under legacy and current litgpt; pure arithmetic.

litgpt's LoRAQKVLinear keeps `lora_A` (r * n_enabled, n_embd) and `lora_B` (sum of enabled sizes, r).
Block c of lora_B (q, k, v order, enabled ones only) multiplies rows [c*r, (c+1)*r) of lora_A. Each
row of lora_B then lands on one row of the fused weight:
- current litgpt (sequential): the enabled Q, K, V rows, in order;
- legacy litgpt (grouped) with some projection disabled: the enabled rows scattered to their grouped
  positions (`lora_ind`), which is the same head order, so the same adapter is right after re-ordering;
- legacy litgpt with all of q, k, v enabled: no scatter, row j lands on grouped row j, whatever it is.
`plan_reorder` finds the adapter that produces exactly the same update under current semantics: a
row-gather of lora_B when each row keeps its A block, otherwise an exact rank expansion in which every
block sees all A blocks (rank r * n_enabled, alpha scaled by the same factor so alpha/r is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkvconv.model.layout import HeadLayout, QKVOrder, canonical_index, reorder


@dataclass(frozen=True)
class LoraSettings:
    """The rank and scaling of an adapter and which of q, k, v it covers."""

    r: int
    alpha: float
    enable: tuple[bool, bool, bool]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def n_enabled(self) -> int:
        return sum(self.enable)


def block_sizes(enable: tuple[bool, bool, bool], heads: HeadLayout) -> list[int]:
    """Row counts of the enabled lora_B blocks, in q, k, v order."""
    sizes = (heads.q_rows, heads.kv_rows, heads.kv_rows)
    return [s for s, on in zip(sizes, enable) if on]


def _enabled_canonical_rows(enable: tuple[bool, bool, bool], heads: HeadLayout) -> torch.Tensor:
    """Sequential (canonical) row indices covered by the enabled projections, in q, k, v order."""
    starts = (0, heads.q_rows, heads.q_rows + heads.kv_rows)
    sizes = (heads.q_rows, heads.kv_rows, heads.kv_rows)
    parts = [torch.arange(s, s + n) for s, n, on in zip(starts, sizes, enable) if on]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def target_rows(enable: tuple[bool, bool, bool], heads: HeadLayout, legacy: bool) -> torch.Tensor:
    """For each lora_B row, the fused-weight row (in that version's own order) its update lands on."""
    if not legacy:
        return _enabled_canonical_rows(enable, heads)  # sequential positions == canonical
    canon = canonical_index(QKVOrder.GROUPED, heads)  # grouped position -> canonical
    if all(enable):
        return torch.arange(heads.rows)  # legacy skipped the scatter: row j -> grouped row j
    # Legacy `lora_ind`: grouped positions of Q rows, then K rows, then V rows, each ascending.
    q, kv = heads.q_rows, heads.kv_rows
    kinds = [canon < q, (canon >= q) & (canon < q + kv), canon >= q + kv]
    return torch.cat([torch.nonzero(k).flatten() for k, on in zip(kinds, enable) if on])


def block_of_rows(enable: tuple[bool, bool, bool], heads: HeadLayout) -> torch.Tensor:
    """For each lora_B row, the index of the lora_A block it multiplies."""
    sizes = block_sizes(enable, heads)
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


@dataclass(frozen=True)
class LoraReorder:
    """How to build a current adapter from a legacy one: new B row i comes from old B row `source[i]`,
    which used old A block `old_block[i]`. `expand` says whether rank must grow by n_enabled."""

    source: torch.Tensor
    old_block: torch.Tensor
    new_block: torch.Tensor
    expand: bool
    n_blocks: int

    @property
    def rank_factor(self) -> int:
        return self.n_blocks if self.expand else 1


def plan_reorder(enable: tuple[bool, bool, bool], heads: HeadLayout) -> LoraReorder:
    """Plan the exact legacy -> current conversion of a fused-QKV adapter with these flags."""
    old_targets = target_rows(enable, heads, legacy=True)  # grouped positions
    old_canonical = canonical_index(QKVOrder.GROUPED, heads)[old_targets]
    new_canonical = target_rows(enable, heads, legacy=False)  # sequential == canonical
    # old B row that lands on each canonical row
    owner = torch.full((heads.rows,), -1, dtype=torch.long)
    owner[old_canonical] = torch.arange(old_canonical.numel())
    source = owner[new_canonical]
    if (source < 0).any() or old_canonical.numel() != new_canonical.numel():
        raise ValueError("legacy and current adapters cover different rows; cannot convert exactly")
    blocks = block_of_rows(enable, heads)
    old_block = blocks[source]
    expand = bool((old_block != blocks).any())
    return LoraReorder(source, old_block, blocks, expand, len(block_sizes(enable, heads)))


def apply_reorder(
    lora_a: torch.Tensor, lora_b: torch.Tensor, plan: LoraReorder
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (lora_A, lora_B) for current litgpt, exactly equivalent to the legacy pair."""
    if not plan.expand:
        return lora_a, lora_b.index_select(0, plan.source)
    r = lora_a.shape[0] // plan.n_blocks
    # Every new block multiplies all old A blocks stacked: A_new = [A_old; A_old; ...] per block.
    new_a = lora_a.repeat(plan.n_blocks, 1)  # (n_blocks * n_blocks * r, in)
    new_b = lora_b.new_zeros(lora_b.shape[0], plan.n_blocks * r)  # (rows, n_blocks * r)
    old_rows = lora_b.index_select(0, plan.source)  # (rows, r)
    cols = plan.old_block.unsqueeze(1) * r + torch.arange(r).unsqueeze(0)  # (rows, r)
    new_b.scatter_(1, cols, old_rows)
    return new_a, new_b


def expand_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a plain LoRA pair from rank r to rank factor * r: the same update, exactly.

    Used for the model's other LoRA layers when the QKV adapter's rank had to grow, because litgpt
    has one `lora_r` for the whole model.
    """
    if factor == 1:
        return lora_a, lora_b
    r = lora_a.shape[0]
    new_a = torch.cat([lora_a, lora_a.new_zeros((factor - 1) * r, lora_a.shape[1])])
    new_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], (factor - 1) * r)], dim=1)
    return new_a, new_b


def qkv_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    settings: LoraSettings,
    heads: HeadLayout,
    legacy: bool,
) -> torch.Tensor:
    """The full (rows, n_embd) update of a fused-QKV adapter, rows in that version's own order.

    Computed in float64 so that two adapters that are mathematically equal compare equal.
    """
    r = settings.r
    a = lora_a.to(torch.float64)
    b = lora_b.to(torch.float64)
    blocks = block_of_rows(settings.enable, heads)
    delta_rows = torch.empty(b.shape[0], a.shape[1], dtype=torch.float64)
    for c in range(settings.n_enabled):
        mask = blocks == c
        delta_rows[mask] = b[mask] @ a[c * r:(c + 1) * r]
    delta = torch.zeros(heads.rows, a.shape[1], dtype=torch.float64)
    delta[target_rows(settings.enable, heads, legacy)] = delta_rows
    return delta * settings.scaling


# ---------------------------------------------------------------------------------------------
# Moving a current (sequential) fused-QKV adapter to and from other shapes of adapter: separate
# q/k/v adapters (PEFT on q_proj/k_proj/v_proj) or one adapter on a fused matrix in any row order
# (PEFT on GPT-NeoX/Falcon `query_key_value`). Scaling is the caller's: these keep B @ A exact.

PARTS = ("q", "k", "v")


def pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad an adapter to rank r (same update)."""
    extra = r - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[0]} down to {r}")
    if extra == 0:
        return a, b
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def join_adapters(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]], heads: HeadLayout
) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, bool, bool]]:
    """{part: (A, B)} (any ranks) -> a current litgpt fused-QKV adapter (lora_A, lora_B, enable),
    at the largest rank, the others zero-padded."""
    enable = tuple(p in parts for p in PARTS)
    r = max(a.shape[0] for a, _ in parts.values())
    padded = [pad_rank(*parts[p], r) for p in PARTS if p in parts]
    expected = dict(zip(PARTS, (heads.q_rows, heads.kv_rows, heads.kv_rows)))
    for p, (_, b) in zip([p for p in PARTS if p in parts], padded):
        if b.shape[0] != expected[p]:
            raise ValueError(f"{p} adapter has {b.shape[0]} output rows, expected {expected[p]}")
    return torch.cat([a for a, _ in padded]), torch.cat([b for _, b in padded]), enable  # type: ignore[return-value]


def from_fused_adapter(
    a: torch.Tensor, b: torch.Tensor, heads: HeadLayout, order: QKVOrder
) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, bool, bool]]:
    """One plain adapter on a fused matrix (rows in `order`, rank r) -> a current litgpt fused-QKV
    adapter with q, k, v enabled at rank r: each block gets its own copy of A."""
    return a.repeat(3, 1), reorder(b, order, QKVOrder.SEQUENTIAL, heads), (True, True, True)


def lora_update(qkv: bool, a: torch.Tensor, b: torch.Tensor, settings: LoraSettings, heads: HeadLayout,
                *, legacy: bool = False) -> torch.Tensor:
    """The float64 update a litgpt LoRA pair makes to its weight, rows in current (sequential) order:
    the fused QKV's through `qkv_delta` (legacy semantics re-ordered from grouped rows), any other
    linear's B @ A * scaling. The one definition of a LoRA delta: merging, verifying and the checks use it."""
    if qkv:
        delta = qkv_delta(a, b, settings, heads, legacy=legacy)
        return reorder(delta, QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads) if legacy else delta
    return (b.double() @ a.double()) * settings.scaling
