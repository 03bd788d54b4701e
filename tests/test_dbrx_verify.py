"""`verify` of DbrxForCausalLM, which litgpt cannot express (families_fused.py DBRX: LayerNorms without bias, QKV
clamped, a mixture of experts stacked in one parameter per linear): the reference pass computes it as DBRX's own
code does, `verify` tells a copy from one whose layer 1 is wrong (experts swapped, or Q/K rows in the other rotary
order), naming that layer, and refuses a router normalisation it does not compute; `convert` to litgpt refuses it.

Oracle: transformers 4.57's DbrxForCausalLM, run in llama.cpp's converter environment
(fixtures/venv_transformers_model.py), on a tiny random model whose experts are wider than d_model. transformers
5.3's computes another function (its experts multiply by the stored blocks untransposed, and it runs only where
ffn_hidden_size equals d_model); llama.cpp's runtime agrees with 4.57's (benchmarks/results/llamacpp_logits_*.txt).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gguf_oracle import BY_ID, VENV_MODEL, converter_dir
from hf_models import TOKENS
from test_cohere_verify import half_order
from test_fused_verify import cli
from qkvconv.formats.weights import open_weights
from qkvconv.ops.verify import architecture
from qkvconv.reference import forward

SETTINGS = {**BY_ID["dbrx"].hf, "vocab_size": 96}
N_EXPERT, FFN = 4, 48


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """The model saved by transformers 4.57, and its logits of TOKENS there."""
    python = str(converter_dir() / "venv" / "bin" / "python")
    root = tmp_path_factory.mktemp("dbrx")
    directory = root / "hf"
    subprocess.run([python, str(VENV_MODEL), "build", json.dumps(SETTINGS), str(directory)], check=True,
                   capture_output=True, timeout=600)
    subprocess.run([python, str(VENV_MODEL), "logits", str(directory), json.dumps(TOKENS.tolist()),
                    str(root / "logits.npy")], check=True, capture_output=True, timeout=600)
    return directory, torch.from_numpy(np.load(root / "logits.npy"))


def test_the_reference_pass_reproduces_transformers_457(dbrx) -> None:
    directory, want = dbrx
    weights = open_weights(directory)
    arch = architecture(weights)
    assert (arch.n_expert, arch.n_expert_per_token, arch.norm_bias, arch.clip_qkv) == (N_EXPERT, 2, False, 0.6)
    with torch.no_grad():
        logits = dict(forward.forward(arch, weights, TOKENS, dtype=torch.float32))["logits"]
    scale = want.abs().max().item()
    assert (logits - want).abs().max().item() <= 1e-5 * scale
    # each feature matters: off, the logits move past the tolerance (so the test can fail)
    for change in ({"clip_qkv": None}, {"n_expert_per_token": 1}, {"rope_interleave": True}):
        with torch.no_grad():
            moved = dict(forward.forward(replace(arch, **change), weights, TOKENS, dtype=torch.float32))["logits"]
        assert (moved - want).abs().max().item() > 1e-5 * scale, change


def test_verify_passes_a_copy_and_names_the_layer_of_wrong_experts_or_rows(dbrx, tmp_path: Path) -> None:
    directory, _ = dbrx
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    result = cli("verify", directory, copy, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["logits_max_abs_diff"] == 0.0, result.output
    tensors = load_file(directory / "model.safetensors")
    stacked = "transformer.blocks.1.ffn.experts.mlp.{}"
    swapped = {**tensors}  # experts 0 and 1 of w2 (the down projection) trade places
    w2 = tensors[stacked.format("w2")].reshape(N_EXPERT, FFN, -1)
    swapped[stacked.format("w2")] = w2[[1, 0, 2, 3]].reshape(N_EXPERT * FFN, -1).contiguous()
    transposed = {**tensors}  # each w2 block read as [d_model, ffn] would be: transposed in place of its block
    blocks = w2.reshape(N_EXPERT, -1, FFN).transpose(1, 2).reshape(N_EXPERT * FFN, -1)
    transposed[stacked.format("w2")] = blocks.contiguous()
    qkv = "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight"
    rotary = {**tensors, qkv: torch.cat([half_order(tensors[qkv][:48], 8), tensors[qkv][48:]])}  # Q and K heads
    # a MoE layer's stages: its router's choice, its experts' output, the layer; the first that differs is named
    for name, changed, where in (("swapped", swapped, "layer 1 experts"), ("transposed", transposed, "layer 1 experts"),
                                 ("rotary", rotary, "layer 1 router")):
        broken = tmp_path / name
        broken.mkdir()
        shutil.copy(directory / "config.json", broken / "config.json")
        save_file(changed, broken / "model.safetensors", metadata={"format": "pt"})
        result = cli("verify", directory, broken, "--json")
        report = json.loads(result.output)
        assert result.exit_code == 1 and report["first_difference"] == where, (name, result.output)
        names = [s["name"] for s in report["stages"]]
        assert all(s["within"] for s in report["stages"][:names.index(where)]), (name, names)  # embed, layer 0


@pytest.mark.parametrize("normalize", [2.0, None])
def test_router_normalisation_other_than_the_sum_is_refused(dbrx, tmp_path: Path, normalize) -> None:
    """moe_normalize_expert_weights p divides the chosen weights by their p-norm (None: not divided); the reference
    pass, like litgpt and llama.cpp, divides by their sum only (p = 1): verify says so (exit 2)."""
    directory, _ = dbrx
    other = tmp_path / "other"
    shutil.copytree(directory, other)
    config = json.loads((other / "config.json").read_text())
    config["ffn_config"]["moe_normalize_expert_weights"] = normalize
    (other / "config.json").write_text(json.dumps(config))
    result = cli("verify", other, other, "--json")
    assert result.exit_code == 2 and "moe_normalize_expert_weights" in json.loads(result.output)["error"]


def test_convert_to_litgpt_refuses(dbrx, tmp_path: Path) -> None:
    directory, _ = dbrx
    result = cli("convert", directory, "--to", "litgpt", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 2 and "LayerNorms without a bias" in json.loads(result.output)["error"]
    assert not (tmp_path / "out").exists()
