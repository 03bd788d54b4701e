"""litgpt -> litgpt plans: legacy grouped `attn.attn` <-> current sequential `attn.qkv`, and the
model_config.yaml each version accepts. Used by upgrade (legacy -> current) and by convert
(`--to litgpt`, `--to litgpt-legacy`, and a legacy source read into the pivot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qkvconv.errors import QkvconvError
from qkvconv.formats.litgpt.checkpoint import CONFIG, QKV_KEY, ModelShape, current_name, migrate_config
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.plans.plan import Plan, Recipe, Reorder, copy

# Fields litgpt 0.5.4's Config accepts (its dataclass fields): a legacy model_config.yaml keeps only these.
LITGPT_054_FIELDS = frozenset({
    "attention_logit_softcapping", "attention_scores_scalar", "attn_bias", "bias", "block_size",
    "final_logit_softcapping", "gelu_approximate", "head_size", "hf_config", "intermediate_size", "lm_head_bias",
    "mlp_class_name", "n_embd", "n_expert", "n_expert_per_token", "n_head", "n_layer", "n_query_groups", "name",
    "norm_class_name", "norm_eps", "padded_vocab_size", "padding_multiple", "parallel_residual",
    "post_attention_norm", "post_mlp_norm", "rope_adjustments", "rope_base", "rope_condense_ratio",
    "rotary_percentage", "scale_embeddings", "shared_attention_norm", "sliding_window_layer_placing",
    "sliding_window_size", "vocab_size",
})


def full_upgrade_plan(names: list[str], heads: HeadLayout) -> Plan:
    """Recipes for a legacy full state dict: re-order the fused QKV rows, copy everything else."""
    to_sequential = Reorder(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, heads)
    recipes = []
    for name in names:
        m = QKV_KEY.match(name)
        if m and m.group(2) == "attn" and not m.group(3).startswith("lora"):
            recipes.append(Recipe(current_name(name), (name,), (to_sequential,)))
        else:
            recipes.append(copy(name))
    return Plan(recipes)



def _legacy_litgpt_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A model_config.yaml litgpt <= 0.5.4 accepts: its own fields only, the window in its old form."""
    out = {k: v for k, v in cfg.items() if k in LITGPT_054_FIELDS}
    indices = cfg.get("sliding_window_indices")
    if cfg.get("sliding_window_size") is not None and indices is not None:
        n = len(indices)
        if all(indices):
            out["sliding_window_layer_placing"] = "all"
        elif indices == [1 if i % 2 == 0 else 0 for i in range(n)]:
            out["sliding_window_layer_placing"] = "interleaved"
        else:
            raise QkvconvError("litgpt <= 0.5.4 can express a sliding window on all or every other layer only")
    out.setdefault("sliding_window_layer_placing", None)
    return out


def litgpt_plan(names: list[str], cfg: dict[str, Any], legacy: bool) -> Plan:
    """litgpt -> litgpt in the requested order (current sequential `attn.qkv` or legacy grouped `attn.attn`)."""
    heads = ModelShape.from_config(cfg, Path(CONFIG)).heads
    if not legacy:
        plan = full_upgrade_plan(names, heads)
        plan.texts[CONFIG] = yaml.safe_dump(migrate_config(cfg)[0], sort_keys=False)
        return plan
    recipes = []
    for name in names:
        m = QKV_KEY.match(name)
        if m and m.group(2) == "qkv" and not m.group(3).startswith("lora"):
            out = f"transformer.h.{m.group(1)}.attn.attn.{m.group(3)}"
            recipes.append(Recipe(out, (name,), (Reorder(QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads),)))
        else:
            recipes.append(copy(name))
    return Plan(recipes, {CONFIG: yaml.safe_dump(_legacy_litgpt_config(migrate_config(cfg)[0]), sort_keys=False)})
