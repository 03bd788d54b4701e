"""What a checkpoint is: format, heads, QKV row order with the evidence for it, LoRA, dtypes, sizes.

The report is a plain dict (stable keys, JSON-ready) so the CLI can render it as a table or as JSON.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.litgpt import (
    CURRENT_NAMING,
    LEGACY_NAMING,
    LORA_WEIGHTS,
    NAMING_ORDER,
    WEIGHTS,
    LitgptCheckpoint,
    ModelShape,
    check_full_shapes,
    check_lora_shapes,
    load_state_dict_file,
    migrate_config,
    open_litgpt,
    qkv_naming,
)
from qkvconv.model.lora import plan_reorder
from qkvconv.io.transaction import JOURNAL_NAME, is_temporary

# Report keys, in the order the table shows them; the JSON mode emits exactly these.
FIELDS = (
    "source", "format", "family", "model", "legacy", "naming", "qkv_order", "evidence", "n_layer", "n_head",
    "n_query_groups", "head_size", "n_embd", "attention", "lora", "dtype", "parameters", "files", "notes",
)


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
    for p in sorted(ckpt.directory.iterdir()):
        if p.is_file() and not is_temporary(p):
            files.append({"name": p.name, "bytes": p.stat().st_size})
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
        "lora": lora,
        "dtype": next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()},
        "parameters": parameters,
        "files": files,
        "notes": notes,
    }
    return {k: report[k] for k in FIELDS}


def _check_hf_shapes(config_json: dict[str, Any], reader: Any, directory: Path) -> None:
    """config.json's head counts must fit the tensors: plan the litgpt view on metadata alone."""
    from qkvconv.io.engine import output_layout
    from qkvconv.formats.hf import plan_hf_to_litgpt

    try:
        output_layout(plan_hf_to_litgpt(config_json, reader.names()), reader)
    except QkvconvError as e:
        raise QkvconvError(f"{directory}: config.json does not match the tensors ({e})") from None


def inspect_hf(directory: Path) -> dict[str, Any]:
    """The report for a Hugging Face directory: the family table says where q/k/v live and in which
    order; an architecture outside the table still gets what config.json and the files tell."""
    from qkvconv.ops.convert import HF_CONFIG, read_json
    from qkvconv.formats.hf.families import SUPPORTED_ARCHITECTURES
    from qkvconv.formats.hf import describe_layout
    from qkvconv.io.readers import open_reader

    config_json = read_json(directory / HF_CONFIG)
    reader = open_reader(directory)
    dtype, parameters = _tensor_summary(reader)
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir())
             if p.is_file() and not is_temporary(p)]
    architecture = (config_json.get("architectures") or [config_json.get("model_type")])[0]
    layout = describe_layout(config_json)
    if layout is not None:
        _check_hf_shapes(config_json, reader, directory)
    notes: list[str] = []
    if layout is None:
        n_head = config_json.get("num_attention_heads")
        layout = {"family": None, "qkv": None, "qkv_order": None, "n_head": n_head,
                  "n_query_groups": config_json.get("num_key_value_heads", n_head),
                  "head_size": config_json.get("head_dim"), "attention": None,
                  "evidence": "architecture not in qkvconv's family table: the QKV order cannot be interpreted"}
        notes.append(f"{architecture} is not supported for conversion; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    report = {
        "source": str(directory), "format": "hf", "family": layout["family"], "model": config_json.get("_name_or_path") or None,
        "architecture": architecture,
        "legacy": False, "naming": layout["qkv"], "qkv_order": layout["qkv_order"], "evidence": [layout["evidence"]],
        "n_layer": config_json.get("num_hidden_layers", config_json.get("n_layer")),
        "n_head": layout["n_head"], "n_query_groups": layout["n_query_groups"], "head_size": layout["head_size"],
        "n_embd": config_json.get("hidden_size", config_json.get("n_embd")), "attention": layout["attention"],
        "lora": None,
        "dtype": dtype, "parameters": parameters, "files": files, "notes": notes,
    }
    return report


def _tensor_summary(reader: Any) -> tuple[Any, int]:
    """(dtype or counts per dtype, parameter count) from tensor metadata alone."""
    dtypes: Counter[str] = Counter()
    for name in reader.names():
        meta = reader.meta(name)
        dtypes[str(meta.dtype).removeprefix("torch.")] += meta.numel
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else {k: v for k, v in dtypes.most_common()}
    return dtype, sum(dtypes.values())


def inspect_meta(directory: Path) -> dict[str, Any]:
    """The report for Meta's original layout (consolidated.00.pth + params.json): separate wq/wk/wv,
    rotary in adjacent pairs."""
    from qkvconv.formats import meta as meta_format
    from qkvconv.io.config_files import read_json
    from qkvconv.io.readers import open_reader

    reader = open_reader(meta_format.weights_file(directory))
    shapes = {n: reader.meta(n).shape for n in reader.names()}
    cfg = meta_format.litgpt_config_from_params(read_json(directory / meta_format.PARAMS), shapes)
    shape = ModelShape.from_config(cfg, directory / meta_format.PARAMS)
    dtype, parameters = _tensor_summary(reader)
    return {
        "source": str(directory), "format": "meta", "family": "llama", "model": meta_format.LITGPT_NAME, "legacy": False,
        "naming": "attention.wq/wk/wv", "qkv_order": "split",
        "evidence": ["separate layers.{i}.attention.wq/wk/wv (Meta's original Llama code); Q/K rows in rotary "
                     "pairs order (dims 2i, 2i+1 rotate together)"],
        "n_layer": shape.n_layer, "n_head": shape.heads.n_head, "n_query_groups": shape.heads.n_query_groups,
        "head_size": shape.heads.head_size, "n_embd": shape.n_embd, "attention": shape.heads.attention,
        "lora": None, "dtype": dtype, "parameters": parameters,
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir())
                  if p.is_file() and not is_temporary(p)],
        "notes": [],
    }


def inspect_path(source: Path, base: Path | None = None) -> dict[str, Any]:
    """Inspect any supported checkpoint directory (litgpt, litgpt LoRA, Hugging Face, Meta, PEFT).
    `base`: the base of a LoRA run, where its hyperparameters.yaml does not lead to it."""
    from qkvconv.ops.convert import detect_format

    directory = source.parent if source.is_file() else source
    kind = detect_format(directory) if directory.is_dir() else "litgpt"
    if kind == "hf":
        return inspect_hf(directory)
    if kind == "meta":
        return inspect_meta(directory)
    if kind == "peft":
        from qkvconv.formats.peft import inspect_peft

        return inspect_peft(directory)
    return inspect_litgpt(open_litgpt(source), base)


def expectation_failure(report: dict[str, Any], expect: str) -> str | None:
    """`--expect current|legacy` as a CI gate: why the checkpoint is not as expected, or None.

    `current` covers what litgpt will load with it: a LoRA run whose base is legacy computes wrong logits
    under current litgpt, and one whose base cannot be found cannot be said to be current.
    """
    source, lora = report["source"], report.get("lora") or {}
    if expect == "legacy":
        return None if report["legacy"] else f"{source} is current ({report['naming']}), not legacy"
    if report["legacy"]:
        return f"{source} is legacy ({report['naming']}); run `qkvconv upgrade {source}`"
    if "base_legacy" in lora and lora["base_legacy"] is None:
        return (f"the base of the LoRA run {source} (checkpoint_dir={lora['checkpoint_dir']!r}) was not found, so it "
                "is not known to be current; pass --base DIR")
    if lora.get("base_legacy"):
        return (f"the LoRA run {source} is current but its base {lora['base']} is legacy: current litgpt computes "
                f"wrong logits with it; run `qkvconv upgrade {lora['base']}`")
    return None
