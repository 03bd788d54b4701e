"""Merge a litgpt LoRA run (legacy or current) into its base: a full current checkpoint, streamed.

The adapter is small and held in memory; the base is read tensor by tensor through the engine, each
LoRA'd weight gets its update (model/lora.py `lora_update`) added in float64 and rounded once, and the
result is read back and compared with base + update in the base's own order before it is published.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.formats.litgpt import (
    CONFIG,
    LORA_WEIGHTS,
    NAMING_ORDER,
    QKV_KEY,
    WEIGHTS,
    StateDictFile,
    check_full_shapes,
    check_lora_shapes,
    current_name,
    load_state_dict_file,
    migrate_config,
    open_litgpt,
)
from qkvconv.io.config_files import write_yaml
from qkvconv.io.engine import execute, output_layout
from qkvconv.io.readers import TensorReader, open_reader
from qkvconv.io.transaction import copy_other_files, new_directory
from qkvconv.io.writers import TorchWriter
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.model.nonfinite import check_all_finite, max_difference, within
from qkvconv.model.lora import LoraSettings, lora_update
from qkvconv.plans.plan import Meta, Plan, Recipe, Reorder, Step
from qkvconv.ops.upgrade import ForwardCheck, UpgradeReport
from qkvconv.progress import progress_for

def merge_lora(
    directory: Path, out: Path, *, base: Path | None, forward_check: ForwardCheck | None,
    allow_nonfinite: bool = False,
) -> UpgradeReport:
    """Merge a (legacy or current) LoRA run into its base weights: a current full checkpoint at `out`,
    streamed tensor by tensor through the engine (the adapter is small; the base never is in memory).
    NaN/inf in the adapter or the base is refused unless `allow_nonfinite`."""
    ckpt = open_litgpt(directory)
    if ckpt.lora_weights is None or ckpt.hyperparameters is None:
        raise QkvconvError(f"--lora-merge needs a LoRA run directory ({LORA_WEIGHTS}); {directory} has none")
    base_dir = ckpt.find_base(base)
    if base_dir is None:
        raise QkvconvError(
            f"cannot find the base checkpoint of {directory} (hyperparameters.yaml checkpoint_dir="
            f"{ckpt.hyperparameters.checkpoint_dir!r}); pass it with --base DIR"
        )
    base_ckpt = open_litgpt(base_dir)
    if base_ckpt.shape != replace(ckpt.shape, name=base_ckpt.shape.name):
        raise QkvconvError(f"the base {base_dir} has a different model config than the LoRA run {directory}")
    adapter = load_state_dict_file(ckpt.lora_weights)
    check_lora_shapes(adapter, ckpt.shape, ckpt.hyperparameters)
    if not allow_nonfinite:
        check_all_finite(adapter.tensors)
    base_sd = load_state_dict_file(base_ckpt.weights)  # type: ignore[arg-type]
    check_full_shapes(base_sd, base_ckpt.shape)
    plan = merge_plan(list(base_sd.tensors), adapter, ckpt.shape.heads, ckpt.hyperparameters.settings)
    report = UpgradeReport(directory, out, changed=True)
    report.actions.append(f"merged {len(adapter.tensors) // 2} LoRA updates into the weights of {base_dir / WEIGHTS}")
    new_config, changes = migrate_config(ckpt.config)
    report.actions += [f"{CONFIG}: {c}" for c in changes]
    with new_directory(out) as tmp:
        copy_other_files(ckpt.directory, tmp, skip={WEIGHTS, LORA_WEIGHTS, CONFIG})
        reader = open_reader(base_sd.path)
        layout = output_layout(plan, reader)
        with TorchWriter(tmp / WEIGHTS, layout, wrapped=base_sd.wrapped) as writer:
            execute(plan, reader, writer, progress_for(sum(m.nbytes for m in layout.values()), f"writing {WEIGHTS}"),
                    allow_nonfinite=allow_nonfinite)
        write_yaml(new_config, tmp / CONFIG)
        report.checks.append(_check_merged(open_reader(base_sd.path), adapter, open_reader(tmp / WEIGHTS),
                                           ckpt.shape.heads, ckpt.hyperparameters.settings))
        if forward_check is not None:
            report.checks.append(forward_check(ckpt, {p.name: p for p in tmp.iterdir()}))
    return report


def _lora_pairs(adapter: StateDictFile) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """weight name (current naming) -> (lora_A, lora_B, is_fused_qkv_with_legacy_semantics)."""
    pairs = {}
    for name, a in adapter.tensors.items():
        if not name.endswith("lora_A"):
            continue
        stem = name[: -len("lora_A")]
        b = adapter.tensors[stem + "lora_B"]
        m = QKV_KEY.match(name)
        legacy = bool(m and m.group(2) == "attn")
        pairs[current_name(stem + "weight")] = (a, b, legacy)
    return pairs


@dataclass(frozen=True, eq=False)
class AddUpdate(Step):
    """Add a LoRA update to a weight, in float64, rounding once to the weight's dtype."""

    target: str
    a: torch.Tensor
    b: torch.Tensor
    legacy: bool
    heads: HeadLayout
    settings: LoraSettings

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        (t,) = tensors
        if t.is_meta:
            return [t]
        delta = lora_update(bool(QKV_KEY.match(self.target)), self.a, self.b, self.settings, self.heads, legacy=self.legacy)
        return [(t.double() + delta).to(t.dtype)]

    def describe(self) -> str:
        return "add the LoRA update"

    def metas(self, inputs: list[Meta]) -> list[Meta]:
        return list(inputs)  # the update has the weight's shape (check_lora_shapes)


def merge_plan(names: list[str], adapter: StateDictFile, heads: HeadLayout, settings: LoraSettings) -> Plan:
    """Recipes for base tensors in current naming and order, each LoRA'd weight with its update added."""
    pairs = _lora_pairs(adapter)
    recipes = []
    for name in names:
        m = QKV_KEY.match(name)
        target = current_name(name, drop_linear=True)
        steps: list[Step] = []
        if m and not m.group(3).startswith("lora") and NAMING_ORDER[m.group(2)] is not QKVOrder.SEQUENTIAL:
            steps.append(Reorder(NAMING_ORDER[m.group(2)], QKVOrder.SEQUENTIAL, heads))
        if target in pairs:
            a, b, legacy = pairs.pop(target)
            steps.append(AddUpdate(target, a, b, legacy, heads, settings))
        recipes.append(Recipe(target, (name,), tuple(steps)))
    if pairs:
        raise QkvconvError(f"LoRA tensors with no base weight to merge into: {sorted(pairs)[:3]}")
    return Plan(recipes)


def _check_merged(
    base: TensorReader, adapter: StateDictFile, written: TensorReader, heads: HeadLayout, settings: LoraSettings
) -> str:
    """Each merged tensor, read back from disk, minus the (re-ordered) base equals the LoRA update to
    float precision. Compared in the base's own order: another path than the one that wrote it."""
    pairs = _lora_pairs(adapter)
    worst = 0.0
    written_names = set(written.names())
    for name in base.names():
        m = QKV_KEY.match(name)
        target = current_name(name, drop_linear=True)
        t = base.read(name)
        if target not in written_names or written.meta(target).dtype != t.dtype:
            raise CheckFailed(f"merged checkpoint lacks {target} or changed its dtype")
        got = written.read(target)
        if m and not m.group(3).startswith("lora"):
            got = reorder(got, QKVOrder.SEQUENTIAL, NAMING_ORDER[m.group(2)], heads)
        expected = t.double()
        if target in pairs:
            a, b, legacy = pairs[target]
            delta = lora_update(bool(QKV_KEY.match(target)), a, b, settings, heads, legacy=legacy)
            if m and NAMING_ORDER[m.group(2)] is QKVOrder.GROUPED:
                delta = reorder(delta, QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads)
            expected = expected + delta
        if t.is_floating_point():
            # rounding the float64 sum to the stored dtype costs at most half an ulp of the result
            bound = torch.finfo(t.dtype).eps * got.double().abs() + torch.finfo(t.dtype).tiny
            ok = within(got, expected, bound)  # an allowed NaN/inf must be where base + update has it
        else:
            ok = torch.equal(got, t)
        if not ok:
            raise CheckFailed(f"merged {target} differs from base + LoRA update beyond rounding")
        worst = max(worst, max_difference(got, expected))
        base.release()
        written.release()
    return f"{WEIGHTS}: every merged tensor equals base + LoRA update (max rounding {worst:.2g})"
