"""litgpt LoRA runs <-> PEFT LoRA adapters, exactly, for the Hugging Face families in families.py.

    config_json = json.load(open("base_hf/config.json"))            # the base model's config.json
    litgpt_lora_to_peft(Path("out/finetune/lora/final"), Path("adapter"), hf_config=config_json)
    peft_to_litgpt_lora(Path("adapter"), Path("lora_run"), hf_config=config_json, checkpoint_dir="checkpoints/base")
    inspect_peft(Path("adapter"))                                     # what `qkvconv inspect` shows

The two formats hold the same kind of update, per adapted linear layer W (out, in):
- litgpt (`lit_model.pth.lora` + `hyperparameters.yaml`): `lora_A` (r, in), `lora_B` (out, r), update
  B @ A * lora_alpha / lora_r, with ONE r and alpha for the whole model. The fused `attn.qkv` adapter
  has blocks (qkvconv/model/lora.py): A (r * n_enabled, in), B (rows of the enabled q/k/v, r), block c
  of B multiplying rows [c*r, (c+1)*r) of A. Legacy `attn.attn` adapters (litgpt <= 0.5.4) land on the
  grouped rows, and with all of q, k, v enabled without the scatter (see docs/layouts.md).
  `lora_mlp` adapts every MLP linear together; `lora_projection` the attention output; `lora_head`
  the output head.
- PEFT (`adapter_config.json` + `adapter_model.safetensors`): `base_model.model.<HF module>.lora_A.weight`
  (r_m, in) and `.lora_B.weight` (out, r_m), update B @ A * alpha_m / r_m (alpha_m / sqrt(r_m) with
  use_rslora), r_m and alpha_m from `rank_pattern` / `alpha_pattern` (peft's get_pattern_key) or r and
  lora_alpha.

Both directions publish nothing before the written files, read back, give every adapted module the
source's update. The package, by concern:
- modules.py: an adapter's file names and keys; the HF modules of a family an adapter can sit on, and
  the litgpt modules holding their rows (the table both directions map through);
- policy.py: which adapters convert: the PEFT features with no litgpt equivalent, refused;
- reading.py: an adapter directory read and checked: (A, B), rank and alpha per module;
- export.py: litgpt LoRA run -> PEFT adapter (litgpt_lora_to_peft);
- importing.py: PEFT adapter -> litgpt LoRA run (peft_to_litgpt_lora);
- retarget.py: PEFT adapter -> PEFT adapter for another base of the same model (retarget_peft: a remote-code
  original's twin and the original, either way);
- probes.py: the check before publishing, every module's update on random probes;
- inspect.py: the inspect report of an adapter (inspect_peft);
- format.py: the registry's Format: inspect, verify on the base, the base's config (peft_base_config).
"""

from qkvconv.formats.peft.export import litgpt_lora_to_peft
from qkvconv.formats.peft.importing import peft_to_litgpt_lora
from qkvconv.formats.peft.inspect import inspect_peft
from qkvconv.formats.peft.modules import PEFT_CONFIG, AdapterConversion
from qkvconv.formats.peft.policy import KNOWN_FIELDS, REFUSED_SETTINGS, unsupported_features
from qkvconv.formats.peft.reading import is_peft_dir

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
