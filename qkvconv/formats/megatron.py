"""Megatron-LM and NeMo checkpoints, for `inspect`: which fused QKV order their `query_key_value` /
`linear_qkv` rows are in, with the evidence. Conversion and verify refuse them (nothing is read into
litgpt's names yet), so a user learns the layout without qkvconv pretending to convert it.

Two directory shapes:
- Megatron-LM (`megatron`): `latest_checkpointed_iteration.txt` naming an iteration directory (`release`,
  `iter_0000100`), or that directory itself, holding `mp_rank_00[_000]/model_optim_rng.pt` (or
  `model_rng.pt` with the distributed optimizer): a torch pickle with `args` (the training arguments),
  `checkpoint_version` and the weights under `model`.
- NeMo 1 (`nemo`): an unpacked `.nemo`: `model_config.yaml` and `model_weights.ckpt` (or
  `mp_rank_00/model_weights.ckpt` with tensor parallelism).

The orders (docs/layouts.md, "Megatron"):
- Megatron-core `linear_qkv`: per query group, its Q heads then K then V (`SelfAttention.
  get_query_key_value_tensors` views it as [ng, (np/ng + 2) * hn]): grouped, G = num_query_groups.
- Legacy `query_key_value` by `checkpoint_version` (Megatron-LM `checkpointing.fix_query_key_value_ordering`,
  transformers' megatron_gpt2 script): 0 -> [3, np, hn] sequential; 1.0 -> [np, hn, 3] element-interleaved;
  2.0 and later -> [np, 3, hn] per head, or [ng, np/ng + 2, hn] grouped with group_query_attention.
With tensor parallelism each rank holds the rows of its own heads in that order; inspect reads rank 0.

The pickle is read with torch's weights_only unpickler, allowing only the plain containers such files hold
besides tensors (the argparse/types namespaces of `args`, numpy's RNG state, byte buffers of
`_extra_state`): no checkpoint code runs. Tensors are memory-mapped, never read, for inspect.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.base import Format, file_list
from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder, check_order

TRACKER = "latest_checkpointed_iteration.txt"
NEMO_CONFIG = "model_config.yaml"
NEMO_WEIGHTS = "model_weights.ckpt"
RANK0 = ("mp_rank_00", "mp_rank_00_000")
MEGATRON_FILES = ("model_optim_rng.pt", "model_rng.pt")
QKV = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attention|attention)\.(query_key_value|linear_qkv)\.weight$")
REFUSAL = ("qkvconv reads {fmt} checkpoints for inspect only: it names their QKV layout but does not convert or "
           "verify them (export to Hugging Face with Megatron-Bridge or NeMo's own converter, then use qkvconv)")


def _safe_globals() -> list[Any]:
    """The non-tensor classes Megatron/NeMo files pickle besides dicts and tensors; each only holds data."""
    import argparse
    import io
    import types

    allowed: list[Any] = [argparse.Namespace, types.SimpleNamespace, io.BytesIO]
    try:  # numpy's RNG state in `rng_state`
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    except (ImportError, AttributeError):
        pass
    return allowed


def load_pickle(path: Path) -> Any:
    """A Megatron/NeMo torch file, tensors memory-mapped, through weights_only with the allowed globals."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QkvconvError(f"{path}: cannot be read safely (weights_only): {first}") from None


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, tensor) for every tensor in nested dicts (Megatron nests `language_model.encoder...`)."""
    import torch

    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))


def _rank0(directory: Path, files: tuple[str, ...]) -> Path | None:
    for rank in RANK0:
        for name in files:
            if (directory / rank / name).is_file():
                return directory / rank / name
    return None


def megatron_file(directory: Path) -> Path:
    """Rank 0's file of a Megatron-LM checkpoint directory or one of its iteration directories."""
    if (directory / TRACKER).is_file():
        iteration = (directory / TRACKER).read_text().strip()
        sub = directory / (iteration if iteration == "release" else f"iter_{int(iteration):07d}"
                           if iteration.isdigit() else iteration)
        found = _rank0(sub, MEGATRON_FILES)
        if found is None:
            raise QkvconvError(f"{directory / TRACKER} names iteration {iteration!r}, but {sub} holds no "
                               f"{'/'.join(RANK0)}/{' or '.join(MEGATRON_FILES)}")
        return found
    found = _rank0(directory, MEGATRON_FILES)
    if found is None:
        raise QkvconvError(f"{directory} holds neither {TRACKER} nor mp_rank_00/model_optim_rng.pt")
    return found


class _Settings:
    """The training arguments (Megatron `args`) or model_config.yaml (NeMo), read by Megatron's own names."""

    def __init__(self, values: Any, where: str) -> None:
        self.values, self.where = values, where

    def get(self, key: str, default: Any = None) -> Any:
        v = self.values.get(key, default) if isinstance(self.values, Mapping) else getattr(self.values, key, default)
        return default if v is None else v

    def int(self, key: str, default: int | None = None) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise QkvconvError(f"{self.where}: {key} must be a positive integer, got {v!r}")
        return v


def _order(tensor: str, version: float | None, settings: _Settings, H: int) -> tuple[QKVOrder, int, str]:
    """(order, key/value heads, evidence) of the fused tensor's rows."""
    gqa = bool(settings.get("group_query_attention", False)) or settings.get("num_query_groups") is not None
    G = settings.int("num_query_groups") if gqa else H
    groups = f"num_query_groups {G} in {settings.where}" if gqa else f"no query groups in {settings.where}: MHA"
    if tensor == "linear_qkv":
        return QKVOrder.GROUPED, G, (f"Megatron-core linear_qkv: per query group its Q heads, then K, then V "
                                     f"(SelfAttention.get_query_key_value_tensors); {groups}")
    if version is None:
        raise QkvconvError(f"{settings.where}: a legacy query_key_value without checkpoint_version: its row order "
                           "is not known to qkvconv (Megatron-core checkpoints use linear_qkv)")
    said = f"checkpoint_version {version:g}"
    if version < 1.0:
        return QKVOrder.SEQUENTIAL, G, f"{said}: [3, heads, head_dim] (Megatron-LM checkpointing); {groups}"
    if version < 2.0:
        return QKVOrder.INTERLEAVED, G, f"{said}: [heads, head_dim, 3] (Megatron-LM checkpointing); {groups}"
    if gqa and G != H:
        return QKVOrder.GROUPED, G, f"{said}: [groups, heads per group + 2, head_dim] (ParallelAttention); {groups}"
    return QKVOrder.PER_HEAD, G, f"{said}: [heads, 3, head_dim] (Megatron-LM checkpointing); {groups}"


def _report(directory: Path, fmt: str, weights: Path, state: Mapping[str, Any], settings: _Settings,
            version: float | None) -> dict[str, Any]:
    from collections import Counter

    tensors = dict(_tensors(state))
    qkv = sorted(((int(m.group(1)), m.group(2), name) for name in tensors if (m := QKV.search(name))))
    if not qkv:
        raise QkvconvError(f"{weights}: no layers.N.self_attention.query_key_value or linear_qkv weight")
    H, n_embd = settings.int("num_attention_heads"), settings.int("hidden_size")
    hs = settings.int("kv_channels", n_embd // H if n_embd % H == 0 else None)
    tp = settings.int("tensor_model_parallel_size", 1)
    layer, tensor, name = qkv[0]
    order, G, evidence = _order(tensor, version, settings, H)
    try:
        heads = HeadLayout(H, G, hs)
        check_order(order, heads)
    except LayoutError as e:
        raise QkvconvError(f"{settings.where}: {e}") from None
    if H % tp or G % tp and G != 1:
        raise QkvconvError(f"{settings.where}: {H} heads and {G} key/value heads cannot be split over "
                           f"tensor_model_parallel_size {tp}")
    want = (heads.rows // tp, n_embd)
    for _, _, each in qkv:
        shape = tuple(tensors[each].shape)
        if shape != want:
            raise QkvconvError(f"{weights}: {each} has shape {list(shape)}, but {H} heads, {G} key/value heads of "
                               f"size {hs} and hidden_size {n_embd} over {tp} tensor-parallel rank(s) give {list(want)}")
    positions = settings.get("position_embedding_type", "learned_absolute")
    rope = None
    if positions == "rope":
        fraction = settings.get("rotary_percent", settings.get("rotary_percentage", 1.0))
        order_name = "pairs" if settings.get("rotary_interleaved", False) else "half"
        rope = {"order": order_name, "fraction": fraction,
                "evidence": f"position_embedding_type rope, rotary_interleaved "
                            f"{bool(settings.get('rotary_interleaved', False))} in {settings.where}"}
    dtypes: Counter[str] = Counter()
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] += t.numel()
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else dict(dtypes.most_common())
    rank_note = (f"tensor parallel over {tp} ranks: each holds {H // tp} query heads' rows in this order; "
                 f"inspect read rank 0 ({weights.parent.name})") if tp > 1 else None
    template = QKV.sub(lambda m: m.group(0).replace(f"layers.{m.group(1)}.", "layers.{i}."), name)
    return {
        "source": str(directory), "format": fmt, "family": "Megatron GPT" + (" (Megatron-core)" if tensor ==
                                                                                "linear_qkv" else " (legacy)"),
        "model": None, "legacy": False, "naming": f"fused {tensor}", "qkv_order": order.value,
        "evidence": [f"{template}: {evidence}", f"positions: {positions} ({settings.where})",
                     *([rank_note] if rank_note else [])],
        "n_layer": settings.int("num_layers", len(qkv)), "n_head": H, "n_query_groups": G, "head_size": hs,
        "n_embd": n_embd, "attention": heads.attention, "rope": rope, "lora": None, "dtype": dtype,
        "parameters": sum(dtypes.values()), "files": file_list(weights.parent),
        "notes": [REFUSAL.format(fmt=fmt)],
    }


class Megatron(Format):
    """Megatron-LM's own checkpoints (`model_optim_rng.pt` per rank): inspect only."""

    name = "megatron"

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        weights = megatron_file(directory)
        state = load_pickle(weights)
        if not isinstance(state, Mapping) or "model" not in state:
            keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
            raise QkvconvError(f"{weights}: no `model` entry (found {keys}); a virtual-pipeline checkpoint "
                               "(model0, model1, ...) is not read")
        if state.get("args") is None:
            raise QkvconvError(f"{weights}: no `args` entry, so the head counts are unknown")
        version = state.get("checkpoint_version", 0.0)
        return _report(directory, self.name, weights, state["model"], _Settings(state["args"], f"{weights.name} args"),
                       float(version))

    def source(self, directory: Path) -> Any:
        raise QkvconvError(REFUSAL.format(fmt=self.name))

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        raise QkvconvError(REFUSAL.format(fmt=self.name))


class Nemo(Megatron):
    """An unpacked NeMo 1 `.nemo` (model_config.yaml + model_weights.ckpt) of a Megatron-core GPT: inspect only."""

    name = "nemo"

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        from qkvconv.io.config_files import read_yaml

        weights = directory / NEMO_WEIGHTS
        if not weights.is_file():
            weights = _rank0(directory, (NEMO_WEIGHTS,)) or weights
        config = read_yaml(directory / NEMO_CONFIG)
        state = load_pickle(weights)
        if not isinstance(state, Mapping):
            raise QkvconvError(f"{weights}: not a state dict ({type(state).__name__})")
        if not any(QKV.search(n) and n.endswith("linear_qkv.weight") for n in state):
            raise QkvconvError(f"{weights}: qkvconv reads NeMo checkpoints of Megatron-core models (linear_qkv); "
                               "this one has none (a legacy NeMo model's query_key_value order is not confirmed)")
        return _report(directory, self.name, weights, state, _Settings(config, NEMO_CONFIG), None)


FORMAT = Megatron()
NEMO = Nemo()
