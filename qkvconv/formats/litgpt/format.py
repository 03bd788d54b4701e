"""litgpt in the registry: `litgpt` (current, sequential `attn.qkv`; reads legacy files too),
`litgpt-legacy` (written only: litgpt <= 0.5.4's grouped `attn.attn`) and `litgpt-lora` (a LoRA run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from qkvconv.formats.base import Format, Source, TorchFileFormat, Transformations
from qkvconv.formats.litgpt.checkpoint import CONFIG, HYPERPARAMETERS, WEIGHTS, migrate_config, open_litgpt
from qkvconv.formats.litgpt.plans import full_upgrade_plan, litgpt_plan
from qkvconv.model.rotary import RopeOrder
from qkvconv.plans.plan import Plan

if TYPE_CHECKING:  # torch comes with these; a conversion that only moves bytes (io/bytepath.py) needs none
    from qkvconv.io.readers import TensorReader
    from qkvconv.plans.transforms import ModelPlan

FUSED_ONLY = ("litgpt's attention is one fused qkv Linear (CausalSelfAttention.qkv), so its checkpoints and LoRA "
              "runs hold fused QKV only; for separate q/k/v projections write --to hf or --to peft (a Llama-family "
              "architecture) or --to meta")


class Litgpt(TorchFileFormat):
    name = "litgpt"
    qkv = "fused"
    qkv_refusal = FUSED_ONLY
    configs = (CONFIG, HYPERPARAMETERS)
    weights_file = WEIGHTS

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        from qkvconv.formats.litgpt.inspect import inspect_litgpt

        return inspect_litgpt(open_litgpt(directory), base)

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        from qkvconv.formats.weights import litgpt_weights

        return litgpt_weights(open_litgpt(source), base=base, base_option=base_option)

    def source(self, directory: Path) -> Source:
        from qkvconv.formats.hf.rules import kept_config, tied
        from qkvconv.io.readers import open_reader
        from qkvconv.plans.transforms import ModelPlan

        ckpt = open_litgpt(directory)
        reader = open_reader(ckpt.weights)  # type: ignore[arg-type]
        cfg = migrate_config(ckpt.config)[0]
        plan = full_upgrade_plan(reader.names(), ckpt.shape.heads)  # legacy attn.attn re-ordered, else copies
        kept = kept_config(directory, cfg)
        return Source(ModelPlan(Plan(plan.recipes), dict(cfg)), reader, kept, tied(kept))

    def direct_plan(self, directory: Path, to: str, bytes_only: bool = False) -> tuple[Plan, TensorReader] | None:
        """litgpt and litgpt-legacy by re-ordering, hf through the family table; a checkpoint in pairs
        rotary order (rope_interleave) goes through the pivot to anything but litgpt (it re-orders)."""
        ckpt = open_litgpt(directory)
        cfg = migrate_config(ckpt.config)[0]
        if to not in ("litgpt", "litgpt-legacy", "hf") or (cfg.get("rope_interleave") and to != "litgpt"):
            return None
        if ckpt.weights is None:
            return None
        if bytes_only:
            from qkvconv.io.bytepath import open_bytes

            reader = open_bytes(ckpt.weights)
            if reader is None:
                return None
        else:
            from qkvconv.io.readers import open_reader

            reader = open_reader(ckpt.weights)
        if to == "hf":
            from qkvconv.formats.hf.plans import plan_litgpt_to_hf
            from qkvconv.formats.hf.rules import kept_config

            return plan_litgpt_to_hf(cfg, reader.names(), kept_config(directory, cfg)), reader
        return litgpt_plan(reader.names(), cfg, legacy=to == "litgpt-legacy"), reader

    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        return Plan(model.plan.recipes, {CONFIG: yaml.safe_dump(model.config, sort_keys=False)}, model.plan.notes)


class LitgptLegacy(Litgpt):
    name = "litgpt-legacy"
    rope = RopeOrder.HALF
    rope_refusal = ("litgpt <= 0.5.4 has no rope_interleave setting and computes half order only; for pairs "
                    "write --to litgpt")

    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        from qkvconv.plans.transforms import compose

        return compose(litgpt_plan(model.outputs(), model.config, legacy=True), model.plan)


class LitgptLora(Format):
    """A litgpt LoRA run: the adapter (`lit_model.pth.lora`) and the base it names."""

    name = "litgpt-lora"
    adapter = True
    qkv = "fused"
    qkv_refusal = FUSED_ONLY
    configs = (CONFIG, HYPERPARAMETERS)

    inspect = Litgpt.inspect
    weights = Litgpt.weights


FORMAT = Litgpt()
LEGACY = LitgptLegacy()
LORA = LitgptLora()
