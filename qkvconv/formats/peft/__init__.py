"""litgpt LoRA runs <-> PEFT LoRA adapters (export.py holds it all for now)."""

from qkvconv.formats.peft.export import (
    KNOWN_FIELDS,
    PEFT_CONFIG,
    REFUSED_SETTINGS,
    AdapterConversion,
    inspect_peft,
    is_peft_dir,
    litgpt_lora_to_peft,
    peft_to_litgpt_lora,
    unsupported_features,
)

__all__ = [
    "AdapterConversion",
    "KNOWN_FIELDS",
    "PEFT_CONFIG",
    "REFUSED_SETTINGS",
    "inspect_peft",
    "is_peft_dir",
    "litgpt_lora_to_peft",
    "peft_to_litgpt_lora",
    "unsupported_features",
]
