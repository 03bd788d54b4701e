"""The inspect report of a PEFT adapter (what `qkvconv inspect` shows): its LoRA settings, modules,
dtypes and files and, with the base family known (a given config.json, a local base_model_name_or_path,
or the architecture in auto_mapping), the litgpt LoRA flags it maps to. What a conversion would refuse
is listed in the notes, not raised.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.hf import describe_layout, detect_family
from qkvconv.formats.peft.modules import ADAPTER_KEY, _litgpt_flags, _ModuleTable, base_config_json
from qkvconv.formats.peft.policy import unsupported_features
from qkvconv.formats.peft.reading import _peft_config, _weights_file
from qkvconv.io.readers import open_reader
from qkvconv.io.transaction import is_temporary


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


def inspect_peft(directory: Path, *, hf_config: dict | None = None) -> dict[str, Any]:
    """The inspect report of a PEFT adapter: its LoRA settings, and with the base family known (hf_config,
    a local base_model_name_or_path, or the architecture in auto_mapping) the litgpt LoRA it maps to."""
    config = _peft_config(directory)
    weights = _weights_file(directory)
    reader = open_reader(weights)
    dtypes: Counter[str] = Counter()
    parameters = 0
    modules: dict[str, list[int]] = {}
    for name in reader.names():
        meta = reader.meta(name)
        dtypes[str(meta.dtype).removeprefix("torch.")] += meta.numel
        parameters += meta.numel
        if (m := ADAPTER_KEY.match(name)) and m.group(2) == "lora_A":
            modules.setdefault(m.group(1), list(meta.shape))
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
    n_layer = hf_config.get("num_hidden_layers") if hf_config else None
    if family is not None:
        prefix = re.escape(family.layer_prefix).replace(re.escape("{i}"), r"(\d+)")
        layers = [int(m.group(1)) for name in modules if (m := re.match(prefix + r"\.", name))]
        n_layer = n_layer or (max(layers) + 1 if layers else 0)
        table = _ModuleTable(family, int(n_layer))
        mapped = {name: table.by_hf.get(name) for name in modules}
        unknown = sorted(n for n, m in mapped.items() if m is None)
        if unknown:
            notes.append(f"not convertible to litgpt: {unknown[0]} has no litgpt LoRA equivalent")
        flags = _litgpt_flags([m for m in mapped.values() if m is not None])
        lora = {
            "r": config.get("r"), "alpha": config.get("lora_alpha"),
            **{k.removeprefix("lora_"): v for k, v in flags.items()},
            "base": config.get("base_model_name_or_path"), "checkpoint_dir": None,
        }
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
        "n_embd": hf_config.get("hidden_size") if hf_config else None,
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
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()},
        "parameters": parameters,
        "files": files,
        "notes": notes,
    }
