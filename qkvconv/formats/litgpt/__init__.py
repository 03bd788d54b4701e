"""litgpt checkpoints: `lit_model.pth` + `model_config.yaml`, LoRA runs (`lit_model.pth.lora` +
`hyperparameters.yaml`), in the current (sequential `attn.qkv`) or legacy (grouped `attn.attn`) layout.

    checkpoint.py  the files: names, configs, shape checks, opening a directory
    plans.py       litgpt <-> litgpt plans (legacy <-> current order), legacy model_config.yaml
    inspect.py     the inspect report
    format.py      the registry's Formats: litgpt, litgpt-legacy, litgpt-lora
"""

from qkvconv.formats.litgpt.checkpoint import *  # noqa: F401,F403 (the names every caller uses)
