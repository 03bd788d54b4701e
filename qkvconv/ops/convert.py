"""`qkvconv convert`: between litgpt (current and legacy order), Hugging Face, Meta's original Llama
format and PEFT, optionally transforming the weights exactly on the way (rotary order, key/value heads,
norm folding, QKV fusion).

Full models go through the streaming engine: a plan (hf_format.py, or a plain re-order for litgpt
<-> litgpt-legacy) is built from the source's tensor names, then each tensor is read once,
transformed and written into a new directory beside `out`, which appears at `out` in one rename
after the result has been checked with a forward pass. With a transformation (or Meta's format on
either side) the plan is source -> litgpt names, rewritten by transforms.py, composed with
litgpt names -> target: still one plan, each source tensor read once. --qkv chooses the target's
architecture (hf_config_for), since every format fixes the fusion per architecture. LoRA adapters
(small) convert in memory (peft_format.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from qkvconv.formats import meta as meta_format
from qkvconv.io.engine import execute, output_layout
from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf import (
    describe_layout,
    detect_family,
    hf_config_from_litgpt,
    litgpt_config_from_hf,
    plan_hf_to_litgpt,
    plan_litgpt_to_hf,
)
from qkvconv.model.layout import QKVOrder
from qkvconv.formats.litgpt import (
    CONFIG,
    HYPERPARAMETERS,
    LORA_WEIGHTS,
    QKV_KEY,
    WEIGHTS,
    LitgptCheckpoint,
    migrate_config,
    open_litgpt,
)
from qkvconv.plans.plan import Plan, Recipe, Reorder, copy
from qkvconv.progress import layers, progress_for, status
from qkvconv.io.readers import TensorMeta, TensorReader, open_reader
from qkvconv.model.rotary import RopeOrder
from qkvconv.io.sources import check_inside
from qkvconv.io.transaction import is_temporary
from qkvconv.plans.transforms import ModelPlan, compose, expand_kv_heads, fold_norms, set_rope
from qkvconv.io.config_files import read_json, read_yaml
from qkvconv.io.transaction import copy_new, new_directory
from qkvconv.formats.litgpt.plans import full_upgrade_plan, litgpt_plan
from qkvconv.ops.merge import merge_lora
from qkvconv.io.writers import SafetensorsWriter, TorchWriter, plan_shards

HF_CONFIG = "config.json"
PEFT_CONFIG = "adapter_config.json"
TARGETS = ("litgpt", "litgpt-legacy", "hf", "meta", "peft", "litgpt-lora")
# Configs of the other formats: a conversion writes its own, never copies one that describes the source
FORMAT_CONFIGS = (CONFIG, HYPERPARAMETERS, HF_CONFIG, meta_format.PARAMS)
# Files that hold weights (rewritten by a conversion, never copied across formats)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".lora", ".safetensors.index.json", ".bin.index.json",
                   ".chk")  # Meta's checklist.chk: checksums of its .pth files
def detect_format(directory: Path) -> str:
    """litgpt | litgpt-lora | peft | hf | meta, from the files a directory holds."""
    if (directory / LORA_WEIGHTS).is_file():
        return "litgpt-lora"
    if (directory / WEIGHTS).is_file():
        return "litgpt"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    if (directory / HF_CONFIG).is_file():
        return "hf"
    if directory.is_dir() and meta_format.is_meta_dir(directory):
        return "meta"
    raise QkvconvError(
        f"{directory} holds no checkpoint qkvconv knows: expected {WEIGHTS} or {LORA_WEIGHTS} (litgpt), "
        f"{PEFT_CONFIG} (PEFT), {HF_CONFIG} with weights (Hugging Face) or {meta_format.PARAMS} with "
        f"{meta_format.WEIGHTS} (Meta)"
    )


@dataclass
class ConvertReport:
    source: Path
    destination: Path | None
    source_format: str
    target_format: str
    actions: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)  # --dry-run: one entry per output tensor

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source), "destination": str(self.destination) if self.destination else None,
            "source_format": self.source_format, "target_format": self.target_format,
            "actions": self.actions, "checks": self.checks, "plan": self.plan,
        }


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Tokenizer, generation config and the like travel with the weights; other weights do not."""
    for item in src.iterdir():
        if item.name in skip or is_temporary(item) or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        check_inside(item, src)
        if item.is_file():
            copy_new(item, dst / item.name)


def _dry_run_lines(plan: Plan, layout: dict[str, TensorMeta], shards: dict[str, list[str]]) -> list[dict[str, Any]]:
    shard_of = {name: f for f, names in shards.items() for name in names}
    return [
        {
            "output": r.output, "inputs": list(r.inputs), "steps": r.describe().split("(", 1)[1].rstrip(")"),
            "shape": list(layout[r.output].shape), "dtype": str(layout[r.output].dtype).removeprefix("torch."),
            "bytes": layout[r.output].nbytes, "file": shard_of[r.output],
        }
        for r in plan.recipes
    ]


def _source_plan(directory: Path, src_format: str, to: str) -> tuple[Plan, TensorReader, str]:
    """The plan for a full model, its reader, and the litgpt/HF kind of the output."""
    if src_format == "hf":
        config_json = read_json(directory / HF_CONFIG)
        reader = open_reader(directory)
        if to in ("litgpt", "litgpt-legacy"):
            return plan_hf_to_litgpt(config_json, reader.names(), legacy=to == "litgpt-legacy"), reader, "litgpt"
        if to == "hf":  # re-shard (and check) as it is; config.json travels with the other files
            plan_hf_to_litgpt(config_json, reader.names())  # refuses what the family table can't account for
            return Plan([copy(n) for n in reader.names()]), reader, "hf"
    elif src_format == "litgpt":
        ckpt = open_litgpt(directory)
        reader = open_reader(ckpt.weights)  # type: ignore[arg-type]
        cfg = migrate_config(ckpt.config)[0]
        if to in ("litgpt", "litgpt-legacy"):
            return litgpt_plan(reader.names(), cfg, legacy=to == "litgpt-legacy"), reader, "litgpt"
        if to == "hf":
            return plan_litgpt_to_hf(cfg, reader.names(), _hf_config_for_litgpt(directory, cfg)), reader, "hf"
    raise QkvconvError(f"cannot convert {src_format} to {to}")


# ---------------------------------------------------------------------------------------------
# transformations: source -> litgpt names (ModelPlan) -> transforms.py rewrites -> target, one plan


@dataclass(frozen=True)
class Transformations:
    """What `convert` changes on the way, besides the format (None / False: nothing)."""

    rope: RopeOrder | None = None  # rotary order of the output
    kv_heads: int | None = None  # key/value heads of the output
    fold_norms: bool = False
    qkv: str | None = None  # "fused" | "split": the output's QKV projection

    def any(self) -> bool:
        return self.rope is not None or self.kv_heads is not None or self.fold_norms or self.qkv is not None

    def of_weights(self) -> bool:
        """Changes only a full model can take (an adapter takes --qkv alone)."""
        return self.rope is not None or self.kv_heads is not None or self.fold_norms


# The rotary order each format can hold (litgpt: both, through rope_interleave)
FORCED_ROPE = {"hf": RopeOrder.HALF, "litgpt-legacy": RopeOrder.HALF, "meta": RopeOrder.PAIRS}
ROPE_REFUSALS = {
    "hf": "transformers' models of the families qkvconv maps apply rotary in half order only (rotate_half), so "
          "--to hf writes half; for pairs write --to litgpt (rope_interleave: true) or --to meta",
    "litgpt-legacy": "litgpt <= 0.5.4 has no rope_interleave setting and computes half order only; for pairs "
                     "write --to litgpt",
    "meta": "Meta's Llama code rotates pairs of dims (2i, 2i + 1) only; for half write --to litgpt or --to hf",
}


# The QKV fusion a format holds, where it holds one only (hf and peft: the architecture decides)
HELD_QKV = {"litgpt": "fused", "litgpt-legacy": "fused", "litgpt-lora": "fused", "meta": "split"}
QKV_REFUSALS = {
    "fused": "litgpt's attention is one fused qkv Linear (CausalSelfAttention.qkv), so its checkpoints and LoRA "
             "runs hold fused QKV only; for separate q/k/v projections write --to hf or --to peft (a Llama-family "
             "architecture) or --to meta",
    "split": "Meta's Llama code has separate wq/wk/wv projections only; for one fused QKV matrix write --to litgpt, "
             "or --to hf / --to peft with --qkv fused (Phi-3's qkv_proj for Llama-family models)",
}
# config.json keys that belong to the tokenizer or the file, not the architecture: kept across a change
# of architecture (--qkv)
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")


def check_qkv_target(qkv: str | None, to: str) -> None:
    """Refuse --qkv with a target format that cannot hold that fusion, saying where it can go."""
    held = HELD_QKV.get(to)
    if qkv is not None and held is not None and held != qkv:
        raise QkvconvError(f"--qkv {qkv} with --to {to}: {QKV_REFUSALS[held]}")


def qkv_note(config_json: dict[str, Any], source_json: dict[str, Any] | None, qkv: str) -> str:
    """What --qkv made of the output: its architecture and where q, k and v live (and what else fused)."""
    family = detect_family(config_json)
    assert family is not None
    layout = describe_layout(config_json)
    assert layout is not None
    source = detect_family(source_json) if source_json else None
    other = source is not None and source.architecture != family.architecture
    was = f" (the source is {source.architecture}; both compute this model)" if other else ""  # type: ignore[union-attr]
    also = "".join(f"; {', '.join(parts)} rows are fused into {module} as {family.architecture} requires"
                   for module, parts in family.fused_rows.items())
    return f"--qkv {qkv}: written as {layout['evidence']}{was}{also}"


def _tied(config_json: dict[str, Any] | None) -> bool:
    """Does this config.json tie the output head to the token embedding (its family's default included)?"""
    family = detect_family(config_json) if config_json else None
    if family is None:
        return False
    rule = family.config.tie_embeddings
    for key in rule.keys:
        if config_json.get(key) is not None:  # type: ignore[union-attr]
            return bool(config_json[key])  # type: ignore[index]
    return bool(rule.default)


def _source_model(directory: Path, src_format: str) -> tuple[ModelPlan, TensorReader, dict[str, Any] | None, bool]:
    """The source under litgpt names, its reader, the config.json that describes it (if any) and
    whether its head is tied to the embedding."""
    if src_format == "hf":
        config_json = read_json(directory / HF_CONFIG)
        reader = open_reader(directory)
        plan = plan_hf_to_litgpt(config_json, reader.names())
        return ModelPlan(Plan(plan.recipes, notes=plan.notes), litgpt_config_from_hf(config_json)), reader, \
            config_json, _tied(config_json)
    if src_format == "litgpt":
        ckpt = open_litgpt(directory)
        reader = open_reader(ckpt.weights)  # type: ignore[arg-type]
        cfg = migrate_config(ckpt.config)[0]
        plan = full_upgrade_plan(reader.names(), ckpt.shape.heads)  # legacy attn.attn re-ordered, else copies
        kept = _hf_config_for_litgpt(directory, cfg)
        return ModelPlan(Plan(plan.recipes), dict(cfg)), reader, kept, _tied(kept)
    if src_format == "meta":
        params = read_json(directory / meta_format.PARAMS)
        reader = open_reader(meta_format.weights_file(directory))
        names = reader.names()
        shapes = {n: reader.meta(n).shape for n in names}
        plan = meta_format.plan_meta_to_litgpt(params, names, shapes)
        model = ModelPlan(plan, meta_format.litgpt_config_from_params(params, shapes))
        model.notes.append(f"{meta_format.PARAMS} gives no context length: block_size (HF max_position_embeddings) "
                           f"set to {model.config['block_size']}; it changes no weight")
        return model, reader, None, "output.weight" not in names
    raise QkvconvError(f"cannot transform {src_format} checkpoints")


def _same_function(cfg: dict[str, Any], config_json: dict[str, Any]) -> bool:
    from dataclasses import asdict

    from qkvconv.model.architecture import Architecture

    try:
        a = asdict(Architecture.from_litgpt_config(cfg))
        b = asdict(Architecture.from_litgpt_config(litgpt_config_from_hf(config_json)))
    except QkvconvError:
        return False
    a.pop("name"), b.pop("name")
    return a == b


def hf_config_for(cfg: dict[str, Any], source_json: dict[str, Any] | None, qkv: str | None = None) -> dict[str, Any]:
    """The config.json of a transformed model: the source's own (token ids, tying, dtype and the rest
    kept) with the model's numbers and flags rewritten for its architecture; a derived one when there is
    no source config.json. `qkv` ("fused" | "split") asks for an architecture with that QKV fusion: when
    the source's has the other, the first that computes the model (Llama <-> Phi-3), keeping the
    source's token ids, dtype and tying. UnsupportedFamily when no architecture can express the model."""
    family = detect_family(source_json) if source_json else None
    if family is None:
        return hf_config_from_litgpt(cfg, qkv=qkv)
    assert source_json is not None
    if qkv is not None and family.fusion != qkv:  # another architecture: only what is not its own carries
        derived = hf_config_from_litgpt(cfg, qkv=qkv)
        merged = dict(derived)
    else:
        derived = hf_config_from_litgpt(cfg, family.architecture)
        merged = {**source_json, **derived}
    merged.update({k: source_json[k] for k in CARRIED_KEYS if k in source_json})
    target = detect_family(derived)
    assert target is not None
    merged[target.config.tie_embeddings.keys[0]] = _tied(source_json)
    return merged if _same_function(cfg, merged) else derived


def _expressible(to: str, source_json: dict[str, Any] | None) -> Any:
    """For fold_norms: None when format `to` can hold a model with this litgpt config, else why not."""

    def check(cfg: dict[str, Any]) -> str | None:
        try:
            if to == "hf":
                hf_config_for(cfg, source_json)
            elif to == "meta":
                meta_format.params_from_litgpt({**cfg, "rope_interleave": True})
        except UnsupportedFamily as e:
            return e.reason
        except QkvconvError as e:
            return str(e)
        return None

    return check


def transformed_plan(
    directory: Path, src_format: str, to: str, changes: Transformations
) -> tuple[Plan, TensorReader, str, list[str]]:
    """Source -> litgpt names -> fold norms, expand K/V heads, set the rotary order -> `to` (with the
    QKV fusion asked for), as one plan. Returns the plan, the reader, the output kind (litgpt | hf |
    meta) and what was done."""
    forced = FORCED_ROPE.get(to)
    if changes.rope is not None and forced is not None and changes.rope is not forced:
        raise QkvconvError(f"--rope {changes.rope.value} with --to {to}: {ROPE_REFUSALS[to]}")
    check_qkv_target(changes.qkv, to)
    model, reader, source_json, tied = _source_model(directory, src_format)
    source_rope = model.rope_order
    if changes.fold_norms:
        model = fold_norms(model, tied=tied, expressible=_expressible(to, source_json))
    if changes.kv_heads is not None:
        model = expand_kv_heads(model, changes.kv_heads)
    order = changes.rope or forced or source_rope
    model = set_rope(model, order)
    if changes.rope is None and order is not source_rope:
        model.notes.append(f"--to {to} holds rotary in {order.value} order only, so the rows were re-ordered")
    outputs = model.outputs()
    if to == "litgpt":
        plan = Plan(model.plan.recipes, {CONFIG: yaml.safe_dump(model.config, sort_keys=False)}, model.plan.notes)
        kind = "litgpt"
    elif to == "litgpt-legacy":
        plan, kind = compose(litgpt_plan(outputs, model.config, legacy=True), model.plan), "litgpt"
    elif to == "hf":
        kept = source_json if changes.any() or src_format == "hf" else None
        config_json = hf_config_for(model.config, kept, changes.qkv)
        plan, kind = compose(plan_litgpt_to_hf(model.config, outputs, config_json), model.plan), "hf"
        if changes.qkv is not None:
            model.notes.append(qkv_note(config_json, source_json, changes.qkv))
    elif to == "meta":
        plan, kind = compose(meta_format.plan_litgpt_to_meta(model.config, outputs), model.plan), "meta"
    else:
        raise QkvconvError(f"cannot convert {src_format} to {to}")
    return plan, reader, kind, model.notes


def _hf_config_for_litgpt(directory: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A config.json kept beside a litgpt checkpoint (litgpt downloads keep the original) when it
    describes this model; otherwise None, and one is derived from model_config.yaml."""
    path = directory / HF_CONFIG
    if not path.is_file():
        return None
    config_json = read_json(path)
    return config_json if _same_function(cfg, config_json) else None


def convert(
    source: Path,
    to: str,
    out: Path | None,
    *,
    base: Path | None = None,
    max_shard_size: int | None = 5 * 10**9,
    dry_run: bool = False,
    forward_check: bool = True,
    device: str = "cpu",
    changes: Transformations | None = None,
    merge: bool = False,
    allow_nonfinite: bool = False,
) -> ConvertReport:
    """Convert `source` into format `to` at `out` (a new directory), with `changes` made on the way.
    `merge`: a litgpt LoRA run becomes a full litgpt checkpoint with the update merged into its base."""
    if to not in TARGETS:
        raise QkvconvError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    changes = changes or Transformations()
    directory = source.parent if source.is_file() else source
    src_format = detect_format(directory)
    report = ConvertReport(directory, out, src_format, to)
    if merge:
        if src_format != "litgpt-lora" or to != "litgpt" or changes.any() or out is None:
            raise QkvconvError("--merge turns a litgpt LoRA run into a full litgpt checkpoint: --to litgpt --out DIR "
                               "(convert the merged result onwards in a second step)")
        from qkvconv.ops.verify import upgrade_check

        merged = merge_lora(directory, out, base=base, forward_check=upgrade_check(device) if forward_check else None,
                            allow_nonfinite=allow_nonfinite)
        report.actions += merged.actions
        report.checks += merged.checks
        return report
    if src_format in ("litgpt-lora", "peft") or to in ("peft", "litgpt-lora"):
        if changes.of_weights():
            raise QkvconvError(
                "--rope, --kv-heads and --fold-norms transform full models, not LoRA adapters: transform the base "
                "model, or merge the adapter first (`--to litgpt --merge`)"
            )
        return _convert_adapter(directory, src_format, to, out, base, report, dry_run, changes.qkv,
                                allow_nonfinite=allow_nonfinite)
    if out is None and not dry_run:
        raise QkvconvError("convert writes a new directory: give it with --out DIR")
    # litgpt can hold pairs rotary (rope_interleave); a target that holds half only must re-order it
    pairs_source = src_format == "litgpt" and bool(open_litgpt(directory).config.get("rope_interleave"))
    transformed = changes.any() or "meta" in (src_format, to) or (pairs_source and to != "litgpt")
    notes: list[str] = []
    if transformed:
        plan, reader, kind, notes = transformed_plan(directory, src_format, to, changes)
    else:
        plan, reader, kind = _source_plan(directory, src_format, to)
    layout = output_layout(plan, reader)
    weights_file = meta_format.WEIGHTS if kind == "meta" else WEIGHTS
    shards = plan_shards(layout, max_shard_size) if kind == "hf" else {weights_file: list(layout)}
    if dry_run:
        report.plan = _dry_run_lines(plan, layout, shards)
        report.actions.append(
            f"would write {len(layout)} tensors ({sum(m.nbytes for m in layout.values()):,} bytes) in "
            f"{len(shards)} file(s), plus {', '.join(plan.texts) or 'no config'}"
        )
        report.actions += plan.notes + notes
        return report
    assert out is not None
    with new_directory(out) as tmp:
        skip = set(plan.texts) | ({*FORMAT_CONFIGS} if transformed else {CONFIG, HYPERPARAMETERS})
        _copy_other_files(directory, tmp, skip=skip)
        total = sum(m.nbytes for m in layout.values())
        progress = progress_for(total, f"writing {out.name}")
        if kind == "hf":
            with SafetensorsWriter(tmp, layout, max_shard_size=max_shard_size) as writer:
                execute(plan, reader, writer, progress, allow_nonfinite=allow_nonfinite)
        else:
            with TorchWriter(tmp / weights_file, layout) as writer:
                execute(plan, reader, writer, progress, allow_nonfinite=allow_nonfinite)
        for name, text in plan.texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        report.actions.append(f"wrote {len(layout)} tensors ({total:,} bytes) in {len(shards)} file(s)")
        report.actions += plan.notes + notes
        if forward_check:
            report.checks.append(_forward_check(directory, tmp, device, rounds=changes.fold_norms))
    return report


def convert_folding_norms(source: Path, to: str | None, out: Path | None, **options: Any) -> ConvertReport:
    """`qkvconv fold-norms`: a conversion with every norm folded into the linears it feeds, into the
    source's own format unless `to` names another (full models only: an adapter is refused)."""
    directory = source.parent if source.is_file() else source
    target = to or (detect_format(directory) if directory.is_dir() else "litgpt")
    return convert(source, target, out, changes=Transformations(fold_norms=True), **options)


def _forward_check(reference: Path, candidate: Path, device: str, *, rounds: bool = False) -> str:
    """The converted model must compute what the source computes (verify.py); refuses otherwise.

    `rounds`: the conversion rounds products to the stored dtype (norm folding), so a half-precision
    checkpoint is held to that dtype's tolerance even where the pass computes in float32.
    """
    from qkvconv.ops import verify as verifying
    from qkvconv.errors import UnsupportedFamily
    from qkvconv.formats.weights import open_weights

    try:
        with status("checking: opening both sides"):
            ref, cand = open_weights(reference), open_weights(candidate)
        atol = rtol = None
        stored = cand.dtype()
        if rounds and stored in (torch.bfloat16, torch.float16):
            atol, rtol = verifying.DEFAULT_TOLERANCE[stored]
        report = verifying.verify(ref, cand, device=device, atol=atol, rtol=rtol, progress=layers("checking"))
    except UnsupportedFamily as e:
        return f"forward-pass check skipped: {e}"
    if not report.passed:
        raise verifying.mismatch(report, "the converted checkpoint", "nothing was written")
    if all(s.max_abs_diff == 0 for s in report.stages):
        how = "bitwise equal"
    else:
        worst = max(s.max_abs_diff / s.scale if s.scale else s.max_abs_diff for s in report.stages)
        how = (f"max logit difference {report.logits_max_abs_diff:.2g}, largest stage difference {worst:.2g} of its "
               f"scale (tolerance atol {report.atol:g} + rtol {report.rtol:g} x scale)")
    nonfinite = f"; {report.nonfinite_summary}" if report.nonfinite_summary else ""
    return f"forward pass on {report.device} ({report.dtype}): every layer and the logits agree, {how}{nonfinite}"


def _convert_adapter(
    directory: Path, src_format: str, to: str, out: Path | None, base: Path | None, report: ConvertReport,
    dry_run: bool, qkv: str | None = None, *, allow_nonfinite: bool = False,
) -> ConvertReport:
    """litgpt-lora <-> peft, and peft -> peft with another QKV fusion (--qkv: Phi-3 <-> Llama); NaN/inf in
    the adapter is refused unless `allow_nonfinite`."""
    from qkvconv.formats import peft as peft_format

    if out is None:
        raise QkvconvError("convert writes a new directory: give it with --out DIR")
    if dry_run:
        raise QkvconvError("--dry-run plans full-model conversions; adapters are small and convert in memory")
    check_qkv_target(qkv, "litgpt-lora" if to == "litgpt" else to)
    if src_format == "litgpt-lora" and to == "peft":
        ckpt = open_litgpt(directory)
        base_dir = ckpt.find_base(base)
        hf_config = _hf_config_of_litgpt_base(ckpt, base_dir, qkv)
        result = peft_format.litgpt_lora_to_peft(directory, out, hf_config=hf_config,
                                                 base_model_name_or_path=str(base_dir) if base_dir else None,
                                                 allow_nonfinite=allow_nonfinite)
    elif src_format == "peft" and to in ("litgpt-lora", "litgpt"):
        hf_config, base_name = peft_base_config(directory, base)
        result = peft_format.peft_to_litgpt_lora(directory, out, hf_config=hf_config, checkpoint_dir=base_name,
                                                 allow_nonfinite=allow_nonfinite)
        if base_name is not None and not (Path(base_name) / WEIGHTS).is_file():
            result.notes.append(
                f"{HYPERPARAMETERS} checkpoint_dir is the Hugging Face base {base_name}: `qkvconv verify` reads it, "
                f"but litgpt loads a litgpt base only: run `qkvconv convert {base_name} --to litgpt --out BASE` and "
                "set checkpoint_dir to BASE")
    elif src_format == "peft" and to == "peft" and qkv is not None:
        result = _peft_to_peft(directory, out, base, qkv, allow_nonfinite=allow_nonfinite)
    else:
        raise QkvconvError(
            f"cannot convert {src_format} to {to}: adapters convert between litgpt-lora and peft, and peft to peft "
            "with --qkv (merge a litgpt LoRA run into its base with `--to litgpt --merge`)"
        )
    report.actions += result.notes
    return report


def _peft_to_peft(directory: Path, out: Path, base: Path | None, qkv: str, *, allow_nonfinite: bool = False) -> Any:
    """A PEFT adapter for the architecture with the other QKV fusion (Phi-3 qkv_proj <-> Llama q/k/v_proj).

    Goes through a litgpt LoRA run in a temporary directory: litgpt's fused adapter holds a block per
    q, k and v, so both steps are the exact, checked conversions above, and the export merges the
    blocks back to one shared lora_A where they are equal (a fused adapter split into q/k/v keeps its
    rank r; q/k/v adapters sharing one lora_A fuse at rank r, otherwise at the sum of their ranks).
    """
    import tempfile

    from qkvconv.formats import peft as peft_format

    source_json, base_name = peft_base_config(directory, base)
    target_json = hf_config_for(litgpt_config_from_hf(source_json), source_json, qkv)
    with tempfile.TemporaryDirectory(prefix="qkvconv-") as tmp:
        run = Path(tmp) / "run"
        imported = peft_format.peft_to_litgpt_lora(directory, run, hf_config=source_json, checkpoint_dir=base_name,
                                                   allow_nonfinite=allow_nonfinite)
        result = peft_format.litgpt_lora_to_peft(run, out, hf_config=target_json, allow_nonfinite=allow_nonfinite)
    result.notes[:0] = [qkv_note(target_json, source_json, qkv), *imported.rounding,
                        f"base_model_name_or_path is left empty: load the adapter on the base converted alike "
                        f"(qkvconv convert {base_name or 'BASE'} --to hf --qkv {qkv} --out DIR)"]
    return result


def _hf_config_of_litgpt_base(ckpt: LitgptCheckpoint, base_dir: Path | None, qkv: str | None = None) -> dict[str, Any]:
    cfg = migrate_config(ckpt.config)[0]
    kept = _hf_config_for_litgpt(base_dir, cfg) if base_dir is not None else None
    family = detect_family(kept) if kept else None
    if family is not None and qkv in (None, family.fusion):
        return kept  # type: ignore[return-value]
    return hf_config_for(cfg, kept, qkv)


def peft_base_config(
    directory: Path, base: Path | None, *, option: str = "--base"
) -> tuple[dict[str, Any], str | None]:
    """The base model's config.json and its directory as an absolute path (a LoRA run written from it
    must find it from anywhere): `base` (given as `option`), or the adapter's base_model_name_or_path
    (a local directory or a Hub repo id from the cache)."""
    from qkvconv.io import sources

    given = base is not None
    if base is None:
        name = read_json(directory / PEFT_CONFIG).get("base_model_name_or_path")
        if not name:
            raise QkvconvError(f"{directory / PEFT_CONFIG} names no base model; pass the base HF directory with {option}")
        base = sources.resolve(name)
    base = base.resolve()
    if (base / HF_CONFIG).is_file():
        return read_json(base / HF_CONFIG), str(base)
    if (base / CONFIG).is_file():
        return hf_config_from_litgpt(migrate_config(read_yaml(base / CONFIG))[0]), str(base)
    where = f"{option} {base}" if given else f"the base {base}"
    raise QkvconvError(f"{where} has no {HF_CONFIG} or {CONFIG}")
