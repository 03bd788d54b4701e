"""`verify` of the transformers-native fused-QKV classes that litgpt cannot express (families_fused.py): the
reference pass computes them as transformers 5.3 does, `verify` tells a copy from a file with wrongly ordered QKV
rows, and `convert` still refuses them.

Oracle: transformers itself, on tiny random models (every weight, norm and bias random, so nothing is trivially
1 or 0; float32; eager attention, which is what these classes define), one build per class for the module.
Settings that exercise the features: ALiBi with 6 heads (not a power of two: both slope schemes' extra-head
branch), MPT's clip_qkv small enough to clamp and a softmax_scale of its own, CodeGen with 2 heads per mp_num
block and 4 of 6 dims rotating, Persimmon's q/k LayerNorms.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import POSITIONS, TOKENS, VOCAB, saved_random_model
from qkvconv.cli import app
from qkvconv.formats.hf import detect_family
from qkvconv.formats.hf.config import _heads
from qkvconv.formats.weights import open_weights
from qkvconv.model.layout import LayoutError, QKVOrder, fuse, reorder, same_rows, split
from qkvconv.ops.verify import architecture
from qkvconv.reference import alibi, forward

transformers = pytest.importorskip("transformers")
runner = CliRunner()
GPT2_SIZES = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=POSITIONS)

CASES: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", **GPT2_SIZES},
    "gpt-bigcode-mqa": {"model_type": "gpt_bigcode", **GPT2_SIZES, "multi_query": True},
    "gpt-bigcode-mha": {"model_type": "gpt_bigcode", **GPT2_SIZES, "multi_query": False},
    "bloom": {"model_type": "bloom", "hidden_size": 48, "n_layer": 2, "n_head": 6, "vocab_size": VOCAB},
    "mpt": {"model_type": "mpt", "d_model": 48, "n_layers": 2, "n_heads": 6, "vocab_size": VOCAB, "max_seq_len": POSITIONS,
            "attn_config": {"clip_qkv": 0.6, "softmax_scale": 0.3}},
    "persimmon": {"model_type": "persimmon", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 48, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS},
    "codegen": {"model_type": "codegen", "n_embd": 48, "n_layer": 2, "n_head": 8, "vocab_size": VOCAB,
                "n_positions": POSITIONS, "rotary_dim": 4},
}
IDS = list(CASES)


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class Built:
    directory: Path
    config_json: dict[str, Any]
    model: Any
    logits: torch.Tensor


def _build(case_id: str, directory: Path) -> Built:
    model, logits = saved_random_model(CASES[case_id], directory, attn_implementation="eager")
    return Built(directory, json.loads((directory / "config.json").read_text()), model, logits)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(case_id: str) -> Built:
        if case_id not in cache:
            cache[case_id] = _build(case_id, tmp_path_factory.mktemp(case_id))
        return cache[case_id]

    return get


def _qkv(b: Built, layer: int) -> tuple[Any, Any, str]:
    family = detect_family(b.config_json)
    _, heads = _heads(family, b.config_json)
    return family, heads, f"{family.layer_prefix.format(i=layer)}.{family.qkv.name}"


def wrong_order(t: torch.Tensor, order: QKVOrder, heads: Any, transposed: bool) -> torch.Tensor:
    """The same rows written in another order of the same shape (per-head written sequentially, ...); where the
    heads allow one order only (multi-query), K and V swapped."""
    rows = t.T if transposed and t.dim() == 2 else t
    for other in QKVOrder:
        try:
            if other is QKVOrder.SPLIT or same_rows(other, order, heads):
                continue
            out = reorder(rows, order, other, heads)
            break
        except LayoutError:
            continue
    else:
        q, k, v = split(rows, order, heads)
        out = fuse(q, v, k, order, heads)
    assert out.shape == rows.shape and not torch.equal(out, rows)
    return out.T.contiguous() if transposed and t.dim() == 2 else out.contiguous()


def rewritten(b: Built, directory: Path, layers: list[int], write: Any) -> Path:
    """A copy of b's checkpoint whose fused QKV tensors (weight, bias) in `layers` are rewritten by `write`."""
    directory.mkdir()
    shutil.copy(b.directory / "config.json", directory / "config.json")
    tensors = load_file(b.directory / "model.safetensors")
    for layer in layers:
        family, heads, name = _qkv(b, layer)
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in tensors:
                tensors[f"{name}.{kind}"] = write(tensors[f"{name}.{kind}"], family.qkv, heads)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("case_id", IDS)
def test_the_reference_pass_reproduces_transformers(case_id: str, built) -> None:
    b = built(case_id)
    weights = open_weights(b.directory)
    arch = architecture(weights)
    with torch.no_grad():
        logits = dict(forward.forward(arch, weights, TOKENS, dtype=torch.float32))["logits"]
    scale = b.logits.abs().max().item()
    assert (logits - b.logits).abs().max().item() <= 1e-5 * scale
    # the features are what make it so: each one off moves the logits past the tolerance (so the test can fail)
    for field, off in (("alibi", None), ("learned_positions", False), ("embedding_norm", False), ("clip_qkv", None),
                       ("mlp_activation", "gelu"), ("norm_qk", None), ("rope_interleave", not arch.rope_interleave)):
        if getattr(arch, field) == off or (field == "rope_interleave" and not arch.rope_n_elem):
            continue
        with torch.no_grad():
            moved = dict(forward.forward(replace(arch, **{field: off}), weights, TOKENS, dtype=torch.float32))["logits"]
        assert (moved - b.logits).abs().max().item() > 1e-5 * scale, field


@pytest.mark.parametrize("case_id", IDS)
def test_verify_passes_a_copy_and_names_the_layer_of_wrong_rows(case_id: str, built, tmp_path: Path) -> None:
    b = built(case_id)
    assert_verifies_a_resharded_copy(b.model, b.directory, tmp_path / "resharded", "40KB")
    broken = rewritten(b, tmp_path / "broken", [1], lambda t, qkv, heads: wrong_order(t, qkv.order, heads, qkv.transposed))
    assert_fails_at_layer_1(b.directory, broken)


def assert_verifies_a_resharded_copy(model: Any, directory: Path, copy: Path, shard: str) -> None:
    """`verify` of a model against itself saved in shards: exit 0, nothing differs."""
    model.save_pretrained(copy, max_shard_size=shard)
    assert (copy / "model.safetensors.index.json").is_file()
    result = cli("verify", directory, copy, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["first_difference"] is None


def assert_fails_at_layer_1(directory: Path, broken: Path) -> None:
    """`verify` of a copy whose layer 1 is wrong: exit 1 naming layer 1 (embed and layer 0 agree), with and
    without --json (one document)."""
    result = cli("verify", directory, broken, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["first_difference"] == "layer 1" and not report["passed"]
    assert [s["within"] for s in report["stages"][:2]] == [True, True]  # embed, layer 0
    text = cli("verify", directory, broken)
    assert text.exit_code == 1 and "layer 1" in text.output


@pytest.mark.parametrize("case_id", ["gpt2", "bloom", "codegen"])
def test_files_named_as_on_the_hub_are_read_as_transformers_loads_them(case_id: str, built, tmp_path: Path) -> None:
    """GPT-2's and Bloom's files on the Hub hold the base model's names (`h.0...`, no `transformer.`), GPT-2's and
    CodeGen's their causal-mask buffers: transformers loads such a file as the same model, and so does verify (and
    still names the layer of wrong rows in one)."""
    b = built(case_id)
    tensors = load_file(b.directory / "model.safetensors")
    P = POSITIONS
    if case_id == "codegen":  # Salesforce's names keep the prefix, with attn.causal_mask
        hub = {**tensors, **{f"transformer.h.{i}.attn.causal_mask": torch.ones(1, 1, P, P, dtype=torch.bool).tril()
                             for i in range(2)}}
    else:
        hub = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        if case_id == "gpt2":
            hub.update({f"h.{i}.attn.bias": torch.ones(1, 1, P, P, dtype=torch.bool).tril() for i in range(2)})
            hub.update({f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)})
    directory = tmp_path / "hub"
    directory.mkdir()
    shutil.copy(b.directory / "config.json", directory / "config.json")
    save_file(hub, directory / "model.safetensors", metadata={"format": "pt"})
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, b.logits)
    result = cli("verify", b.directory, directory, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(cli("verify", directory, b.directory, "--json").output)["passed"]
    inspected = [json.loads(cli("inspect", d, "--json").output) for d in (b.directory, directory)]
    assert [(r["qkv_order"], r["n_head"], r["n_layer"]) for r in inspected] == \
        [(inspected[0]["qkv_order"], 6 if case_id == "bloom" else 4 if case_id == "gpt2" else 8, 2)] * 2

    name = next(n for n in hub if ".1." in n and ("c_attn.weight" in n or "query_key_value.weight" in n
                                                   or "qkv_proj.weight" in n))
    family, heads, _ = _qkv(b, 1)
    hub[name] = wrong_order(hub[name], family.qkv.order, heads, family.qkv.transposed)
    save_file(hub, directory / "model.safetensors", metadata={"format": "pt"})
    report = json.loads(cli("verify", b.directory, directory, "--json").output)
    assert report["first_difference"] == "layer 1"


def test_gpt_bigcode_multi_head_is_read_per_head_and_the_other_reading_fails(built, tmp_path: Path) -> None:
    """transformers reads GPT-BigCode MHA's c_attn per head, llama.cpp sequentially: a file of the same model
    written with its rows in sequential order is another function, and verify against the trusted copy says so at
    the first layer, naming the reading it used."""
    b = built("gpt-bigcode-mha")
    sequential = rewritten(b, tmp_path / "sequential", [0, 1],
                           lambda t, qkv, heads: reorder(t, QKVOrder.PER_HEAD, QKVOrder.SEQUENTIAL, heads))
    result = cli("verify", b.directory, sequential, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["first_difference"] == "layer 0"
    readings = [n for n in report["notes"] if "c_attn read in per-head order, as transformers reads it" in n]
    assert [n.split(":")[0] for n in readings] == ["reference", "candidate"]
    assert "sequential by llama.cpp" in readings[0]
    text = cli("verify", b.directory, sequential)
    assert "read in per-head order" in " ".join(text.output.split())
    # the multi-query class has one reading: no such note
    mqa = built("gpt-bigcode-mqa")
    assert json.loads(cli("verify", mqa.directory, mqa.directory, "--json").output)["notes"] == []


@pytest.mark.parametrize("case_id", IDS + ["dbrx"])
def test_convert_still_refuses(case_id: str, built, tmp_path: Path) -> None:
    if case_id == "dbrx":
        directory = _dbrx(tmp_path)
    else:
        directory = built(case_id).directory
    config_json = json.loads((directory / "config.json").read_text())
    family = detect_family(config_json)
    features = family.refused_features(config_json)
    assert features  # what litgpt lacks, as the table says it
    for target in ("litgpt", "hf"):
        out = tmp_path / f"out-{target}"
        result = cli("convert", directory, "--to", target, "--out", out, "--json")
        assert result.exit_code == 2, result.output
        error = json.loads(result.output)["error"]
        assert error.startswith(f"{family.architecture} with ") and "has no litgpt equivalent" in error
        assert all(feature in error for feature in features)
        assert not out.exists()


def _dbrx(tmp_path: Path) -> Path:
    """A tiny DBRX saved by transformers 5.3 (which runs only ffn_hidden_size == d_model; its verify:
    tests/test_dbrx_verify.py)."""
    config = transformers.AutoConfig.for_model(
        model_type="dbrx", d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seq_len=POSITIONS,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "hidden_size": 32, "moe_num_experts": 2, "moe_top_k": 1})
    directory = tmp_path / "dbrx"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_settings_the_pass_does_not_compute_are_refused(built, tmp_path: Path) -> None:
    """A GPT-2 whose scores are divided by the layer number is another function: verify says so (exit 2) instead
    of comparing it as plain GPT-2."""
    b = built("gpt2")
    other = tmp_path / "scaled"
    shutil.copytree(b.directory, other)
    (other / "config.json").write_text(json.dumps({**b.config_json, "scale_attn_by_inverse_layer_idx": True}))
    result = cli("verify", b.directory, other)
    assert result.exit_code == 2 and "scale_attn_by_inverse_layer_idx" in result.output


@pytest.mark.parametrize("n_head", range(1, 65))
def test_alibi_slopes_are_transformers(n_head: int) -> None:
    """Both slope schemes, bit for bit, for every head count up to 64 (the non-powers of two take the extra
    branches), with the biases' key positions."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    T = 7
    bloom = build_alibi_tensor(torch.ones(1, T), n_head, torch.float32)  # (n_head, 1, T)
    assert torch.equal(alibi.bias("bloom", n_head, T, torch.device("cpu")), bloom)
    mpt = build_mpt_alibi_tensor(n_head, 16)[:, :, -T:]  # MptAttention's slice for T keys of max_seq_len 16
    assert torch.equal(alibi.bias("mpt", n_head, T, torch.device("cpu")), mpt)
    # with alibi_bias_max 8 the two schemes give the same slopes (rounded apart)
    assert torch.allclose(alibi.slopes("bloom", n_head), alibi.slopes("mpt", n_head), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["gelu_new", "gelu_pytorch_tanh", "gelu", "relu2"])
def test_activations_are_transformers(name: str) -> None:
    from transformers.activations import ACT2FN
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

    from qkvconv.formats.hf.pieces import REFERENCE_ACTIVATIONS
    from qkvconv.reference.forward import _activation

    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 4
    arch = forward.Architecture.from_litgpt_config({"name": "x", "n_layer": 1, "n_embd": 16, "n_head": 2})
    activation, approximate = REFERENCE_ACTIVATIONS[name]
    got = _activation(replace(arch, mlp_activation=activation, gelu_approximate=approximate), x)
    assert torch.equal(got, ACT2FN[name](x))
    bloom = _activation(replace(arch, mlp_activation="gelu_bloom"), x)
    assert torch.equal(bloom, bloom_gelu_forward(x))
    assert not math.isclose(float((bloom - ACT2FN["gelu"](x)).abs().max()), 0.0, abs_tol=1e-6)


FRESH_PROCESSES = 32
SELF_VERIFY = ("import sys; from pathlib import Path; from qkvconv.formats.weights import open_weights; "
               "from qkvconv.ops.verify import verify; d = Path(sys.argv[1]); "
               "print(max(s.max_abs_diff for s in verify(open_weights(d), open_weights(d)).stages))")


def test_bloom_verifies_against_itself_bit_for_bit_in_every_fresh_process(built):
    """A model against itself is exactly 0 in every process, not just in most.

    Bloom's GELU over (2, 16, 192) is parallel work, and it was the process's first vector-math call (tanh):
    in about 1 fresh process of 12 on a 2-core machine, the threads' race for MKL's code path left the
    reference side's GELU a few ulp off the candidate's, and verify failed (2.5e-5 of scale at layer 0). One
    process at a time (run two at once and the race was not seen in 96): without forward.settle_math, 2 of 40
    such processes failed, so 32 see it about 4 times in 5."""
    import subprocess
    import sys

    directory = built("bloom").directory
    diffs = [subprocess.run([sys.executable, "-c", SELF_VERIFY, str(directory)], capture_output=True, text=True,
                            check=True).stdout.strip() for _ in range(FRESH_PROCESSES)]
    assert diffs == ["0.0"] * FRESH_PROCESSES
