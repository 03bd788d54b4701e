"""Which config.json a converted model gets: the rules that keep the source's own config.json where it
still describes the model, pick an architecture for a litgpt config (and for `--qkv`), and carry the
tokenizer's ids across a change of architecture. Torch-free, like config.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.hf.config import (
    HF_CONFIG, _forward_fields, detect_family, hf_config_from_litgpt, litgpt_config_from_hf)
from qkvconv.formats.hf.describe import describe_layout
from qkvconv.formats.hf.families import FAMILIES
from qkvconv.io.config_files import read_json
from qkvconv.model.architecture import Architecture

# config.json keys that belong to the tokenizer or the file, not the architecture: kept across a change
# of architecture (--qkv)
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")



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


def tied(config_json: dict[str, Any] | None) -> bool:
    """Does this config.json tie the output head to the token embedding (its family's default included)?"""
    family = detect_family(config_json) if config_json else None
    if family is None:
        return False
    rule = family.config.tie_embeddings
    for key in rule.keys:
        if config_json.get(key) is not None:  # type: ignore[union-attr]
            return bool(config_json[key])  # type: ignore[index]
    return bool(rule.default)


def require_same_model(cfg: dict[str, Any], other: dict[str, Any], name: str, other_name: str) -> None:
    """Refuse (exit 2) two litgpt configs that do not describe one model: what the forward pass computes with
    and the MLP's width (which only the tensors' shapes would tell), every differing field named."""
    a, b = ({**Architecture.from_litgpt_config(c).function_fields(), "intermediate_size": c.get("intermediate_size")}
            for c in (cfg, other))
    differ = [f"{k} ({a[k]!r} in {name}, {b.get(k)!r} in {other_name})" for k in a if a[k] != b.get(k)]
    if differ:
        raise QkvconvError(f"{other_name} does not describe the same model as {name}: it differs in {'; '.join(differ)}")


def same_function(cfg: dict[str, Any], config_json: dict[str, Any]) -> bool:
    try:
        return _forward_fields(cfg) == _forward_fields(litgpt_config_from_hf(config_json))
    except QkvconvError:
        return False


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
    if family.twin is not None:  # a remote-code original: its transformers twin, with the source's token ids
        derived = hf_config_from_litgpt(cfg, family.twin if qkv in (None, FAMILIES[family.twin].fusion) else None,
                                        qkv=qkv)
        derived.update({k: source_json[k] for k in CARRIED_KEYS if k in source_json})
        target = detect_family(derived)
        assert target is not None
        derived[target.config.tie_embeddings.keys[0]] = tied(source_json)
        return derived if same_function(cfg, derived) else hf_config_from_litgpt(cfg, family.twin)
    if qkv is not None and family.fusion != qkv:  # another architecture: only what is not its own carries
        derived = hf_config_from_litgpt(cfg, qkv=qkv)
        merged = dict(derived)
    else:
        derived = hf_config_from_litgpt(cfg, family.architecture)
        merged = {**source_json, **derived}
    merged.update({k: source_json[k] for k in CARRIED_KEYS if k in source_json})
    target = detect_family(derived)
    assert target is not None
    merged[target.config.tie_embeddings.keys[0]] = tied(source_json)
    return merged if same_function(cfg, merged) else derived


def kept_config(directory: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A config.json kept beside a litgpt checkpoint (litgpt downloads keep the original) when it
    describes this model; otherwise None, and one is derived from model_config.yaml."""
    path = directory / HF_CONFIG
    if not path.is_file():
        return None
    config_json = read_json(path)
    return config_json if same_function(cfg, config_json) else None
