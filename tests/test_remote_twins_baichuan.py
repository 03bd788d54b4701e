"""Baichuan / Baichuan 2 (remote code) -> LlamaForCausalLM, exactly, with `--variant` where config.json cannot tell.

Built from a tiny random Llama twin by the layout facts (W_pack = [q; k; v] thirds, Llama's other names, the
remote config's keys); the W_pack reading is checked by running llama.cpp's own BaichuanModel un-packing on it.
Baichuan 2's head is stored un-normalised (rows scaled at random) and normalised at run time: the twin holds the
normalised rows, so only the baichuan2 variant reproduces its logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import LLAMA_SIZES, TOKENS, hf_logits
from test_remote_twins import llama_cpp, build_twin, cli, exact

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A tiny MHA Llama whose head rows have unit norm (what Baichuan 2 computes with), and its logits."""
    directory, _, _ = build_twin(tmp_path_factory.mktemp("llama"), model_type="llama",
                                 **{**LLAMA_SIZES, "num_key_value_heads": 4}, rms_norm_eps=1e-6,
                                 tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight))
        logits = model.eval()(TOKENS).logits
    model.save_pretrained(directory)
    return directory, load_file(directory / "model.safetensors"), logits


def baichuan_from_llama(tensors: dict, directory: Path, normalised_head: bool) -> dict:
    """Baichuan's files: W_pack thirds, Llama's other names; Baichuan 2's head with rows scaled (0.5 to 3)."""
    out = {k: v for k, v in tensors.items() if ".self_attn.q_proj" not in k and ".self_attn.k_proj" not in k
           and ".self_attn.v_proj" not in k}
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        out[f"{p}.W_pack.weight"] = torch.cat([tensors[f"{p}.{x}_proj.weight"] for x in "qkv"])
    if normalised_head:
        scales = torch.rand(out["lm_head.weight"].shape[0], 1, generator=torch.Generator().manual_seed(5)) * 2.5 + 0.5
        out["lm_head.weight"] = out["lm_head.weight"] * scales
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
              "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                           "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
              "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2,
              "vocab_size": 96, "model_max_length": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    return out


def test_w_pack_agrees_with_llama_cpp(twin, tmp_path) -> None:
    """llama.cpp's BaichuanModel.modify_tensors un-packs our W_pack into the twin's q, k, v (q and k in its pairs
    order: LlamaModel.permute of the twin's)."""
    tree = llama_cpp()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    try:
        from conversion.baichuan import BaichuanModel
        from conversion.llama import LlamaModel
    finally:
        del sys.path[:2]
    _, tensors, _ = twin
    ours = baichuan_from_llama(tensors, tmp_path / "b", normalised_head=False)
    converter = object.__new__(BaichuanModel)
    converter.hparams = {"num_attention_heads": 4}
    converter.format_tensor_name = lambda kind, bid: f"{kind.name}.{bid}"
    got = dict(converter.modify_tensors(ours["model.layers.1.self_attn.W_pack.weight"],
                                        "model.layers.1.self_attn.W_pack.weight", 1))
    p = "model.layers.1.self_attn"
    assert torch.equal(got["ATTN_Q.1"], LlamaModel.permute(tensors[f"{p}.q_proj.weight"], 4, 4))
    assert torch.equal(got["ATTN_K.1"], LlamaModel.permute(tensors[f"{p}.k_proj.weight"], 4, 4))
    assert torch.equal(got["ATTN_V.1"], tensors[f"{p}.v_proj.weight"])


@pytest.mark.parametrize("generation", [1, 2])
def test_baichuan_7b_converts_to_llama_exactly(twin, tmp_path, generation: int) -> None:
    twin_dir, tensors, logits = twin
    source = tmp_path / "baichuan"
    baichuan_from_llama(tensors, source, normalised_head=generation == 2)
    variant = "baichuan-7b" if generation == 1 else "baichuan2-7b"
    # without a name: refused (inspect still names the layout), one line, nothing written
    refused = cli("convert", source, "--to", "hf", "--out", tmp_path / "out")
    assert refused.exit_code == 2 and "--variant baichuan-7b | baichuan2-7b" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    report = json.loads(cli("inspect", source, "--json").output)
    assert (report["qkv_order"], report["n_query_groups"]) == ("sequential", 4) and "--variant" in report["notes"][0]
    named = json.loads(cli("inspect", source, "--json", "--variant", variant).output)
    assert "positions: rotary, half order" in " | ".join(named["evidence"])
    out = tmp_path / "llama"
    result = cli("convert", source, "--to", "hf", "--out", out, "--variant", variant)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and not any(k.startswith("qkvconv") for k in config)
    assert exact(hf_logits(out), logits)
    assert sorted(load_file(out / "model.safetensors")) == sorted(tensors)
    if generation == 2:  # read as Baichuan 1, the head keeps its scaled rows: another model
        assert cli("convert", source, "--to", "hf", "--out", tmp_path / "b1", "--variant", "baichuan-7b").exit_code == 0
        assert not exact(hf_logits(tmp_path / "b1"), logits)


def test_baichuan_13b_and_unknown_names_are_refused(twin, tmp_path) -> None:
    _, tensors, _ = twin
    source = tmp_path / "baichuan"
    baichuan_from_llama(tensors, source, normalised_head=True)
    for variant, why in (("baichuan2-13b", "ALiBi"), ("baichuan-13b", "ALiBi"), ("baichuan3", "has baichuan-7b")):
        result = cli("convert", source, "--to", "hf", "--out", tmp_path / "out", "--variant", variant)
        assert result.exit_code == 2 and why in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_peft_adapter_on_w_pack(twin, tmp_path) -> None:
    """A PEFT LoRA on W_pack becomes q/k/v adapters of the Llama twin; the base needs its --variant too."""
    from qkvconv.model.layout import HeadLayout
    from test_remote_twins_mlp import check_fused_adapter

    twin_dir, tensors, _ = twin
    baichuan_from_llama(tensors, tmp_path / "baichuan", normalised_head=True)
    check_fused_adapter(twin_dir, tensors, tmp_path / "baichuan", "model.layers.{i}.self_attn.W_pack",
                        HeadLayout(4, 4, 8), tmp_path, "--variant", "baichuan2-7b")
