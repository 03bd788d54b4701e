"""`qkvconv convert`: between litgpt (current and legacy order), Hugging Face and PEFT.

Full models go through the streaming engine: a plan (hf_format.py, or a plain re-order for litgpt
<-> litgpt-legacy) is built from the source's tensor names, then each tensor is read once,
transformed and written into a new directory beside `out`, which appears at `out` in one rename
after the result has been checked with a forward pass. LoRA adapters (small) convert in memory
(peft_format.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkvconv.engine import execute, output_layout
from qkvconv.errors import QkvconvError
from qkvconv.hf_format import hf_config_from_litgpt, plan_hf_to_litgpt, plan_litgpt_to_hf
from qkvconv.layout import QKVOrder
from qkvconv.litgpt_format import (
    CONFIG,
    HYPERPARAMETERS,
    LORA_WEIGHTS,
    QKV_KEY,
    WEIGHTS,
    LitgptCheckpoint,
    migrate_config,
    open_litgpt,
    read_yaml,
)
from qkvconv.plan import Plan, Recipe, Reorder, copy
from qkvconv.progress import progress_for
from qkvconv.readers import TensorMeta, TensorReader, open_reader
from qkvconv.sources import check_inside
from qkvconv.transaction import is_temporary
from qkvconv.upgrade import _fresh_output, _publish, full_upgrade_plan
from qkvconv.writers import SafetensorsWriter, TorchWriter, plan_shards

HF_CONFIG = "config.json"
PEFT_CONFIG = "adapter_config.json"
TARGETS = ("litgpt", "litgpt-legacy", "hf", "peft", "litgpt-lora")
# Files that hold weights (rewritten by a conversion, never copied across formats)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".lora", ".safetensors.index.json", ".bin.index.json")
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


def detect_format(directory: Path) -> str:
    """litgpt | litgpt-lora | peft | hf, from the files a directory holds."""
    if (directory / LORA_WEIGHTS).is_file():
        return "litgpt-lora"
    if (directory / WEIGHTS).is_file():
        return "litgpt"
    if (directory / PEFT_CONFIG).is_file():
        return "peft"
    if (directory / HF_CONFIG).is_file():
        return "hf"
    raise QkvconvError(
        f"{directory} holds no checkpoint qkvconv knows: expected {WEIGHTS} or {LORA_WEIGHTS} (litgpt), "
        f"{PEFT_CONFIG} (PEFT) or {HF_CONFIG} with weights (Hugging Face)"
    )


def read_json(path: Path) -> dict[str, Any]:
    check_inside(path, path.parent)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QkvconvError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise QkvconvError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise QkvconvError(f"{path} does not hold a JSON object")
    return data


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
    from qkvconv.litgpt_format import ModelShape

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


def _copy_other_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Tokenizer, generation config and the like travel with the weights; other weights do not."""
    for item in src.iterdir():
        if item.name in skip or is_temporary(item) or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        check_inside(item, src)
        if item.is_file():
            shutil.copy2(item, dst / item.name)


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


def _hf_config_for_litgpt(directory: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A config.json kept beside a litgpt checkpoint (litgpt downloads keep the original) when it
    describes this model; otherwise None, and one is derived from model_config.yaml."""
    path = directory / HF_CONFIG
    if not path.is_file():
        return None
    config_json = read_json(path)
    try:
        plan_litgpt_to_hf(cfg, [], config_json)
    except QkvconvError as e:
        if "does not describe" in str(e):
            return None
    return config_json


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
) -> ConvertReport:
    """Convert `source` into format `to` at `out` (a new directory)."""
    if to not in TARGETS:
        raise QkvconvError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    directory = source.parent if source.is_file() else source
    src_format = detect_format(directory)
    report = ConvertReport(directory, out, src_format, to)
    if src_format in ("litgpt-lora", "peft") or to in ("peft", "litgpt-lora"):
        return _convert_adapter(directory, src_format, to, out, base, report, dry_run)
    if out is None and not dry_run:
        raise QkvconvError("convert writes a new directory: give it with --out DIR")
    plan, reader, kind = _source_plan(directory, src_format, to)
    layout = output_layout(plan, reader)
    shards = plan_shards(layout, max_shard_size) if kind == "hf" else {WEIGHTS: list(layout)}
    if dry_run:
        report.plan = _dry_run_lines(plan, layout, shards)
        report.actions.append(
            f"would write {len(layout)} tensors ({sum(m.nbytes for m in layout.values()):,} bytes) in "
            f"{len(shards)} file(s), plus {', '.join(plan.texts) or 'no config'}"
        )
        report.actions += plan.notes
        return report
    assert out is not None
    tmp = _fresh_output(out)
    try:
        _copy_other_files(directory, tmp, skip=set(plan.texts) | {CONFIG, HYPERPARAMETERS})
        total = sum(m.nbytes for m in layout.values())
        progress = progress_for(total, f"writing {out.name}")
        if kind == "hf":
            with SafetensorsWriter(tmp, layout, max_shard_size=max_shard_size) as writer:
                execute(plan, reader, writer, progress)
        else:
            with TorchWriter(tmp / WEIGHTS, layout) as writer:
                execute(plan, reader, writer, progress)
        for name, text in plan.texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        report.actions.append(f"wrote {len(layout)} tensors ({total:,} bytes) in {len(shards)} file(s)")
        report.actions += plan.notes
        if forward_check:
            report.checks.append(_forward_check(directory, tmp, device))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _forward_check(reference: Path, candidate: Path, device: str) -> str:
    """The converted model must compute what the source computes (verify.py); refuses otherwise."""
    from qkvconv import verify as verifying
    from qkvconv.errors import CheckFailed, UnsupportedFamily
    from qkvconv.weights import open_weights

    try:
        report = verifying.verify(open_weights(reference), open_weights(candidate), device=device)
    except UnsupportedFamily as e:
        return f"forward-pass check skipped: {e}"
    if not report.passed:
        raise CheckFailed(
            f"the converted checkpoint computes something else (first difference at {report.first_difference}); "
            "nothing was written"
        )
    how = "bitwise equal" if report.logits_max_abs_diff == 0 else f"max logit difference {report.logits_max_abs_diff:.2g}"
    return f"forward pass on {report.device} ({report.dtype}): every layer and the logits agree, {how}"


def _convert_adapter(
    directory: Path, src_format: str, to: str, out: Path | None, base: Path | None, report: ConvertReport, dry_run: bool
) -> ConvertReport:
    from qkvconv import peft_format

    if out is None:
        raise QkvconvError("convert writes a new directory: give it with --out DIR")
    if dry_run:
        raise QkvconvError("--dry-run plans full-model conversions; adapters are small and convert in memory")
    if src_format == "litgpt-lora" and to == "peft":
        ckpt = open_litgpt(directory)
        base_dir = ckpt.find_base(base)
        hf_config = _hf_config_of_litgpt_base(ckpt, base_dir)
        result = peft_format.litgpt_lora_to_peft(directory, out, hf_config=hf_config,
                                                 base_model_name_or_path=str(base_dir) if base_dir else None)
    elif src_format == "peft" and to in ("litgpt-lora", "litgpt"):
        hf_config, base_name = _hf_config_of_peft_base(directory, base)
        result = peft_format.peft_to_litgpt_lora(directory, out, hf_config=hf_config, checkpoint_dir=base_name)
    else:
        raise QkvconvError(
            f"cannot convert {src_format} to {to}: adapters convert between litgpt-lora and peft "
            "(merge a litgpt LoRA run into its base with `qkvconv upgrade --lora-merge`)"
        )
    report.actions += result.notes
    return report


def _hf_config_of_litgpt_base(ckpt: LitgptCheckpoint, base_dir: Path | None) -> dict[str, Any]:
    cfg = migrate_config(ckpt.config)[0]
    if base_dir is not None:
        kept = _hf_config_for_litgpt(base_dir, cfg)
        if kept is not None:
            return kept
    return hf_config_from_litgpt(cfg)


def _hf_config_of_peft_base(directory: Path, base: Path | None) -> tuple[dict[str, Any], str | None]:
    """The base model's config.json: --base, or the adapter's base_model_name_or_path (a local
    directory or a Hub repo id from the cache)."""
    from qkvconv import sources

    if base is None:
        name = read_json(directory / PEFT_CONFIG).get("base_model_name_or_path")
        if not name:
            raise QkvconvError(f"{directory / PEFT_CONFIG} names no base model; pass the base HF directory with --base")
        base = sources.resolve(name)
    if (base / HF_CONFIG).is_file():
        return read_json(base / HF_CONFIG), str(base)
    if (base / CONFIG).is_file():
        return hf_config_from_litgpt(migrate_config(read_yaml(base / CONFIG))[0]), str(base)
    raise QkvconvError(f"the base {base} has no {HF_CONFIG} or {CONFIG}")
