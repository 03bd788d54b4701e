"""The inspect report of a litgpt checkpoint or LoRA run: the QKV naming and the order it implies, with
the evidence, head counts, LoRA settings (and whether the base a LoRA run points at is legacy: current
litgpt computes wrong logits with a legacy base), dtypes and sizes, from tensor metadata alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from qkvconv.formats.base import rope_report
from qkvconv.errors import QkvconvError
from qkvconv.formats.base import file_list
from qkvconv.formats.litgpt.checkpoint import (
    CURRENT_NAMING,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    NAMING_ORDER,
    WEIGHTS,
    LitgptCheckpoint,
    check_full_shapes,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    qkv_naming,
)
from qkvconv.io.transaction import JOURNAL_NAME
from qkvconv.model.lora import plan_reorder


def _order_evidence(naming: str | None, ckpt: LitgptCheckpoint) -> list[str]:
    heads = ckpt.shape.heads
    if naming == LEGACY_NAMING:
        ev = ["tensor names use `attn.attn`, which litgpt <= 0.5.4 wrote in grouped order (per KV group: its Q heads, then K, V)"]
    elif naming == CURRENT_NAMING:
        ev = ["tensor names use `attn.qkv`, which litgpt >= 0.5.5 writes in sequential order (all Q, all K, all V)"]
    else:
        return ["no fused QKV tensors found"]
    if heads.n_query_groups == 1:
        ev.append("n_query_groups = 1: grouped and sequential orders coincide, so the rows are the same either way")
    elif heads.n_query_groups == heads.n_head and naming == LEGACY_NAMING:
        ev.append("n_query_groups = n_head: the grouped order is also per-head (q, k, v of each head)")
    return ev


def _litgpt_family(config: dict[str, Any]) -> str | None:
    """The family (the same names as for HF directories) whose architecture computes this litgpt config."""
    from qkvconv.formats.hf import detect_family, hf_config_from_litgpt

    try:
        family = detect_family(hf_config_from_litgpt(migrate_config(config)[0]))
    except (QkvconvError, ValueError, TypeError, KeyError):  # informative only: a bad config is reported elsewhere
        return None
    return family.name if family is not None else None


def _base_is_legacy(base: Path) -> bool:
    """Whether a LoRA run's base (a litgpt directory; an HF one never is) holds the legacy grouped layout."""
    weights = base / WEIGHTS
    return weights.is_file() and qkv_naming(load_state_dict_file(weights).tensors, weights) == LEGACY_NAMING


def inspect_litgpt(ckpt: LitgptCheckpoint, base: Path | None = None) -> dict[str, Any]:
    """Build the report for a litgpt directory; reads tensor metadata only (files are mmapped).
    `base`: a LoRA run's base, where hyperparameters.yaml does not lead to it."""
    shape, heads = ckpt.shape, ckpt.shape.heads
    namings: set[str] = set()
    dtypes: Counter[str] = Counter()
    parameters = 0
    files = []
    for path in ckpt.weight_files():
        sd = load_state_dict_file(path)
        if path.name == LORA_WEIGHTS:
            assert ckpt.hyperparameters is not None
            check_lora_shapes(sd, shape, ckpt.hyperparameters)
        else:
            check_full_shapes(sd, shape)
        if (n := qkv_naming(sd.tensors, path)) is not None:
            namings.add(n)
        for t in sd.tensors.values():
            dtypes[str(t.dtype).removeprefix("torch.")] += t.numel()
            parameters += t.numel()
    files = file_list(ckpt.directory)
    naming = namings.pop() if len(namings) == 1 else None
    _, config_changes = migrate_config(ckpt.config)
    notes = [f"model_config.yaml needs migrating for current litgpt: {c}" for c in config_changes]
    if naming == LEGACY_NAMING and ckpt.lora_weights is None:
        notes.append(
            "current litgpt re-orders this file on every plain load, but cannot load it as the base of a LoRA "
            "model (`litgpt finetune lora` would silently leave attn.qkv at random init): run `qkvconv upgrade`"
        )
    if (ckpt.directory / JOURNAL_NAME).exists():
        notes.append("an interrupted upgrade is pending: run `qkvconv upgrade` on this directory to finish it")
    lora = None
    if ckpt.hyperparameters is not None:
        h = ckpt.hyperparameters
        s = h.settings
        base = ckpt.find_base(base, hf=True)
        base_legacy = _base_is_legacy(base) if base is not None else None
        lora = {
            "r": s.r, "alpha": s.alpha, "query": s.enable[0], "key": s.enable[1], "value": s.enable[2],
            "projection": h.projection, "mlp": h.mlp, "head": h.head,
            "base": str(base) if base else None, "checkpoint_dir": h.checkpoint_dir, "base_legacy": base_legacy,
        }
        if base_legacy:
            notes.append(f"the base {base} is legacy (attn.attn): current litgpt computes wrong logits for this run "
                         f"until it is upgraded: run `qkvconv upgrade {base}`")
        elif base is None:
            notes.append(f"the base of this LoRA run (checkpoint_dir={h.checkpoint_dir!r}) was not found, so its layout "
                         "is unknown: pass --base DIR")
        if naming == LEGACY_NAMING and any(s.enable):
            plan = plan_reorder(s.enable, heads)
            if plan.expand:
                notes.append(
                    f"legacy LoRA on all of q, k, v: rank {s.r} cannot express it in the current layout; "
                    f"`upgrade` writes an exact rank-{s.r * plan.rank_factor} adapter (or merge with --lora-merge)"
                )
    report = {
        "source": str(ckpt.directory),
        "format": ckpt.format,
        "family": _litgpt_family(ckpt.config),
        "model": shape.name,
        "legacy": naming == LEGACY_NAMING or bool(config_changes),
        "naming": naming,
        "qkv_order": NAMING_ORDER[naming.split(".")[1]].value if naming else None,
        "evidence": _order_evidence(naming, ckpt),
        "n_layer": shape.n_layer,
        "n_head": heads.n_head,
        "n_query_groups": heads.n_query_groups,
        "head_size": heads.head_size,
        "n_embd": shape.n_embd,
        "attention": heads.attention,
        "rope": rope_report(ckpt.config, "model_config.yaml rope_interleave (true: pairs; litgpt's default false: "
                                         "half) and rotary_percentage"),
        "lora": lora,
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()},
        "parameters": parameters,
        "files": files,
        "notes": notes,
    }
    return report
