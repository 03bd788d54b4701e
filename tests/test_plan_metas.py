"""The engine plans every output's shape and dtype from the steps' own shape rules (Step.metas), not
by running them on meta tensors (whose first use costs about a second and 70 MB per process). Each
rule must say exactly what `apply` makes, and refuse what `apply` refuses.

Oracle: the same recipes run on meta tensors, for the plans of every family in both directions, the
legacy upgrade, a LoRA merge and every transformation (rotary order, K/V heads, folding, QKV fusion).
"""

from __future__ import annotations

import pytest
import torch

from hf_models import BY_ID  # noqa: F401
from qkvconv.formats.hf import steps as hf_format
from qkvconv.ops import merge
from qkvconv.plans import plan as plan_module, transforms
from qkvconv.ops.convert import Transformations, transformed_plan
from qkvconv.io.engine import output_layout
from qkvconv.errors import QkvconvError
from qkvconv.formats.hf import ConcatRows, TakeRows, Tied
from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder
from qkvconv.plans.plan import Fuse, Plan, Recipe, Reorder, Step, TakePart
from qkvconv.io.readers import open_reader
from qkvconv.model.rotary import RopeOrder
from qkvconv.plans.transforms import FoldBias, RowIndex, ScaleColumns


def by_meta_tensors(recipe: Recipe, metas: list) -> tuple[tuple[int, ...], torch.dtype]:
    out = recipe.apply([torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in metas])
    return tuple(out.shape), out.dtype


def test_every_step_has_a_shape_rule():
    steps = [cls for module in (plan_module, hf_format, transforms, merge) for cls in vars(module).values()
             if isinstance(cls, type) and issubclass(cls, Step) and cls is not Step]
    assert len(steps) >= 14
    assert [cls.__name__ for cls in steps if cls.metas is Step.metas] == []


CHANGES = {
    "plain": Transformations(),
    "pairs": Transformations(rope=RopeOrder.PAIRS),
    "kv4-fold": Transformations(kv_heads=4, fold_norms=True),
}


@pytest.mark.parametrize("case_id", list(BY_ID))
@pytest.mark.parametrize("change", list(CHANGES))
def test_shape_rules_match_meta_tensors(case_id, change, built, tmp_path):  # noqa: F811
    b = built(case_id)
    if change == "kv4-fold" and case_id == "falcon-7b-mqa":
        change = "pairs"  # 4 query heads over 1 K/V head: expanded in the other cases already
    plans = []
    for to in ("litgpt", "litgpt-legacy", "hf"):
        try:
            plans.append(transformed_plan(b.directory, "hf", to, CHANGES[change])[:2])
        except QkvconvError:
            continue  # a target that cannot hold this change (pairs rotary in HF): refused before planning
    assert plans
    for plan, reader in plans:
        for recipe in plan.recipes:
            metas = [(reader.meta(i).shape, reader.meta(i).dtype) for i in recipe.inputs]
            assert recipe.meta(metas) == by_meta_tensors(recipe, metas), recipe.describe()


def test_upgrade_and_merge_plans(legacy):
    """The legacy re-order and a LoRA merge (AddUpdate) through output_layout, against meta tensors."""
    from qkvconv.formats.litgpt import load_state_dict_file, open_litgpt
    from qkvconv.formats.litgpt.plans import full_upgrade_plan
    from qkvconv.ops.merge import merge_plan

    run = open_litgpt(legacy("lora_qkv_gqa"))
    base = open_litgpt(run.find_base(None))
    reader = open_reader(base.weights)
    heads = base.shape.heads
    adapter = load_state_dict_file(run.lora_weights)
    for plan in (full_upgrade_plan(reader.names(), heads),
                 merge_plan(reader.names(), adapter, heads, run.hyperparameters.settings)):
        layout = output_layout(plan, reader)
        for recipe in plan.recipes:
            metas = [(reader.meta(i).shape, reader.meta(i).dtype) for i in recipe.inputs]
            assert (layout[recipe.output].shape, layout[recipe.output].dtype) == by_meta_tensors(recipe, metas)


H = HeadLayout(4, 2, 3)  # 24 rows, odd head size


@pytest.mark.parametrize("recipe, metas", [
    (Recipe("x", ("a",), (Reorder(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, H),)), [((23, 5), torch.float32)]),
    (Recipe("x", ("a",), (Reorder(QKVOrder.PER_HEAD, QKVOrder.SEQUENTIAL, H),)), [((24, 5), torch.float32)]),
    (Recipe("x", ("q", "k", "v"), (Fuse(QKVOrder.GROUPED, H),)),
     [((12, 5), torch.float32), ((7, 5), torch.float32), ((6, 5), torch.float32)]),
    (Recipe("x", ("a",), (TakePart("k", QKVOrder.SEQUENTIAL, H),)), [((25,), torch.float32)]),
    (Recipe("x", ("a",), (TakeRows(1, 2),)), [((7, 3), torch.float32)]),
    (Recipe("x", ("a", "b"), (ConcatRows(),)), [((2, 3), torch.float32), ((2, 4), torch.float32)]),
    (Recipe("x", ("a",), (RowIndex(torch.tensor([0, 5]), "pick"),)), [((5, 2), torch.float32)]),
    (Recipe("x", ("w", "g"), (ScaleColumns(),)), [((3, 4), torch.float32), ((3,), torch.float32)]),
    (Recipe("x", ("w", "b"), (FoldBias(),)), [((3, 4), torch.float32), ((3,), torch.float32)]),
    (Recipe("x", ("a", "b"), (Tied(),)), [((3, 4), torch.float32), ((4, 4), torch.float32)]),
])
def test_shape_rules_refuse_what_apply_refuses(recipe, metas):
    with pytest.raises((ValueError, RuntimeError, QkvconvError)):  # on real (small) tensors
        recipe.apply([torch.randn(shape, dtype=dtype) for shape, dtype in metas])
    with pytest.raises((ValueError, QkvconvError)):
        recipe.meta(metas)


def test_dtypes_promote_and_cast_as_apply_does():
    mixed = [((2, 3), torch.bfloat16), ((2, 3), torch.float32)]
    cat = Recipe("x", ("a", "b"), (ConcatRows(),))
    assert cat.meta(mixed) == by_meta_tensors(cat, mixed) == ((4, 3), torch.float32)
    cast = Recipe("x", ("a",), (), dtype=torch.float16)
    assert cast.meta([((2,), torch.float32)]) == ((2,), torch.float16)
    assert isinstance(Plan().recipes, list)
    with pytest.raises(LayoutError):
        Recipe("x", ("a",), (Reorder(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, H),)).meta([((23, 5), torch.float32)])
