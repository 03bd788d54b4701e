"""Hugging Face transformers checkpoints (config.json + safetensors or .bin shards).

    table.py     the schema of the family table (Read, Choose, Split, Fused, Block, HFConfig, Family)
    families.py  the architectures as data: where every tensor lives, where config.json keeps each number
                 (families_more.py: more of them; pieces.py: what the entries share)
    config.py    config.json <-> litgpt config, family detection, the rules that pick an architecture
                 (torch-free: `inspect` reads configs and headers without torch)
    steps.py     row steps the HF mappings need (take or concatenate row blocks, tied heads)
    plans.py     HF state dict <-> litgpt state dict, as plans (planned without torch: steps touch
                 tensors only when they run)
    format.py    the registry's Format: detect, read, write, inspect (torch-free for safetensors)

Names are re-exported lazily (PEP 562), so importing the torch-free parts never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "HF_CONFIG": "config", "detect_family": "config", "litgpt_config_from_hf": "config",
    "hf_config_from_litgpt": "config", "describe_layout": "describe",
    "ConcatRows": "steps", "NormalizeRows": "steps", "TakeRows": "steps", "Tied": "steps",
    "litgpt_state_names": "plans", "plan_hf_to_litgpt": "plans", "plan_litgpt_to_hf": "plans",
    "FORMAT": "format",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


__all__ = sorted(_HOME)
