"""`verify` and `convert --to gguf` of JAIS (JAISLMHeadModel, remote code: families_remote.py JAIS). No transformers
class computes it, so the oracle here is a plain-torch transcription of vLLM's port of its modeling_jais.py
(vllm/model_executor/models/jais.py, read through `search`): Conv1D linears with biases, `qkv.chunk(3)`, scores
times head_dim ** -1 (mup_scale_qk_dot_by_d) plus ALiBi of the standard slopes, `c_fc(x) * silu(c_fc2(x))`,
embeddings times mup_embeddings_scale, logits times mup_output_alpha * mup_width_scale. llama.cpp's converter and
runtime are the oracles of its GGUF (tests/test_gguf.py, benchmarks/results/llamacpp_logits_h200_host.txt)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gguf_oracle import JAIS_CONFIG, jais_files
from hf_models import TOKENS
from test_fused_verify import cli
from qkvconv.formats.weights import open_weights
from qkvconv.ops.verify import architecture
from qkvconv.reference import forward


def _alibi_slopes(n: int) -> list[float]:  # vLLM's _get_alibi_slopes
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _alibi_slopes(2 * closest)[0::2][: n - closest]


def vllm_jais_logits(t: dict[str, torch.Tensor], cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """JAISLMHeadModel's forward as vLLM's port computes it, written out (float32, no cache)."""
    d, H = cfg["n_embd"], cfg["n_head"]
    hd, eps = d // H, cfg["layer_norm_epsilon"]
    scale = hd ** -(1.0 if cfg["mup_scale_qk_dot_by_d"] else 0.5)
    slopes = torch.tensor(_alibi_slopes(H))
    T = tokens.shape[-1]
    pos = torch.arange(T)
    alibi = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])  # slope * (key - query)
    causal = torch.full((T, T), float("-inf")).triu(1)
    x = F.embedding(tokens, t["transformer.wte.weight"]) * cfg["mup_embeddings_scale"]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (d,), t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        q, k, v = (h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]).chunk(3, dim=-1)
        q, k, v = (z.view(*z.shape[:-1], H, hd).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * scale + alibi + causal, dim=-1) @ v
        att = att.transpose(1, 2).reshape(*x.shape)
        x = x + att @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (d,), t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        up = h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]
        gate = h @ t[p + "mlp.c_fc2.weight"] + t[p + "mlp.c_fc2.bias"]
        x = x + (up * F.silu(gate)) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (d,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    head = t.get("lm_head.weight", t["transformer.wte.weight"])
    return x @ head.T * (cfg["mup_output_alpha"] * cfg["mup_width_scale"])


def _jais(directory: Path, **changes) -> Path:
    jais_files({**JAIS_CONFIG, **changes}, directory)
    return directory


@pytest.mark.parametrize("changes", [{}, {"mup_scale_qk_dot_by_d": False}, {"n_head": 8}, {"n_head": 6, "n_embd": 48}])
def test_the_reference_pass_computes_vllms_jais(tmp_path: Path, changes: dict) -> None:
    directory = _jais(tmp_path / "jais", **changes)
    weights = open_weights(directory)
    with torch.no_grad():
        logits = dict(forward.forward(architecture(weights), weights, TOKENS, dtype=torch.float32))["logits"]
    want = vllm_jais_logits(load_file(directory / "model.safetensors"), {**JAIS_CONFIG, **changes}, TOKENS)
    assert (logits - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_c_fc_and_c_fc2_are_not_interchangeable(tmp_path: Path) -> None:
    """SwiGLU gates with c_fc2 (`c_fc(x) * silu(c_fc2(x))`): a copy with the two swapped fails at layer 0."""
    directory = _jais(tmp_path / "jais")
    swapped = tmp_path / "swapped"
    shutil.copytree(directory, swapped)
    t = load_file(directory / "model.safetensors")
    for kind in ("weight", "bias"):
        a, b = f"transformer.h.0.mlp.c_fc.{kind}", f"transformer.h.0.mlp.c_fc2.{kind}"
        t[a], t[b] = t[b], t[a]
    save_file(t, swapped / "model.safetensors", metadata={"format": "pt"})
    result = cli("verify", directory, swapped, "--json")
    assert result.exit_code == 1 and json.loads(result.output)["first_difference"] == "layer 0", result.output


def test_the_slopes_buffer_is_skipped(tmp_path: Path) -> None:
    """relative_pe.slopes (a buffer some checkpoints hold) is not a weight: the same model with it verifies at 0."""
    plain = _jais(tmp_path / "plain")
    with_buffer = tmp_path / "buffer"
    jais_files(JAIS_CONFIG, with_buffer, slopes_buffer=True)
    result = cli("verify", plain, with_buffer, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["logits_max_abs_diff"] == 0.0, result.output


@pytest.mark.parametrize("changes,why", [
    ({"position_embedding_type": "learned"}, "learned absolute positions"),
    ({"activation_function": "gelu"}, "an MLP other than SwiGLU"),
])
def test_settings_verify_does_not_compute_are_refused(tmp_path: Path, changes: dict, why: str) -> None:
    directory = _jais(tmp_path / "jais", **changes)
    result = cli("verify", directory, directory, "--json")
    assert result.exit_code == 2 and why in json.loads(result.output)["error"], result.output


def test_scores_by_the_square_root_are_not_written(tmp_path: Path) -> None:
    """llama.cpp's jais scales Q·K by 1/head_size whatever the model: a JAIS without mup_scale_qk_dot_by_d is
    refused (exit 2), nothing written."""
    directory = _jais(tmp_path / "jais", mup_scale_qk_dot_by_d=False)
    result = cli("convert", directory, "--to", "gguf", "--out", tmp_path / "x.gguf", "--json")
    assert result.exit_code == 2 and "head_size ** -1" in json.loads(result.output)["error"], result.output
    assert not (tmp_path / "x.gguf").exists()


def test_a_tied_head_is_written_as_output_times_the_logit_scale(tmp_path: Path) -> None:
    """llama.cpp's jais requires `output`; a tied JAIS (no lm_head in its files) gets the embedding times
    mup_output_alpha * mup_width_scale there, and token_embd the embedding times mup_embeddings_scale."""
    directory = _jais(tmp_path / "jais", tie_word_embeddings=True)
    t = load_file(directory / "model.safetensors")
    del t["lm_head.weight"]
    save_file(t, directory / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "tied.gguf"
    result = cli("convert", directory, "--to", "gguf", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    written = {x.name: np.array(x.data) for x in gguf.GGUFReader(out).tensors}
    wte = t["transformer.wte.weight"]
    assert np.array_equal(written["output.weight"], (wte * (1.5 * 0.25)).numpy())
    assert np.array_equal(written["token_embd.weight"], (wte * 3.5).numpy())
    assert cli("verify", directory, out).exit_code == 0
