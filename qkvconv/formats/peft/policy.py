"""Which PEFT adapters qkvconv converts: a plain LoRA, whose update is B @ A * scaling and nothing else.

PEFT features with no litgpt equivalent are refused with one line (QkvconvError, exit 2): DoRA and the
other LoRA variants, trained biases, modules_to_save, trainable tokens, targets litgpt cannot adapt
(embeddings), initialisations with which PEFT rewrites the base weights on load (PiSSA, CorDA, OLoRA,
LoftQ), and settings peft 0.21 does not have. unsupported_features reads them from adapter_config.json
(reading.py refuses the first, inspect.py lists them all as notes); _what_is names an unexpected tensor of
the weights file in the refusal.

fan_in_fan_out is not among them: PEFT decides it per module from the module's class, whatever the config
says (fan_in_fan_out_notes), so it never changes what an adapter computes; qkvconv does as PEFT does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from qkvconv.formats.peft.modules import PEFT_PREFIX, _Module

# Every LoraConfig field of peft 0.21 (tests check this against the installed peft). A field outside
# this list with a value set means a newer PEFT feature: refused rather than guessed at.
KNOWN_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
    "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
    "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
    "ensure_weight_tying",
})
# Settings that, when set, change what the adapter computes beyond B @ A * scaling (or add trained
# tensors litgpt has no place for). The LoRA variants of peft 0.21 (fields it marks is_lora_variant)
# are all here; tests check that too.
REFUSED_SETTINGS = {
    "use_dora": "it is DoRA (use_dora: a magnitude vector rescales each weight column; litgpt LoRA has none)",
    "lora_bias": "lora_B has a trained bias (lora_bias)",
    "modules_to_save": "it holds fully trained modules (modules_to_save); litgpt LoRA runs hold only LoRA matrices",
    "trainable_token_indices": "it trains token embeddings (trainable_token_indices)",
    "layer_replication": "it replicates layers (layer_replication)",
    "target_parameters": "it adapts parameters rather than modules (target_parameters)",
    "megatron_config": "it targets Megatron parallel layers (megatron_config)",
    "use_qalora": "it is QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens: the update applies only after them)",
    "velora_config": "it is the VeLoRA variant (velora_config)",
    "monteclora_config": "it is the MonteCLoRA variant (monteclora_config)",
    "use_bdlora": "it is block-diagonal LoRA (use_bdlora)",
    "arrow_config": "it routes between adapters (arrow_config)",
    "kasa_config": "it is the KaSA variant (kasa_config)",
}
# init_lora_weights values with which PEFT rewrites the base weights when it loads the adapter
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq")


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def unsupported_features(config: dict[str, Any]) -> list[str]:
    """What in adapter_config.json has no litgpt equivalent (empty: a plain LoRA)."""
    found = []
    if config.get("peft_type", "LORA") != "LORA":
        found.append(f"it is peft_type {config.get('peft_type')!r} (qkvconv converts LoRA adapters only)")
    found += [why for key, why in REFUSED_SETTINGS.items() if _is_set(config.get(key))]
    if config.get("bias", "none") != "none":
        found.append(f"it trains biases (bias={config['bias']!r}); litgpt LoRA runs hold only LoRA matrices")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        found.append(
            f"init_lora_weights={init!r}: PEFT rewrites the base weights when it loads this adapter; save it "
            "with save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    if config.get("ensure_weight_tying") and "lm_head" in str(config.get("target_modules")):
        found.append("ensure_weight_tying with a targeted lm_head (the tied embedding gets the adapter too)")
    unknown = sorted(k for k, v in config.items() if k not in KNOWN_FIELDS and _is_set(v))
    if unknown:
        found.append(f"it sets what qkvconv does not know ({', '.join(unknown)}; written by a newer PEFT?)")
    return found


def conv1d_note(modules: Iterable[_Module]) -> str | None:
    """How an adapter on Conv1D modules (GPT-2's, weight stored [in, out]) adds to them, or None.

    peft 0.21: tuners/tuners_utils.py _get_in_out_features reads a Conv1D's (in, out) off its [in, out] weight,
    so lora_A is (r, in) and lora_B (out, r) exactly as on an nn.Linear, and tuners/lora/layer.py Linear.forward
    adds lora_B(lora_A(x)) * scaling on either; only the merge differs: Linear.get_delta_weight returns
    transpose(lora_B @ lora_A, fan_in_fan_out) * scaling, the transpose for the [in, out] storage. qkvconv reads
    Conv1D weights as a Linear's [out, in] (formats/hf/plans.py), where the update is lora_B @ lora_A * scaling
    as on any linear. Adding B @ A to the [in, out] storage untransposed (what llama.cpp's LoRA converter makes
    of GPT-2's square c_proj) is a different model, which verify tells apart.
    """
    conv = sorted({m.key for m in modules if m.conv1d})
    if not conv:
        return None
    return (f"{', '.join(conv)}: Conv1D, weight stored [in, out] (fan_in_fan_out true): PEFT adds "
            "transpose(lora_B @ lora_A) * scaling to it, which is lora_B @ lora_A * scaling on the [out, in] weight "
            "qkvconv computes with")


def fan_in_fan_out_notes(config: dict[str, Any], modules: Iterable[_Module]) -> list[str]:
    """Where adapter_config.json's fan_in_fan_out disagrees with the class of an adapted module: what PEFT does.

    peft 0.21 tuners/lora/layer.py dispatch_default: on an nn.Linear with fan_in_fan_out true it warns
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
    and sets config.fan_in_fan_out = False before wrapping it; on a Conv1D with false, the reverse. Each wrapped
    module keeps the value it was made with, so the flag never changes what PEFT computes, and the config PEFT
    saves holds whatever the last module it wrapped needed (GPT-2 with c_attn and lm_head targeted: false,
    c_attn being a Conv1D). qkvconv mirrors PEFT rather than refusing: the update follows the module's class (the
    family table's Fused.transposed / Family.conv1d), and a flag that disagrees is reported here.
    """
    flag = bool(config.get("fan_in_fan_out"))
    wrong = sorted({m.key for m in modules if m.conv1d != flag})
    if not wrong:
        return []
    kind = "nn.Linear" if flag else "Conv1D"
    return [f"adapter_config.json has fan_in_fan_out {str(flag).lower()}, but {', '.join(wrong)} "
            f"{'is' if len(wrong) == 1 else 'are'} {kind}: PEFT 0.21 uses {str(not flag).lower()} there (it warns and "
            "sets it so: tuners/lora/layer.py dispatch_default), and so does qkvconv; the update is the one the "
            "module's class takes"]


def _what_is(name: str) -> str:
    """For refusals: what an unexpected tensor of a PEFT file is."""
    if "lora_magnitude_vector" in name:
        return f"{name} (a DoRA magnitude vector)"
    if "lora_embedding_" in name:
        return f"{name} (LoRA on an embedding)"
    if re.search(r"\.lora_B\.bias$", name):
        return f"{name} (a lora_B bias)"
    if "modules_to_save" in name or "trainable_tokens" in name:
        return f"{name} (a fully trained module)"
    if not name.startswith(PEFT_PREFIX):
        return f"{name} (not under {PEFT_PREFIX!r}, where PEFT saves LoRA matrices)"
    return f"tensor {name}"
