"""PEFT LoRA adapters on GPT-2's Conv1D modules (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, stored
[in, out]: PEFT's fan_in_fan_out). `inspect` names their layout; `verify` computes them on their base as PEFT does,
passes PEFT's own merge and fails the wrong merges a careless tool makes, naming the layer: lora_B @ lora_A added
to the [in, out] storage untransposed (what llama.cpp's LoRA converter makes of GPT-2's square c_proj), and
reshaped into it where the shapes forbid that (c_attn); a fan_in_fan_out that disagrees with a module's class is
read as PEFT reads it (PEFT sets it per module and saves such configs itself); `convert` refuses them.

Oracles: peft 0.21 (get_peft_model, save_pretrained, PeftModel.from_pretrained, merge_and_unload) on a tiny
GPT2LMHeadModel with random weights, norms and biases (float32, eager attention), random nonzero lora_A and lora_B.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peft_models import saved_random_adapter
from qkvconv.cli import app
from qkvconv.formats.weights import open_weights
from qkvconv.ops.verify import architecture
from qkvconv.reference import forward

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

runner = CliRunner()
VOCAB, POSITIONS = 96, 64
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": POSITIONS}
ADAPTERS: dict[str, dict[str, Any]] = {
    # "c_proj" selects attn.c_proj and mlp.c_proj; attn.c_proj is square (n_embd, n_embd)
    "attn-mlp": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "rslora-patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                            rank_pattern={"c_fc": 2}, alpha_pattern={"c_attn": 6}),
    "layer-1": dict(r=3, lora_alpha=5, target_modules=["c_attn"], layers_to_transform=[1]),
}
PREFIX = "base_model.model."


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _load(directory: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**GPT2),
                                                          attn_implementation="eager")
    with torch.no_grad():  # nonzero random everything: norms and biases too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return directory


@dataclass
class Adapter:
    directory: Path
    logits: torch.Tensor  # PeftModel's: the oracle
    model: Any  # the PeftModel


def make_adapter(base: Path, directory: Path, settings: dict[str, Any], seed: int = 0) -> Adapter:
    """peft's adapter on the GPT-2 base, lora_A and lora_B random and nonzero, saved (base_model_name_or_path: the
    base's directory, as peft writes it)."""
    pm, logits = saved_random_adapter(_load(base), directory, peft.LoraConfig(lora_dropout=0.1, **settings), seed)
    return Adapter(directory, logits, pm)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    cache: dict[str, Adapter] = {}

    def get(case: str) -> Adapter:
        if case not in cache:
            cache[case] = make_adapter(base, tmp_path_factory.mktemp(case) / "adapter", ADAPTERS[case])
        return cache[case]

    return get


def peft_merged(base: Path, adapter: Path, directory: Path) -> Path:
    """PeftModel(base, adapter).merge_and_unload(), saved: what users ship as the merged model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(_load(base), adapter).merge_and_unload().save_pretrained(directory)
    return directory


def reference_logits(directory: Path, **kw: Any) -> torch.Tensor:
    weights = open_weights(directory, **kw)
    with torch.no_grad():
        return dict(forward.forward(architecture(weights), weights, TOKENS, dtype=torch.float32))["logits"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_verify_computes_the_adapter_as_peft_does(case: str, base: Path, adapters, tmp_path: Path) -> None:
    a = adapters(case)
    scalings = {m.scaling["default"] for m in a.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(scalings) == (3 if case == "rslora-patterns" else 1)  # alpha / sqrt(r), per module
    assert close(reference_logits(a.directory), a.logits)  # base + adapter, read from the files, as PeftModel
    assert not close(reference_logits(base), a.logits)  # the adapter matters: the test can fail
    merged = peft_merged(base, a.directory, tmp_path / "merged")
    for sides in ((a.directory, merged), (merged, a.directory)):
        result = cli("verify", *sides, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["passed"] and any("Conv1D" in n for n in report["notes"])
    result = cli("verify", a.directory, base, "--json")  # the base alone is not base + adapter
    assert result.exit_code == 1
    assert json.loads(result.output)["first_difference"] == ("layer 1" if case == "layer-1" else "layer 0")


def _delta(adapter: Path, module: str) -> torch.Tensor:
    """PEFT's update of `module` (plain r and alpha) as a Linear's [out, in]: lora_B @ lora_A * alpha / r."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    a, b = (tensors[f"{PREFIX}{module}.{m}.weight"] for m in ("lora_A", "lora_B"))
    return (b @ a) * (config["lora_alpha"] / config["r"])


def untransposed(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """lora_B @ lora_A added to the [in, out] Conv1D storage as it stands: llama.cpp's convert_lora_to_gguf.py
    (LoraTorchTensor.transpose swaps B and A) after its GPT-2 converter transposes c_proj for ggml; only fits a
    square matrix."""
    assert w.shape == delta.shape
    return w + delta


def reshaped(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Where the shapes differ (c_attn: [32, 96] against (96, 32)), the careless fix: reshape instead of transpose."""
    assert w.shape != delta.shape
    return w + delta.reshape(w.shape)


@pytest.mark.parametrize("module, wrong", [("attn.c_proj", untransposed), ("attn.c_attn", reshaped)])
def test_a_wrongly_transposed_merge_fails_naming_the_layer(module: str, wrong: Any, base: Path, adapters,
                                                            tmp_path: Path) -> None:
    a = adapters("attn-mlp")
    merged = peft_merged(base, a.directory, tmp_path / "merged")
    name = f"transformer.h.1.{module}"
    base_w = load_file(base / "model.safetensors")[f"{name}.weight"]
    delta = _delta(a.directory, name)
    tensors = load_file(merged / "model.safetensors")
    right = tensors[f"{name}.weight"]
    assert right.shape == base_w.shape == delta.shape[::-1]  # Conv1D: [in, out]
    assert torch.allclose(right, base_w + delta.T, atol=1e-6)  # PEFT's merge adds the transpose
    tensors[f"{name}.weight"] = bad = wrong(base_w, delta)
    assert bad.shape == right.shape and not torch.allclose(bad, right, atol=1e-3)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(merged / "config.json", broken / "config.json")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = cli("verify", a.directory, broken, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)  # one document
    assert report["first_difference"] == "layer 1" and [s["within"] for s in report["stages"][:2]] == [True, True]
    text = cli("verify", a.directory, broken)
    assert text.exit_code == 1 and "layer 1" in text.output


def test_inspect_names_the_layout(base: Path, adapters) -> None:
    a = adapters("attn-mlp")
    result = cli("inspect", a.directory, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    n_embd, n_head = GPT2["n_embd"], GPT2["n_head"]
    assert report["family"] == "GPT-2" and report["naming"] == "fused attn.c_attn"
    assert report["qkv_order"] == "sequential" and report["n_head"] == report["n_query_groups"] == n_head
    assert report["head_size"] == n_embd // n_head and report["n_embd"] == n_embd
    assert report["n_layer"] == GPT2["n_layer"] and "Conv1D" in report["evidence"][0]
    by_module = {m["module"].removeprefix("transformer.h.{i}."): m for m in report["adapted_modules"]}
    assert set(by_module) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    qkv = by_module["attn.c_attn"]
    assert qkv["out_features"] == 3 * n_embd and qkv["in_features"] == n_embd and qkv["layers"] == [0, 1]
    assert f"Q 0-{n_embd - 1}, K {n_embd}-{2 * n_embd - 1}, V {2 * n_embd}-{3 * n_embd - 1}" in qkv["rows"]
    assert f"H={n_head}, G={n_head}, hs={n_embd // n_head}" in qkv["rows"]
    # what the report says of each module is what peft made of it
    lora_layers = {name.removeprefix(PREFIX): m for name, m in a.model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for rel, entry in by_module.items():
        peft_layer = lora_layers[f"transformer.h.0.{rel}"]
        assert entry["fan_in_fan_out"] is peft_layer.fan_in_fan_out is True
        assert entry["storage"].startswith("Conv1D") and "transpose" in entry["update"]
        assert tuple(peft_layer.get_base_layer().weight.shape) == (entry["in_features"], entry["out_features"])
        assert entry["ranks"] == [peft_layer.r["default"]]
    assert report["lora"] is None  # no litgpt flags: nothing maps GPT-2
    assert any("not convertible" in n and "GPT2LMHeadModel" in n for n in report["notes"])
    assert not any("fan_in_fan_out" in n for n in report["notes"])  # the config agrees with every module
    assert "[in, out]" in cli("inspect", a.directory).output  # shown as written, not taken for markup


def _edited(adapter: Path, directory: Path, **changes: Any) -> Path:
    shutil.copytree(adapter, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return directory


def _peft_logits(base: Path, adapter: Path) -> tuple[torch.Tensor, list[str]]:
    """PeftModel.from_pretrained's logits, with peft's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_load(base), adapter).eval()
    with torch.no_grad():
        return pm(TOKENS).logits, [str(w.message) for w in caught]


def test_peft_saves_fan_in_fan_out_false_for_c_attn_and_lm_head_and_verify_reads_it_as_peft(base: Path,
                                                                                           tmp_path: Path) -> None:
    """c_attn is Conv1D, GPT-2's lm_head an nn.Linear: peft sets the config's flag for each module it wraps and
    saves the last value (false). Refusing the disagreement would refuse peft's own file."""
    a = make_adapter(base, tmp_path / "adapter", dict(r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"]))
    assert json.loads((a.directory / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    logits, said = _peft_logits(base, a.directory)
    assert torch.equal(logits, a.logits) and any("Setting fan_in_fan_out to True" in w for w in said)
    assert close(reference_logits(a.directory), a.logits)
    report = json.loads(cli("inspect", a.directory, "--json").output)
    assert any("fan_in_fan_out false" in n and "attn.c_attn" in n for n in report["notes"])
    flags = {m["module"].rsplit(".", 1)[-1]: m["fan_in_fan_out"] for m in report["adapted_modules"]}
    assert flags == {"c_attn": True, "lm_head": False}
    result = cli("verify", a.directory, base, "--json")
    assert result.exit_code == 1
    assert any("fan_in_fan_out false" in n and "PEFT 0.21 uses true" in n for n in json.loads(result.output)["notes"])
    # peft's merge of an adapter on the tied lm_head adds it to the embedding too (peft warns: its issue #2777):
    # that merged model is not PeftModel's, and verify says so at the embedding
    merged = peft_merged(base, a.directory, tmp_path / "merged")
    assert not close(_load(merged)(TOKENS).logits.detach(), a.logits)
    result = cli("verify", a.directory, merged, "--json")
    assert result.exit_code == 1 and json.loads(result.output)["first_difference"] == "embed"


def test_a_flag_that_disagrees_with_the_module_is_read_as_peft_reads_it(base: Path, adapters, bases,
                                                                        tmp_path: Path) -> None:
    """peft 0.21 sets fan_in_fan_out by the module's class, warning: false on GPT-2's Conv1D becomes true, true on
    Llama's nn.Linear becomes false, and the model computes what the right flag gives. qkvconv does the same (and
    says so) rather than refusing: verify of the edited adapter against the original (both adapters) passes, and
    so does its conversion of the edited Llama adapter."""
    from peft_models import make_peft_adapter

    a = adapters("attn-mlp")
    flipped = _edited(a.directory, tmp_path / "gpt2-false", fan_in_fan_out=False)
    logits, said = _peft_logits(base, flipped)
    assert torch.equal(logits, a.logits) and any("Setting fan_in_fan_out to True" in w for w in said)
    result = cli("verify", flipped, a.directory, "--json")
    assert result.exit_code == 0, result.output
    assert any("fan_in_fan_out false" in n for n in json.loads(result.output)["notes"])

    llama = bases("llama")
    want = make_peft_adapter(llama, tmp_path / "llama", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    flipped = _edited(tmp_path / "llama", tmp_path / "llama-true", fan_in_fan_out=True)
    logits, said = _peft_logits(llama.directory, flipped)
    assert close(logits, want) and any("Setting fan_in_fan_out to False" in w for w in said)
    result = cli("verify", flipped, tmp_path / "llama", "--base", llama.directory, "--json")
    assert result.exit_code == 0, result.output
    assert any("fan_in_fan_out true" in n and "nn.Linear" in n for n in json.loads(result.output)["notes"])
    result = cli("convert", flipped, "--to", "litgpt-lora", "--base", llama.directory, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "fan_in_fan_out true" in result.output
    assert close(reference_logits(tmp_path / "run", base=llama.directory), want)


@pytest.mark.parametrize("args", [
    ["--to", "litgpt-lora"], ["--to", "litgpt"], ["--to", "peft", "--qkv", "split"],
    ["--to", "peft", "--target-base", "{base}"],
])
def test_convert_refuses_with_the_reason(args: list[str], base: Path, adapters, tmp_path: Path) -> None:
    a = adapters("attn-mlp")
    out = tmp_path / "out"
    result = cli("convert", a.directory, *[x.format(base=base) for x in args], "--out", out, "--json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)  # one document
    assert doc["exit_code"] == 2 and "GPT2LMHeadModel" in doc["error"] and "no litgpt equivalent" in doc["error"]
    assert not out.exists()



# The other transformers-native fused classes verify computes (hf_models.NATIVE but DBRX, whose peft model would run
# on transformers 5.3's DBRX, another function: tests/test_dbrx_verify.py): an
# nn.Linear fused QKV module in its own row order, with the attention output and an MLP linear where peft reaches it.
NATIVE_TARGETS = {
    "gpt-bigcode-mqa": ["c_attn", "c_proj", "c_fc"], "gpt-bigcode-mha": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h"], "mpt": ["Wqkv", "out_proj", "up_proj"],
    "persimmon": ["query_key_value", "dense"], "codegen": ["qkv_proj", "out_proj", "fc_in"],
}


@pytest.mark.parametrize("case_id", list(NATIVE_TARGETS))
def test_adapters_on_the_other_native_fused_classes(case_id: str, built, tmp_path: Path) -> None:
    """The same reading serves every class verify computes: PeftModel's logits, PEFT's merge passes, and lora_B rows
    of layer 1's fused module written in another order of the same shape fail there."""
    from qkvconv.formats.hf import detect_family
    from qkvconv.formats.hf.config import _heads
    from qkvconv.model.layout import QKVOrder, reorder

    b = built(case_id)
    a = make_adapter(b.directory, tmp_path / "adapter", dict(r=4, lora_alpha=8, target_modules=NATIVE_TARGETS[case_id]))
    assert close(reference_logits(a.directory), a.logits) and not close(b.logits, a.logits)
    merged = peft_merged(b.directory, a.directory, tmp_path / "merged")
    result = cli("verify", a.directory, merged, "--json")
    assert result.exit_code == 0, result.output
    family = detect_family(b.config_json)
    _, heads = _heads(family, b.config_json)
    report = json.loads(cli("inspect", a.directory, "--json").output)
    qkv = next(m for m in report["adapted_modules"] if m["module"].endswith(family.qkv.name))
    assert f"in {family.qkv.order.value} order" in qkv["rows"] and qkv["fan_in_fan_out"] is False
    if heads.n_query_groups != heads.n_head:
        return  # multi-query: no other order of the same rows (test_fused_verify swaps K and V for the weights)
    other = QKVOrder.SEQUENTIAL if family.qkv.order is QKVOrder.PER_HEAD else QKVOrder.PER_HEAD
    tensors = load_file(a.directory / "adapter_model.safetensors")
    key = f"{PREFIX}{family.layer_prefix.format(i=1)}.{family.qkv.name}.lora_B.weight"
    tensors[key] = reorder(tensors[key], family.qkv.order, other, heads).contiguous()
    shutil.copytree(a.directory, tmp_path / "wrong")
    save_file(tensors, tmp_path / "wrong" / "adapter_model.safetensors", metadata={"format": "pt"})
    result = cli("verify", tmp_path / "wrong", merged, "--json")
    assert result.exit_code == 1 and json.loads(result.output)["first_difference"] == "layer 1"
