"""Tiny random transformers base models (Llama, GPT-NeoX, Falcon 40B, Phi-3, Gemma, ...) with the same
weights in litgpt's layout, and LoRA adapters on them made by litgpt and by PEFT, shared by the test
modules. The `bases` fixture (conftest.py) builds a base on demand, once per test module."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hf_models import attention_of
import torch
import yaml
from safetensors.torch import load_file

from qkvconv.formats.hf import litgpt_config_from_hf, plan_hf_to_litgpt
from qkvconv.model.layout import HeadLayout
from qkvconv.io.config_files import read_yaml
from qkvconv.model.lora import LoraSettings, qkv_delta


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
litgpt = pytest.importorskip("litgpt")
from litgpt.lora import GPT as LoRAGPT  # noqa: E402
from litgpt.lora import Config as LoRAConfig  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

TOL = 1e-5
VOCAB, POSITIONS = 96, 64
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
LLAMA_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=POSITIONS)
BASES = {
    "llama": {"model_type": "llama", **LLAMA_SIZES},
    "neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS, "rotary_pct": 0.25},
    "falcon40b": {"model_type": "falcon", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "new_decoder_architecture": True, "num_kv_heads": 2, "vocab_size": VOCAB,
                  "max_position_embeddings": POSITIONS},
    "phi3": {"model_type": "phi3", **LLAMA_SIZES, "original_max_position_embeddings": POSITIONS,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # tied head (LoRA on lm_head leaves the embedding alone), head_dim != hidden / heads, q/k/v split
    "gemma": {"model_type": "gemma", **LLAMA_SIZES, "head_dim": 16},
    # query/key norms over head_dim (not linears: no adapter on them), head_dim != hidden / heads
    "qwen3": {"model_type": "qwen3", **LLAMA_SIZES, "head_dim": 16},
    # biases everywhere (the head too), one LayerNorm feeding attention and MLP in parallel, partial rotary
    "phi": {"model_type": "phi", **LLAMA_SIZES, "partial_rotary_factor": 0.5},
    # LayerNorm, partial rotary, q/k/v biases
    "stablelm": {"model_type": "stablelm", **LLAMA_SIZES, "use_qkv_bias": True},
    # norms after attention and MLP, soft-capping (transformers' eager attention: SDPA drops the cap)
    "gemma2": {"model_type": "gemma2", **LLAMA_SIZES, "head_dim": 16, "attn_logit_softcapping": 5.0,
               "final_logit_softcapping": 3.0},
    # LayerNorms without weights: no norm tensors at all
    "olmo": {"model_type": "olmo", **LLAMA_SIZES, "num_key_value_heads": 4},
    # query/key norms over all heads, no input norms
    "olmo2": {"model_type": "olmo2", **LLAMA_SIZES},
    # mixture of experts: PEFT's target_modules reach the attention (transformers 5 holds the experts as 3D
    # parameters and the router as its own module, not nn.Linear)
    "mixtral": {"model_type": "mixtral", **LLAMA_SIZES, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", **LLAMA_SIZES, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 24, "norm_topk_prob": True},
    # query/key norms, RoPE per layer type
    "gemma3": {"model_type": "gemma3_text", **LLAMA_SIZES, "head_dim": 16, "sliding_window": 4,
               "layer_types": ["sliding_attention", "full_attention"]},
    # LayerNorms, GELU MLP c_fc/c_proj with biases, a window, tied head
    "starcoder2": {"model_type": "starcoder2", **LLAMA_SIZES, "sliding_window": 4},
    # neutral residual/logits multipliers: the attention and embedding scales are litgpt's
    "granite": {"model_type": "granite", **LLAMA_SIZES, "attention_multiplier": 0.0625,
                "embedding_multiplier": 32 ** 0.5},
    # RoPE in every layer (no_rope_layers all 1), tied head
    "smollm3": {"model_type": "smollm3", **LLAMA_SIZES, "no_rope_layers": [1, 1], "pad_token_id": None},
}
MOE_BASES = ("mixtral", "qwen3_moe")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@dataclass
class Base:
    directory: Path  # save_pretrained output
    config_json: dict[str, Any]
    lit_cfg: dict[str, Any]
    lit_state: dict[str, torch.Tensor]  # the same weights in litgpt's layout
    logits: torch.Tensor


def _build_base(kind: str, directory: Path) -> Base:
    config = transformers.AutoConfig.for_model(**BASES[kind])
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, **attention_of(BASES[kind]["model_type"]))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    # logits of the model as reloaded: transformers 5.3 reloads a GPT-NeoX saved with another rotary_pct than
    # 0.25 as 0.25 (see families.py), so the saved directory, not the model in memory, is the reference
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, **attention_of(BASES[kind]["model_type"])).eval()
    with torch.no_grad():
        logits = model(TOKENS).logits
    config_json = json.loads((directory / "config.json").read_text())
    hf_state = load_file(directory / "model.safetensors")
    lit_cfg = litgpt_config_from_hf(config_json)
    lit_state = plan_hf_to_litgpt(config_json, list(hf_state)).apply_in_memory(hf_state)
    model = litgpt.model.GPT(litgpt.Config(**lit_cfg))
    model.load_state_dict(lit_state, strict=True)
    with torch.no_grad():
        assert max_diff(model.eval()(TOKENS), logits) < TOL  # the bases agree before any adapter
    return Base(directory, config_json, lit_cfg, lit_state, logits)


def litgpt_lora_logits(lit_cfg: dict[str, Any], base_state: dict, lora_state: dict, hyper: dict,
                       tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    lora = {k: v for k, v in hyper.items() if k.startswith("lora_")}
    model = LoRAGPT(LoRAConfig(**lit_cfg, **lora))
    model.load_state_dict({**base_state, **lora_state}, strict=True)
    model.eval()
    with torch.no_grad():
        return model(tokens)


def load_lora_run(directory: Path) -> tuple[dict, dict, dict]:
    """(model_config.yaml, hyperparameters.yaml, lit_model.pth.lora tensors) of a LoRA run."""
    obj = torch.load(directory / "lit_model.pth.lora", weights_only=True)
    return read_yaml(directory / "model_config.yaml"), read_yaml(directory / "hyperparameters.yaml"), obj["model"]


def peft_logits(base_dir: Path, adapter_dir: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """transformers + PeftModel.from_pretrained, failing on any adapter key that did not load."""
    model_type = json.loads((Path(base_dir) / "config.json").read_text())["model_type"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, **attention_of(model_type))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, adapter_dir)
    bad = [str(w.message) for w in caught if any(word in str(w.message).lower() for word in ("missing", "unexpected"))]
    assert not bad, bad
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def peft_updates(directory: Path) -> dict[str, torch.Tensor]:
    """module -> B @ A * scaling, in float64, by peft's own pattern lookup (get_pattern_key)."""
    cfg = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), module), cfg["r"])
        alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), module), cfg["lora_alpha"])
        assert a.shape[0] == r
        scaling = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        out[module] = (b.double() @ a.double()) * scaling
    return out


def litgpt_updates(lit_cfg: dict, hyper: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """litgpt module -> its update (current litgpt semantics), in float64."""
    heads = HeadLayout(lit_cfg["n_head"], lit_cfg["n_query_groups"], lit_cfg["head_size"])
    enable = (hyper["lora_query"], hyper["lora_key"], hyper["lora_value"])
    settings = LoraSettings(hyper["lora_r"], hyper["lora_alpha"], enable)
    out = {}
    for name, a in tensors.items():
        if name.endswith("lora_A"):
            stem = name.removesuffix(".lora_A")
            b = tensors[f"{stem}.lora_B"]
            if stem.endswith("attn.qkv"):
                out[stem] = qkv_delta(a, b, settings, heads, legacy=False)
            else:
                out[stem] = (b.double() @ a.double()) * settings.scaling
    return out


def assert_same_updates(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-12) -> None:
    for name in sorted(set(got) | set(want)):
        g = got.get(name)
        w = want.get(name)
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert g.shape == w.shape, name
        scale = max(float(w.abs().max()), 1e-30)
        assert float((g - w).abs().max()) <= rtol * scale, (name, float((g - w).abs().max()))


# ---------------------------------------------------------------------------------------------
# 1. litgpt -> PEFT

EXPORT_FLAGS = {
    "qv": dict(lora_query=True, lora_value=True),
    "qkv": dict(lora_query=True, lora_key=True, lora_value=True),
    "k": dict(lora_key=True),
    "proj-mlp-head": dict(lora_projection=True, lora_mlp=True, lora_head=True),
}


def make_lora_run(base: Base, directory: Path, flags: dict[str, bool], r: int = 3, alpha: int = 5,
                  seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A litgpt LoRA run of random nonzero adapters on this base; returns (hyperparameters, litgpt logits)."""
    hyper = {"lora_r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "lora_query": False, "lora_key": False,
             "lora_value": False, "lora_projection": False, "lora_mlp": False, "lora_head": False, **flags,
             "checkpoint_dir": str(base.directory)}
    model = LoRAGPT(LoRAConfig(**base.lit_cfg, **{k: v for k, v in hyper.items() if k.startswith("lora_")}))
    gen = torch.Generator().manual_seed(seed)
    lora = {n: torch.randn(p.shape, generator=gen) * 0.3 for n, p in model.named_parameters() if "lora_" in n}
    assert lora
    directory.mkdir(parents=True)
    torch.save({"model": lora}, directory / "lit_model.pth.lora")
    (directory / "hyperparameters.yaml").write_text(yaml.safe_dump(hyper, sort_keys=False))
    (directory / "model_config.yaml").write_text(yaml.safe_dump(base.lit_cfg, sort_keys=False))
    return hyper, litgpt_lora_logits(base.lit_cfg, base.lit_state, lora, hyper)


def make_peft_adapter(base: Base, directory: Path, settings: dict, seed: int = 0) -> torch.Tensor:
    """A PEFT adapter with random nonzero lora_A / lora_B on this base, saved; returns PeftModel's logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base.directory,
                                                              **attention_of(base.config_json["model_type"]))
    return saved_random_adapter(model, directory, LoraConfig(task_type="CAUSAL_LM", **settings), seed)[1]


def saved_random_adapter(model: Any, directory: Path, config: Any, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """peft's own get_peft_model(model, config) with lora_A and lora_B random and nonzero, saved by peft; the
    PeftModel and its logits on TOKENS (the oracle). peft's warnings (fan_in_fan_out set for Conv1D, ...) muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval()
    with torch.no_grad():
        logits = pm(TOKENS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(directory)
    return pm, logits
