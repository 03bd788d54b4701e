"""`verify` of CohereForCausalLM (Command R), which litgpt cannot express (families_more.py COHERE): the reference
pass computes it as transformers 5.3's cohere/modeling_cohere.py does (CohereLayerNorm without a bias, one input
norm feeding attention and the MLP in parallel, rotary in pairs order, `logits * logit_scale`, the head tied),
`verify` tells a copy from a file whose Q/K rows of one layer are in the wrong rotary order, naming that layer;
and with use_qk_norm (a LayerNorm weight of its own for each query and key head) too; `convert` to litgpt, HF or
PEFT refuses it (GGUF: tests/test_gguf.py).

Oracle: transformers itself on tiny random models (every weight random, the norms too; float32; eager attention),
GQA with attention biases and a logit_scale that is not CohereConfig's default, MHA with the defaults, and Llama 3
RoPE scaling (CohereRotaryEmbedding scales the frequencies before they are repeat_interleave'd into pairs).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import LLAMA_SIZES, TOKENS, saved_random_model
from test_fused_verify import assert_fails_at_layer_1, assert_verifies_a_resharded_copy
from qkvconv.cli import app
from qkvconv.formats.weights import open_weights
from qkvconv.ops.verify import architecture
from qkvconv.reference import forward

transformers = pytest.importorskip("transformers")
runner = CliRunner()

CASES: dict[str, dict[str, Any]] = {
    "cohere-gqa": {"model_type": "cohere", **LLAMA_SIZES, "attention_bias": True, "logit_scale": 0.37,
                   "rope_theta": 10000.0},
    "cohere-defaults": {"model_type": "cohere", **LLAMA_SIZES, "num_key_value_heads": 4},
    "cohere-qk-norm": {"model_type": "cohere", **LLAMA_SIZES, "use_qk_norm": True, "logit_scale": 0.5},
    "cohere-llama3-rope": {"model_type": "cohere", **LLAMA_SIZES, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}},
}
IDS = list(CASES)


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class Built:
    directory: Path
    model: Any
    logits: torch.Tensor


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(case_id: str) -> Built:
        if case_id not in cache:
            directory = tmp_path_factory.mktemp(case_id)
            model, logits = saved_random_model(CASES[case_id], directory, attn_implementation="eager")
            cache[case_id] = Built(directory, model, logits)
        return cache[case_id]

    return get


def half_order(t: torch.Tensor, head_size: int) -> torch.Tensor:
    """Each head's rows (q_proj/k_proj weight or bias) moved from pairs order (dims 2i, 2i + 1 rotate together,
    as Cohere computes) to half order (dims i, i + d/2): the permutation a Llama-style converter applies."""
    heads = t.reshape(-1, head_size, *t.shape[1:])
    return torch.cat((heads[:, 0::2], heads[:, 1::2]), dim=1).reshape(t.shape).contiguous()


def test_the_family_is_read_as_transformers_builds_it(built) -> None:
    b = built("cohere-gqa")
    arch = architecture(open_weights(b.directory))
    assert (arch.norm_bias, arch.logit_scale, arch.rope_interleave) == (False, 0.37, True)
    assert (arch.parallel_residual, arch.shared_attention_norm, arch.qkv_bias, arch.proj_bias) == (True, True, True, True)
    assert (arch.n_head, arch.n_query_groups, arch.mlp_bias) == (4, 2, False)
    assert "lm_head.weight" not in load_file(b.directory / "model.safetensors")  # tied: the embedding is the head
    assert architecture(open_weights(built("cohere-defaults").directory)).logit_scale == 0.0625
    scaled = architecture(open_weights(built("cohere-llama3-rope").directory))
    assert (scaled.rope_scaling, scaled.rope_factor, scaled.rope_interleave) == ("llama3", 8.0, True)


@pytest.mark.parametrize("case_id", IDS)
def test_the_reference_pass_reproduces_transformers(case_id: str, built) -> None:
    b = built(case_id)
    weights = open_weights(b.directory)
    arch = architecture(weights)
    with torch.no_grad():
        logits = dict(forward.forward(arch, weights, TOKENS, dtype=torch.float32))["logits"]
    scale = b.logits.abs().max().item()
    assert (logits - b.logits).abs().max().item() <= 1e-5 * scale
    # each feature matters: off, the logits move past the tolerance (so the test can fail)
    scaled = () if arch.rope_scaling == "none" else ({"rope_scaling": "none"},)
    normed = ({"norm_qk": None},) if arch.norm_qk else ()
    for change in ({"logit_scale": 1.0}, {"rope_interleave": False}, *scaled, *normed):
        with torch.no_grad():
            moved = dict(forward.forward(replace(arch, **change), weights, TOKENS, dtype=torch.float32))["logits"]
        assert (moved - b.logits).abs().max().item() > 1e-5 * scale, change


@pytest.mark.parametrize("case_id", IDS)
def test_verify_passes_a_copy_and_names_the_layer_of_wrong_rotary_rows(case_id: str, built, tmp_path: Path) -> None:
    b = built(case_id)
    assert_verifies_a_resharded_copy(b.model, b.directory, tmp_path / "resharded", "20KB")

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(b.directory / "config.json", broken / "config.json")
    tensors = load_file(b.directory / "model.safetensors")
    head_size = LLAMA_SIZES["hidden_size"] // LLAMA_SIZES["num_attention_heads"]
    for proj in ("q_proj", "k_proj"):
        for kind in ("weight", "bias"):
            name = f"model.layers.1.self_attn.{proj}.{kind}"
            if name in tensors:
                tensors[name] = half_order(tensors[name], head_size)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert_fails_at_layer_1(b.directory, broken)


@pytest.mark.parametrize("case_id", IDS)
def test_convert_still_refuses(case_id: str, built, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", built(case_id).directory, "--to", "litgpt", "--out", out)
    assert result.exit_code == 2 and "CohereForCausalLM with" in result.output and "no litgpt equivalent" in result.output
    assert not out.exists()


def test_per_head_query_key_norms_are_read_as_transformers_holds_them(built) -> None:
    """use_qk_norm: q_norm (num_heads, head_dim) and k_norm (num_kv_heads, head_dim), a weight row per head."""
    b = built("cohere-qk-norm")
    weights = open_weights(b.directory)
    assert architecture(weights).norm_qk == "per_head"
    q, k = (weights(f"transformer.h.1.attn.norm_{x}.weight") for x in "qk")
    assert tuple(q.shape) == (4, 8) and tuple(k.shape) == (2, 8)
    assert torch.equal(q, b.model.model.layers[1].self_attn.q_norm.weight.detach())


def test_per_head_query_key_norms_are_not_reordered(built, tmp_path: Path) -> None:
    """A change that would move each head's dims or heads (rotary order, more K/V heads) is refused (exit 2)."""
    for args in (("--to", "gguf", "--rope", "half"), ("--to", "gguf", "--kv-heads", "4")):
        result = cli("convert", built("cohere-qk-norm").directory, *args, "--out", tmp_path / "x.gguf", "--json")
        assert result.exit_code == 2 and not (tmp_path / "x.gguf").exists(), result.output
