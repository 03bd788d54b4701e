"""llama.cpp's own converter as the oracle of the GGUF tests: tiny random transformers models of each
family, a tokenizer trained for each (the converter needs one), converted by convert_hf_to_gguf.py in
the environment fixtures/build_llamacpp_converter.sh builds (cached under ~/.cache/qkvconv, keyed by
the llama-cpp-python version it unpacks the converter from)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import threading

import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "fixtures" / "build_llamacpp_converter.sh"
TOKENIZERS = ROOT / "fixtures" / "gguf_tokenizers.py"
CONVERT_MANY = ROOT / "fixtures" / "gguf_convert_many.py"
VENV_MODEL = ROOT / "fixtures" / "venv_transformers_model.py"
VERSION = "0.3.36"
GPT2_VOCAB = 50304  # >= GPT-2's 50257 tokens, which Falcon's and GPT-NeoX's converters take from tokenizer.json

_GPT2_LOCK = threading.Lock()  # the module fixture builds two families at a time
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    id: str
    hf: dict[str, Any]  # AutoConfig.for_model settings
    tokenizer: str  # "spm" | "gpt2"
    config_json: dict[str, Any] = field(default_factory=dict)  # keys set in config.json after saving (None: removed)
    arch: str = ""  # general.architecture llama.cpp writes
    hf_vocab: int | None = None  # vocab_size where the tokenizer needs a larger one than SMALL's
    added_tokens: tuple[str, ...] = ()  # special tokens added to GPT-2's tokenizer.json (a converter asks for them)
    converter_class: str | None = None  # the HF class llama.cpp's converter registers where transformers' differs
    # who makes the model: "transformers" (5.3, here); "venv": the converter environment's transformers (4.57), where
    # 5.3's computes another function (DBRX: fixtures/venv_transformers_model.py); "jais": jais_files, tensors by hand
    # (remote code, no transformers class; its logits are then the reference pass's)
    builder: str = "transformers"


JAIS_CONFIG = {"architectures": ["JAISLMHeadModel"], "model_type": "jais",
               "auto_map": {"AutoConfig": "configuration_jais.JAISConfig",
                            "AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"},
               "n_embd": 32, "n_head": 4, "n_layer": 2, "n_inner": 48, "n_positions": 64, "vocab_size": 96,
               "activation_function": "swiglu", "position_embedding_type": "alibi", "layer_norm_epsilon": 1e-5,
               "mup_embeddings_scale": 3.5, "mup_output_alpha": 1.5, "mup_width_scale": 0.25,
               "mup_scale_qk_dot_by_d": True, "tie_word_embeddings": False, "torch_dtype": "float32"}


def jais_files(settings: dict[str, Any], directory: Path, slopes_buffer: bool = False) -> None:
    """A tiny JAIS checkpoint as its remote code saves one (no transformers class computes JAIS): every linear a
    Conv1D ([in, out]) with a bias, LayerNorms with biases, SwiGLU c_fc / c_fc2; random and nonzero everything
    (times 0.3, as build_hf). `slopes_buffer`: with the ALiBi slopes buffer relative_pe.slopes, which llama.cpp
    0.3.36's converter reads with .item() and fails on in its default lazy mode (so the oracle's model has none)."""
    from safetensors.torch import save_file

    from qkvconv.reference.alibi import slopes

    d, ff, vocab = settings["n_embd"], settings["n_inner"], settings["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
              "lm_head.weight": (vocab, d)}
    for i in range(settings["n_layer"]):
        p = f"transformer.h.{i}"
        shapes.update({f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,), f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
                       f"{p}.attn.c_attn.weight": (d, 3 * d), f"{p}.attn.c_attn.bias": (3 * d,),
                       f"{p}.attn.c_proj.weight": (d, d), f"{p}.attn.c_proj.bias": (d,),
                       f"{p}.mlp.c_fc.weight": (d, ff), f"{p}.mlp.c_fc.bias": (ff,),
                       f"{p}.mlp.c_fc2.weight": (d, ff), f"{p}.mlp.c_fc2.bias": (ff,),
                       f"{p}.mlp.c_proj.weight": (ff, d), f"{p}.mlp.c_proj.bias": (d,)})
    torch.manual_seed(0)
    tensors = {name: torch.randn(shape) * 0.3 for name, shape in shapes.items()}
    if slopes_buffer:
        tensors["transformer.relative_pe.slopes"] = slopes("bloom", settings["n_head"]).float()
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(settings, indent=2))


FAMILIES = [
    Family("llama-gqa", {"model_type": "llama", **SMALL, "rms_norm_eps": 1e-5}, "spm", arch="llama"),
    Family("llama3-rope", {"model_type": "llama", **SMALL, "head_dim": 16, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "spm", arch="llama"),
    Family("mistral", {"model_type": "mistral", **SMALL, "sliding_window": None}, "spm", arch="llama"),
    Family("qwen2-bias-tied", {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True,
                               "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "spm", arch="qwen2"),
    Family("phi3-fused", {"model_type": "phi3", **SMALL, "original_max_position_embeddings": 64,
                          "partial_rotary_factor": 0.5, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
           "spm", arch="phi3"),
    Family("falcon-7b", {"model_type": "falcon", **{k: v for k, v in SMALL.items() if k not in (
        "intermediate_size", "num_key_value_heads")}, "vocab_size": GPT2_VOCAB, "multi_query": True,
        "parallel_attn": True}, "gpt2", config_json={"num_kv_heads": 1}, arch="falcon"),
    Family("falcon-40b", {"model_type": "falcon", **{k: v for k, v in SMALL.items() if k not in (
        "intermediate_size", "num_key_value_heads")}, "vocab_size": GPT2_VOCAB, "new_decoder_architecture": True,
        "num_kv_heads": 2}, "gpt2", arch="falcon"),
    Family("gpt-neox", {"model_type": "gpt_neox", **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
                        "hidden_size": 64, "intermediate_size": 96, "vocab_size": GPT2_VOCAB},
           "gpt2", config_json={"rotary_pct": 0.25}, arch="gptneox"),
    Family("gemma", {"model_type": "gemma", **SMALL, "head_dim": 16}, "spm", arch="gemma"),
]
# the registry's other families llama.cpp supports
MORE = [
    Family("qwen3-qk-norm", {"model_type": "qwen3", **SMALL, "head_dim": 16,
                             "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "spm", arch="qwen3"),
    Family("olmo2", {"model_type": "olmo2", **SMALL, "rms_norm_eps": 1e-6}, "gpt2", arch="olmo2",
           hf_vocab=GPT2_VOCAB),
    Family("stablelm", {"model_type": "stablelm", **SMALL, "use_qkv_bias": True, "partial_rotary_factor": 0.5}, "gpt2",
           arch="stablelm",
           hf_vocab=GPT2_VOCAB),
    # llama.cpp's gemma2 scales Q by 1/sqrt(head_dim) (query_pre_attn_scalar is not in the file): 16 here
    Family("gemma2", {"model_type": "gemma2", **SMALL, "head_dim": 16, "sliding_window": 4,
                      "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16},
           "spm", arch="gemma2"),
    Family("mixtral", {"model_type": "mixtral", **SMALL, "num_local_experts": 4, "num_experts_per_tok": 2,
                       "sliding_window": None}, "spm", arch="llama"),
    Family("qwen3-moe", {"model_type": "qwen3_moe", **SMALL, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                         "moe_intermediate_size": 24, "norm_topk_prob": True,
                         "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "gpt2", arch="qwen3moe",
           hf_vocab=GPT2_VOCAB),
    # 4 * hidden_size wide, as every Phi-2 is: llama.cpp's converter writes phi2.feed_forward_length = 4 * n_embd
    # whatever the width, and llama.cpp refuses a file whose tensors are another width
    Family("phi-2", {"model_type": "phi", **SMALL, "intermediate_size": 4 * SMALL["hidden_size"],
                     "num_key_value_heads": 4, "partial_rotary_factor": 0.5},
           "gpt2", arch="phi2", hf_vocab=GPT2_VOCAB),
    Family("starcoder2", {"model_type": "starcoder2", **SMALL, "sliding_window": None, "norm_epsilon": 1e-5},
           "gpt2", arch="starcoder2", hf_vocab=GPT2_VOCAB),
    # 2 layers: llama.cpp's smollm3 leaves RoPE out of every 4th layer only, so every layer rotates here
    Family("smollm3", {"model_type": "smollm3", **SMALL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
           "spm", arch="smollm3"),
    # attention_multiplier 0.25 = 1/sqrt(16): scores scaled by it, not 1/sqrt(head_dim 8); other multipliers 1
    Family("granite", {"model_type": "granite", **SMALL, "attention_multiplier": 0.25, "pad_token_id": 0,
                       "bos_token_id": 1, "eos_token_id": 2}, "spm", arch="granite"),
    # 6 layers: llama.cpp's gemma3 slides on layers il % 6 < 5, so layer 5 is global (its own base, linear
    # scaling), as transformers' default layer_types; Q scaled by 1/sqrt(head_dim) = query_pre_attn_scalar 16
    Family("gemma3", {"model_type": "gemma3_text", **SMALL, "num_hidden_layers": 6, "head_dim": 16,
                      "sliding_window": 4, "query_pre_attn_scalar": 16, "final_logit_softcapping": 3.0,
                      "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
                                          "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 500.0}}}, "spm", arch="gemma3"),
    # LayerNorms without weights: no norm tensors in either file
    Family("olmo", {"model_type": "olmo", **SMALL}, "gpt2", arch="olmo", hf_vocab=GPT2_VOCAB),
    # GLM-4 (transformers): pairs rotary on the first half of each head, q/k/v biases, gate_up_proj fused; its
    # converter (ChatGLMModel) asks the tokenizer for <|endoftext|> and <|user|>
    Family("glm", {"model_type": "glm", **SMALL, "head_dim": 8, "attention_bias": True, "pad_token_id": 0,
                   "rms_norm_eps": 1e-5,
                   "eos_token_id": 2}, "gpt2", arch="chatglm",
           hf_vocab=GPT2_VOCAB, added_tokens=("<|endoftext|>", "<|user|>")),
    # positions without RoPE (verified, and written --to gguf only): GPT-2's learned table (its converter reads n_ctx, which
    # transformers 5.3 no longer saves), GPT-BigCode multi-query, Bloom's ALiBi with 6 heads (not a power of two:
    # the slopes' second series)
    Family("gpt2", {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, "gpt2",
           config_json={"n_ctx": 64}, arch="gpt2", hf_vocab=GPT2_VOCAB),
    Family("gpt-bigcode-mqa", {"model_type": "gpt_bigcode", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                               "multi_query": True}, "gpt2", arch="starcoder", hf_vocab=GPT2_VOCAB),
    Family("bloom", {"model_type": "bloom", "hidden_size": 48, "n_layer": 2, "n_head": 6}, "gpt2", arch="bloom",
           hf_vocab=GPT2_VOCAB),
    # MPT: llama.cpp's converter registers MosaicML's MPTForCausalLM (same tensors and keys as transformers' port);
    # ALiBi on (transformers adds it always; the converter only where attn_config.alibi), clip_qkv small enough to
    # clamp, 6 heads
    Family("mpt", {"model_type": "mpt", "d_model": 48, "n_layers": 2, "n_heads": 6, "max_seq_len": 64,
                   "attn_config": {"alibi": True, "clip_qkv": 0.6}}, "gpt2", arch="mpt", hf_vocab=GPT2_VOCAB,
           converter_class="MPTForCausalLM"),
    # Cohere: GQA, a logit_scale not CohereConfig's default; no attention_bias (llama.cpp's
    # command-r loads no attn_output bias). GPT-2's tokenizer: transformers' CohereTokenizerFast, which the converter
    # loads for model_type cohere, takes a tokenizer.json and no SentencePiece model
    Family("cohere", {"model_type": "cohere", **SMALL, "logit_scale": 0.37,
                      "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}, "gpt2", arch="command-r",
           hf_vocab=GPT2_VOCAB),
    # Command R+'s use_qk_norm: llama.cpp's command-r loads the per-head q/k norms in models of 64 layers or more
    Family("cohere-qk-norm", {"model_type": "cohere", **SMALL, "num_hidden_layers": 64, "use_qk_norm": True,
                              "logit_scale": 0.37, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
           "gpt2", arch="command-r", hf_vocab=GPT2_VOCAB),
    # DBRX: GQA, QKV clamped, 4 experts of 48 (not d_model: transformers 5.3's DBRX could not run it) choosing 2
    Family("dbrx", {"model_type": "dbrx", "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
                    "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.6, "rope_theta": 10000},
                    "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}}, "gpt2", arch="dbrx",
           hf_vocab=GPT2_VOCAB, builder="venv"),
    # JAIS (remote code): ALiBi, SwiGLU, muP scales (embeddings 3.5, logits 1.5 * 0.25, scores by 1/head_size)
    Family("jais", JAIS_CONFIG, "gpt2", arch="jais", hf_vocab=GPT2_VOCAB, builder="jais"),
]
BY_ID = {f.id: f for f in FAMILIES + MORE}


def converter_dir() -> Path:
    """The converter's environment, built by the fixture script on first use and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkvconv"
    directory = cache / f"llamacpp-converter-{VERSION}"
    if not (directory / "READY").is_file():
        subprocess.run(["bash", str(BUILD), str(directory)], check=True, timeout=1800,
                       env={**os.environ, "PYTHON": sys.executable, "LLAMACPP_PYTHON_VERSION": VERSION})
    return directory


def build_hf(family: Family, directory: Path, converter: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny random model of `family` saved with save_pretrained, with a tokenizer the converter accepts."""
    import transformers

    settings = {**family.hf, **({"vocab_size": family.hf_vocab} if family.hf_vocab else {})}
    python = converter / "venv" / "bin" / "python"
    if family.builder == "jais":
        jais_files(settings, directory)
    elif family.builder == "venv":
        assert dtype == torch.float32
        subprocess.run([str(python), str(VENV_MODEL), "build", json.dumps(settings), str(directory)], check=True,
                       capture_output=True, timeout=600)
    else:
        config = transformers.AutoConfig.for_model(**settings)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # nonzero random everything: norms and biases too
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        model.to(dtype).save_pretrained(directory)
    if family.config_json:
        path = directory / "config.json"
        saved = json.loads(path.read_text())
        for key, value in family.config_json.items():
            if value is None:
                saved.pop(key, None)
            else:
                saved[key] = value
        path.write_text(json.dumps(saved, indent=2))
    if family.tokenizer == "spm":
        args = ["spm", str(directory), "--vocab", "64"]
        subprocess.run([str(python), str(TOKENIZERS), *args], check=True, capture_output=True, timeout=300)
    else:  # GPT-2's tokenizer.json is the same for every family: made once, beside the converter
        made = converter / "gpt2-tokenizer"
        with _GPT2_LOCK:
            _gpt2_tokenizer(converter, made, python)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(made / name, directory / name)
        if family.added_tokens:
            _add_tokens(directory / "tokenizer.json", family.added_tokens)
    return directory


def _add_tokens(path: Path, contents: tuple[str, ...]) -> None:
    """Special tokens added to a tokenizer.json (at their vocabulary id where they have one, else after it)."""
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    new = len(vocab)
    for content in contents:
        token_id = vocab.get(content)
        if token_id is None:
            token_id, new = new, new + 1
        tokenizer["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": True})
    path.write_text(json.dumps(tokenizer))


def _gpt2_tokenizer(converter: Path, made: Path, python: Path) -> None:
    """GPT-2's tokenizer.json rebuilt from llama.cpp's ggml-vocab-gpt-2.gguf, once (then cached)."""
    if (made / "tokenizer.json").is_file():
        return
    staging = converter / f"gpt2-tokenizer.{os.getpid()}"
    staging.mkdir(exist_ok=True)
    vocab = converter / "llama.cpp" / "models" / "ggml-vocab-gpt-2.gguf"
    subprocess.run([str(python), str(TOKENIZERS), "gpt2", str(staging), "--vocab-file", str(vocab)],
                   check=True, capture_output=True, timeout=300)
    try:
        staging.rename(made)
    except OSError:  # made meanwhile by another process
        shutil.rmtree(staging, ignore_errors=True)


def converter_input(family: Family, directory: Path) -> Path:
    """The directory to hand llama.cpp's converter: `directory` itself, or a copy whose config.json names the class
    the converter registers (family.converter_class) where transformers' is spelled otherwise."""
    if family.converter_class is None:
        return directory
    copy = directory.parent / f"{directory.name}.for-llamacpp"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "architectures": [family.converter_class]}))
    return copy


def llamacpp_convert(jobs: list[tuple[Path, Path, str]], converter: Path) -> None:
    """convert_hf_to_gguf.py, unmodified, in its own environment: (HF directory, .gguf file, outtype) per job,
    all in one process (fixtures/gguf_convert_many.py)."""
    python = converter / "venv" / "bin" / "python"
    args = json.dumps([[str(hf), "--outfile", str(out), "--outtype", outtype] for hf, out, outtype in jobs])
    result = subprocess.run([str(python), str(CONVERT_MANY), str(converter / "llama.cpp" / "convert_hf_to_gguf.py"), args],
                            capture_output=True, text=True, timeout=1200,
                            env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    if result.returncode != 0:
        raise AssertionError(f"llama.cpp's converter failed:\n{result.stderr[-3000:]}")
