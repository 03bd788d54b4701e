"""The inspect report of a PEFT adapter (what `qkvconv inspect` shows): its LoRA settings, modules,
dtypes and files and, with the base family known (a given config.json, a local base_model_name_or_path,
or the architecture in auto_mapping), the layout of every adapted module (`adapted_modules`: where its
lora_B rows land, a fused QKV module's in the base's order and heads, and how the update meets the weight's
storage: Conv1D's [in, out] takes the transpose, fan_in_fan_out) and the litgpt LoRA flags it maps to. What
a conversion would refuse is listed in the notes, not raised.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.hf import describe_layout, detect_family
from qkvconv.formats.hf.table import Family
from qkvconv.formats.peft.modules import ADAPTER_KEY, _litgpt_flags, _Module, _ModuleTable, base_config_json
from qkvconv.formats.peft.policy import fan_in_fan_out_notes, unsupported_features
from qkvconv.formats.peft.reading import _peft_config, _weights_file
from qkvconv.io.readers import open_reader
from qkvconv.io.transaction import is_temporary
from qkvconv.model.layout import HeadLayout, QKVOrder


def _base_config(config: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    """The base config.json where the adapter names a local directory: a Hugging Face one, or a litgpt
    one (its model_config.yaml as a config.json); None when there is none or it cannot be read."""
    name = config.get("base_model_name_or_path")
    if not name:
        return None
    try:
        for base in (Path(name).expanduser(), directory / name):
            config_json = base_config_json(base)
            if config_json is not None:
                return config_json
    except QkvconvError:
        return None
    return None


def _base_rope(hf_config: dict) -> dict | None:
    """An adapter has no rotary order of its own: its base's, where the base's config.json is known."""
    from qkvconv.formats.hf.format import hf_rope

    rope = hf_rope(hf_config)
    return None if rope is None else {**rope, "evidence": f"the base model's: {rope['evidence']}"}


def _rows(module: _Module, table: _ModuleTable, heads: HeadLayout | None) -> str | None:
    """Where the module's lora_B rows land: a fused QKV module's in the base's order (with the heads, where the
    base's config.json is known), a split one's part, a module stacking several litgpt ones in their order."""
    if module.kind == "qkv":
        return f"{str(module.part).upper()} rows"
    if module.kind == "rows":
        return ", then ".join(f"{lit} rows" for lit in module.lit)
    if module.kind != "fused-qkv":
        return None
    order = table.qkv_order
    text = f"Q, K, V rows in {order.value} order"
    if heads is not None:
        text += f" (H={heads.n_head}, G={heads.n_query_groups}, hs={heads.head_size})"
        if order is QKVOrder.SEQUENTIAL:
            q, kv = heads.q_rows, heads.kv_rows
            text += f": Q 0-{q - 1}, K {q}-{q + kv - 1}, V {q + kv}-{q + 2 * kv - 1}"
    return text + (" (the Conv1D weight's columns)" if module.conv1d else "")


def _adapted_modules(family: Family, table: _ModuleTable, mapped: dict[str, _Module], shapes: dict[str, list[int]],
                     out_features: dict[str, int], heads: HeadLayout | None) -> list[dict[str, Any]]:
    """One entry per adapted module name (its layers together): rows, storage and the update PEFT adds."""
    groups: dict[str, dict[str, Any]] = {}
    for name, module in sorted(mapped.items(), key=lambda kv: table.modules.index(kv[1])):
        a_shape = shapes[name]
        entry = groups.setdefault(module.key, {
            "module": module.key if module.layer is None else f"{family.layer_prefix.format(i='{i}')}.{module.key}",
            "layers": None if module.layer is None else [],
            "ranks": [],
            "in_features": a_shape[1],
            "out_features": out_features.get(name),
            "rows": _rows(module, table, heads),
            "storage": "Conv1D, weight [in, out]" if module.conv1d else "nn.Linear, weight [out, in]",
            "fan_in_fan_out": module.conv1d,  # what PEFT uses on this module, whatever adapter_config.json says
            "update": ("transpose(lora_B @ lora_A) * scaling, added to the [in, out] weight" if module.conv1d
                       else "lora_B @ lora_A * scaling, added to the [out, in] weight"),
        })
        if module.layer is not None:
            entry["layers"].append(module.layer)
        if a_shape[0] not in entry["ranks"]:
            entry["ranks"].append(a_shape[0])
    return list(groups.values())


def inspect_peft(directory: Path, *, hf_config: dict | None = None) -> dict[str, Any]:
    """The inspect report of a PEFT adapter: its LoRA settings, and with the base family known (hf_config,
    a local base_model_name_or_path, or the architecture in auto_mapping) the litgpt LoRA it maps to."""
    config = _peft_config(directory)
    weights = _weights_file(directory)
    reader = open_reader(weights)
    dtypes: Counter[str] = Counter()
    parameters = 0
    modules: dict[str, list[int]] = {}  # module -> lora_A's shape (r, in)
    out_features: dict[str, int] = {}  # module -> lora_B's rows
    for name in reader.names():
        meta = reader.meta(name)
        dtypes[str(meta.dtype).removeprefix("torch.")] += meta.numel
        parameters += meta.numel
        if (m := ADAPTER_KEY.match(name)) and m.group(2) == "lora_A":
            modules.setdefault(m.group(1), list(meta.shape))
        elif m:
            out_features.setdefault(m.group(1), meta.shape[0])
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir())
             if p.is_file() and not is_temporary(p)]
    notes = [f"not convertible to litgpt: {why}" for why in unsupported_features(config)]

    hf_config = hf_config if hf_config is not None else _base_config(config, directory)
    family = None
    layout = None
    try:
        if hf_config is not None:
            family = detect_family(hf_config)
            layout = describe_layout(hf_config)
        else:
            arch = (config.get("auto_mapping") or {}).get("base_model_class")
            family = detect_family({"architectures": [arch]}) if arch else None
    except QkvconvError as e:
        notes.append(str(e))
        family = None

    lora = None
    adapted: list[dict[str, Any]] = []
    n_layer = layout["n_layer"] if layout else None
    if family is not None:
        prefix = re.escape(family.layer_prefix).replace(re.escape("{i}"), r"(\d+)")
        layers = [int(m.group(1)) for name in modules if (m := re.match(prefix + r"\.", name))]
        n_layer = n_layer or (max(layers) + 1 if layers else 0)
        table = _ModuleTable(family, int(n_layer))
        mapped = {name: table.by_hf.get(name) for name in modules}
        unknown = sorted(n for n, m in mapped.items() if m is None)
        if unknown:
            notes.append(f"not convertible to litgpt: {unknown[0]} has no litgpt LoRA equivalent")
        known = {name: m for name, m in mapped.items() if m is not None}
        heads = HeadLayout(layout["n_head"], layout["n_query_groups"], layout["head_size"]) if layout else None
        adapted = _adapted_modules(family, table, known, modules, out_features, heads)
        notes += fan_in_fan_out_notes(config, known.values())
        if family.convertible:
            flags = _litgpt_flags(list(known.values()))
            lora = {
                "r": config.get("r"), "alpha": config.get("lora_alpha"),
                **{k.removeprefix("lora_"): v for k, v in flags.items()},
                "base": config.get("base_model_name_or_path"), "checkpoint_dir": None,
            }
        else:  # the litgpt flags it would map to mean nothing: nothing maps it
            features = ", ".join(f for flags, f in family.unsupported if not flags)
            notes.append(f"not convertible: {family.architecture} with {features} has no litgpt equivalent, through "
                         "which every adapter conversion goes" + ("; `qkvconv verify` computes the adapter on its base"
                                                                  if family.verifiable else ""))
    ranks = Counter(shape[0] for shape in modules.values())
    if len(ranks) > 1:
        notes.append(f"ranks differ across modules ({dict(sorted(ranks.items()))}); litgpt gets one lora_r, "
                     "the others zero-padded")
    return {
        "source": str(directory),
        "format": "peft",
        "family": family.name if family is not None else None,
        "legacy": False,
        "naming": layout["qkv"] if layout else None,
        "qkv_order": layout["qkv_order"] if layout else None,
        "evidence": [layout["evidence"]] if layout else [],
        "n_layer": n_layer,
        "n_head": layout["n_head"] if layout else None,
        "n_query_groups": layout["n_query_groups"] if layout else None,
        "head_size": layout["head_size"] if layout else None,
        "n_embd": layout["n_embd"] if layout else None,
        "attention": layout["attention"] if layout else None,
        "rope": _base_rope(hf_config) if layout else None,
        "lora": lora,
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "use_rslora": bool(config.get("use_rslora")),
        "target_modules": config.get("target_modules"),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "modules": len(modules),
        "adapted_modules": adapted,
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()},
        "parameters": parameters,
        "files": files,
        "notes": notes,
    }
