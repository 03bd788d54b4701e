"""The way back: a PEFT LoRA trained on a remote-code original's transformers twin converts (`convert ADAPTER --to
peft --base TWIN --target-base ORIGINAL`) to an adapter on the original's own modules (InternLM2 `wqkv`, Phi-2's
`mixer.Wqkv`, Qwen-1 `c_attn`, Baichuan `W_pack`, ChatGLM `query_key_value`, the original OLMo's `att_proj` and
`ff_proj`).

The oracle chain, all of it someone else's code or facts checked against it elsewhere: peft makes the twin's adapter
(get_peft_model, random lora_A/lora_B, save_pretrained) and computes the twin's logits with it (PeftModel); the
written adapter is loaded by peft itself onto a module tree carrying the original's tensor names
(inject_adapter_in_model: so peft's own target_modules, rank_pattern and alpha_pattern matching decides what it
adapts) and merged there by peft (W + B @ A * scaling); the merged original then converts with the existing
`convert --to hf` (its layout checked against llama.cpp's converters in test_remote_twins*.py) to a twin whose
logits must equal PeftModel(twin, adapter)'s within 1e-5 of their scale. The same adapter with its fused lora_B
rows put in another QKV order must not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import LLAMA_SIZES, TOKENS, hf_logits
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from test_remote_twins import PHI_SIZES, build_twin, cli, exact, internlm2_from_llama, phi_msft_from_phi, \
    write_fused_adapter
from test_remote_twins_baichuan import baichuan_from_llama
from test_remote_twins_glm import chatglm_from_glm
from test_remote_twins_mlp import SIZES, olmo_from_twin, qwen1_from_qwen2

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.lora import LoraLayer  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj"]


def llama(directory: Path, kv: int = 2, normalized_head: bool = False):
    d, tensors, _ = build_twin(directory, model_type="llama", **{**LLAMA_SIZES, "num_key_value_heads": kv},
                               rms_norm_eps=1e-6, tie_word_embeddings=False)
    if normalized_head:  # what Baichuan 2 computes with (test_remote_twins_baichuan.py)
        tensors["lm_head.weight"] = torch.nn.functional.normalize(tensors["lm_head.weight"])
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d, tensors


def glm(directory: Path):
    d, tensors, _ = build_twin(directory, model_type="glm", **{**LLAMA_SIZES, "head_dim": 8}, pad_token_id=None,
                               eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                                "partial_rotary_factor": 0.5})
    return d, tensors


# name: (twin builder, original builder, the original's fused module per layer, heads, its QKV order, targets, options)
CASES = {
    "internlm2": (lambda d: llama(d), lambda t, d: internlm2_from_llama(t, d), "model.layers.{i}.attention.wqkv",
                  HeadLayout(4, 2, 8), QKVOrder.GROUPED,
                  [*ATTN, "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], ()),
    "phi-msft": (lambda d: build_twin(d, model_type="phi", **PHI_SIZES)[:2], lambda t, d: phi_msft_from_phi(t, d),
                 "transformer.h.{i}.mixer.Wqkv", HeadLayout(4, 4, 8), QKVOrder.SEQUENTIAL,
                 [*ATTN, "dense", "fc1", "fc2", "lm_head"], ()),
    "qwen1": (lambda d: build_twin(d, model_type="qwen2", **{**SIZES, "num_key_value_heads": 4}, rms_norm_eps=1e-6)[:2],
              lambda t, d: qwen1_from_qwen2(t, d), "transformer.h.{i}.attn.c_attn", HeadLayout(4, 4, 8),
              QKVOrder.SEQUENTIAL, [*ATTN, "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], ()),
    "baichuan-7b": (lambda d: llama(d, kv=4), lambda t, d: baichuan_from_llama(t, d, normalised_head=False),
                    "model.layers.{i}.self_attn.W_pack", HeadLayout(4, 4, 8), QKVOrder.SEQUENTIAL,
                    [*ATTN, "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], ("--variant", "baichuan-7b")),
    "baichuan2-7b": (lambda d: llama(d, kv=4, normalized_head=True),
                     lambda t, d: baichuan_from_llama(t, d, normalised_head=True), "model.layers.{i}.self_attn.W_pack",
                     HeadLayout(4, 4, 8), QKVOrder.SEQUENTIAL, [*ATTN, "o_proj", "gate_proj", "up_proj", "down_proj"],
                     ("--variant", "baichuan2-7b")),
    "chatglm": (glm, lambda t, d: chatglm_from_glm(t, d), "transformer.encoder.layers.{i}.self_attention.query_key_value",
                HeadLayout(4, 2, 8), QKVOrder.SEQUENTIAL, [*ATTN, "o_proj", "gate_up_proj", "down_proj", "lm_head"], ()),
    "olmo": (lambda d: build_twin(d, model_type="olmo", **{**SIZES, "num_key_value_heads": 2})[:2],
             lambda t, d: olmo_from_twin(t, d, n_kv_heads=2), "model.transformer.blocks.{i}.att_proj",
             HeadLayout(4, 2, 8), QKVOrder.SEQUENTIAL, ["q_proj", "v_proj", "gate_proj", "up_proj"], ()),
}


def twin_adapter(twin_dir: Path, out: Path, targets: list[str], *, shared: bool = False, seed: int = 0,
                 **settings) -> torch.Tensor:
    """peft's adapter on the twin (random lora_A and lora_B; with `shared`, k_proj and v_proj take q_proj's lora_A),
    saved with save_pretrained; the twin's logits with that saved adapter, as PeftModel computes them."""
    model = transformers.AutoModelForCausalLM.from_pretrained(twin_dir)
    settings = {"r": 2, "lora_alpha": 4, **settings}
    tuned = peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, **settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        if shared:
            for name, module in tuned.named_modules():
                if name.endswith("q_proj") and isinstance(module, LoraLayer):
                    parent = tuned.get_submodule(name.rsplit(".", 1)[0])
                    for other in ("k_proj", "v_proj"):
                        if isinstance(getattr(parent, other), LoraLayer):
                            getattr(parent, other).lora_A["default"].weight.copy_(module.lora_A["default"].weight)
    tuned.save_pretrained(out)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(twin_dir), out)
        return loaded.eval()(TOKENS).logits


def merged_by_peft(original: Path, adapter: Path, out: Path, fused: str | None = None, wrong=None) -> Path:
    """The original with `adapter` merged by peft itself: its tensors as nn.Linear modules under the original's
    names, peft's inject_adapter_in_model and set_peft_model_state_dict (every adapter tensor must load), then each
    LoRA layer's merge(). `wrong` re-orders the lora_B rows of the fused module `fused` first."""
    state = load_file(original / "model.safetensors")
    root = torch.nn.Module()
    linears = {}
    for key, tensor in state.items():
        stem, kind = key.rsplit(".", 1)
        if kind != "weight" or tensor.dim() != 2:
            continue
        parent = root
        for part in stem.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        linear = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
        linear.weight.data = tensor.clone()
        parent.add_module(stem.split(".")[-1], linear)
        linears[key] = linear
    config = peft.LoraConfig.from_pretrained(adapter)
    config.inference_mode = True
    peft.inject_adapter_in_model(config, root)
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    if wrong is not None:
        for k in tensors:
            if k.endswith("lora_B.weight") and any(k.startswith(fused.format(i=i) + ".") for i in range(2)):
                tensors[k] = wrong(tensors[k])
    loaded = peft.set_peft_model_state_dict(root, tensors)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k], loaded.missing_keys
    for module in root.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {**state, **{k: lin.weight.detach().clone() for k, lin in linears.items()}}
    out.mkdir()
    save_file({k: v.contiguous() for k, v in merged.items()}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(original / "config.json", out / "config.json")
    return out


def logits_of_original(original: Path, options: tuple, tmp_path: Path, name: str) -> torch.Tensor:
    result = cli("convert", original, "--to", "hf", "--out", tmp_path / name, *options)
    assert result.exit_code == 0, result.output
    return hf_logits(tmp_path / name)


@pytest.mark.parametrize("shared", [False, True], ids=["own-lora_A", "shared-lora_A"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_adapter_goes_back_onto_the_original(case: str, shared: bool, tmp_path) -> None:
    build, original_of, fused, heads, order, targets, options = CASES[case]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    original_of(tensors, original)
    want = twin_adapter(twin_dir, tmp_path / "adapter", targets, shared=shared)
    out = tmp_path / "back"
    result = cli("convert", tmp_path / "adapter", "--to", "peft", "--base", twin_dir, "--target-base", original,
                 "--out", out, *options)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    written = load_file(out / "adapter_model.safetensors")
    a = written[f"base_model.model.{fused.format(i=0)}.lora_A.weight"]
    q_parts = sum(t in targets for t in ATTN)
    assert a.shape[0] == (2 if shared else 2 * q_parts)  # rank r when lora_A is shared, else the sum of the ranks
    assert config["base_model_name_or_path"] == str(original.resolve())
    got = logits_of_original(merged_by_peft(original, out, tmp_path / "merged"), options, tmp_path, "hf")
    assert exact(got, want)
    other = QKVOrder.GROUPED if order is QKVOrder.SEQUENTIAL else QKVOrder.SEQUENTIAL
    wrong = merged_by_peft(original, out, tmp_path / "wrong", fused, lambda b: reorder(b, order, other, heads))
    assert not exact(logits_of_original(wrong, options, tmp_path, "hf-wrong"), want)


def test_a_normalised_head_is_refused(tmp_path) -> None:
    """Baichuan 2 divides each head row by its norm at run time: an update of the twin's (normalised) rows has no
    exact counterpart on the stored ones."""
    twin_dir, tensors = llama(tmp_path / "twin", kv=4, normalized_head=True)
    baichuan_from_llama(tensors, tmp_path / "baichuan", normalised_head=True)
    twin_adapter(twin_dir, tmp_path / "adapter", ["q_proj", "lm_head"])
    result = cli("convert", tmp_path / "adapter", "--to", "peft", "--base", twin_dir, "--target-base",
                 tmp_path / "baichuan", "--out", tmp_path / "out", "--variant", "baichuan2-7b")
    assert result.exit_code == 2 and "normalises at run time" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["internlm2", "chatglm"])
def test_fused_split_fused_is_bit_for_bit(case: str, tmp_path) -> None:
    """An adapter on the original's fused module, split onto the twin (`--qkv split`, and `--target-base TWIN`)
    and put back: the same lora_A and lora_B, bit for bit, and the same r and lora_alpha."""
    build, original_of, fused, heads, _, _, options = CASES[case]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    original_of(tensors, original)
    before = write_fused_adapter(tmp_path / "fused", fused, heads.rows, original, r=3, alpha=6, seed=7)
    for way, args in (("qkv", ("--qkv", "split")), ("target", ("--target-base", twin_dir))):
        split = tmp_path / f"split-{way}"
        result = cli("convert", tmp_path / "fused", "--to", "peft", "--base", original, "--out", split, *args)
        assert result.exit_code == 0, result.output
        back = tmp_path / f"back-{way}"
        result = cli("convert", split, "--to", "peft", "--base", twin_dir, "--target-base", original, "--out", back)
        assert result.exit_code == 0, result.output
        after = load_file(back / "adapter_model.safetensors")
        assert sorted(after) == sorted(before)
        assert all(after[k].dtype == before[k].dtype and torch.equal(after[k].view(torch.int32),
                                                                      before[k].view(torch.int32)) for k in before)
        config = json.loads((back / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (3, 6, {}, {})


def test_scalings_are_kept_exactly_or_refused(tmp_path) -> None:
    """q and v with their own lora_alpha (alpha_pattern) fuse block-diagonally: a power-of-two ratio of their
    scalings folds into lora_B exactly, another is refused; use_rslora (alpha / sqrt(r)) keeps its scaling at the
    summed rank; adapters on layer 1 only are listed by their full names."""
    build, original_of, fused, heads, order, _, _ = CASES["internlm2"]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    original_of(tensors, original)
    for n, settings in enumerate(({"alpha_pattern": {"v_proj": 16}}, {"use_rslora": True, "lora_alpha": 3},
                                  {"layers_to_transform": [1], "r": 3, "lora_alpha": 5})):
        adapter, out = tmp_path / f"adapter{n}", tmp_path / f"back{n}"
        want = twin_adapter(twin_dir, adapter, ["q_proj", "v_proj", "o_proj"], seed=n, **settings)
        result = cli("convert", adapter, "--to", "peft", "--base", twin_dir, "--target-base", original, "--out", out)
        assert result.exit_code == 0, result.output
        merged = merged_by_peft(original, out, tmp_path / f"merged{n}")
        assert exact(logits_of_original(merged, (), tmp_path, f"hf{n}"), want)
    config = json.loads((tmp_path / "back2" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.1.attention.wo", "model.layers.1.attention.wqkv"]
    twin_adapter(twin_dir, tmp_path / "odd", ["q_proj", "v_proj"], alpha_pattern={"v_proj": 6})
    result = cli("convert", tmp_path / "odd", "--to", "peft", "--base", twin_dir, "--target-base", original,
                 "--out", tmp_path / "odd-back")
    assert result.exit_code == 2 and "not a power of two" in result.output, result.output
    assert not (tmp_path / "odd-back").exists()


def test_a_different_model_is_refused_naming_the_field(tmp_path) -> None:
    build, original_of, *_ = CASES["internlm2"]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    original_of(tensors, original)
    twin_adapter(twin_dir, tmp_path / "adapter", ["q_proj"])
    config = json.loads((original / "config.json").read_text())
    for change, field in (({"num_key_value_heads": 4}, "n_query_groups"), ({"rms_norm_eps": 1e-5}, "norm_eps"),
                          ({"intermediate_size": 64}, "intermediate_size")):
        (original / "config.json").write_text(json.dumps({**config, **change}))
        args = ("convert", tmp_path / "adapter", "--to", "peft", "--base", twin_dir, "--target-base", original,
                "--out", tmp_path / "out")
        result = cli(*args)
        assert result.exit_code == 2 and field in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
        result = cli(*args, "--json")
        doc = json.loads(result.stdout)  # exactly one JSON document
        assert result.exit_code == 2 and doc["exit_code"] == 2 and field in doc["error"]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_checkpoint_goes_back_to_the_original(case: str, tmp_path) -> None:
    """`convert TWIN --to hf --target-base ORIGINAL` writes the original's own tensors (bit for bit, as the layout
    helpers checked against llama.cpp build them), its config.json unchanged and the code files its auto_map names;
    converted onwards (`--to hf`) it gives the twin's logits. Baichuan 2's head holds the twin's normalised rows
    (normalised again at run time); ChatGLM's inv_freq buffer, which its code makes itself, is not written."""
    build, original_of, _, _, _, _, options = CASES[case]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    want = original_of(tensors, original)
    code = sorted({ref.rsplit(".", 1)[0] + ".py" for ref in json.loads((original / "config.json").read_text())
                   .get("auto_map", {}).values()})
    for name in code:
        (original / name).write_text("raise SystemExit('remote code: copied, never run')\n")
    out = tmp_path / "back"
    result = cli("convert", twin_dir, "--to", "hf", "--target-base", original, "--out", out, *options)
    assert result.exit_code == 0, result.output
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(k for k in want if not k.endswith("rotary_pos_emb.inv_freq"))
    differ = [k for k in got if not torch.equal(got[k], want[k])]
    assert differ == (["lm_head.weight"] if case == "baichuan2-7b" else [])
    assert (out / "config.json").read_text() == (original / "config.json").read_text()
    assert code and all((out / name).read_text() == (original / name).read_text() for name in code)
    twin_logits = hf_logits(twin_dir)
    assert exact(logits_of_original(out, options, tmp_path, "hf"), twin_logits)


def test_a_checkpoint_for_another_model_is_refused(tmp_path) -> None:
    build, original_of, *_ = CASES["internlm2"]
    twin_dir, tensors = build(tmp_path / "twin")
    original = tmp_path / "original"
    original_of(tensors, original)
    config = json.loads((original / "config.json").read_text())
    for change, field in (({"num_key_value_heads": 4}, "n_query_groups"), ({"intermediate_size": 64},
                                                                            "intermediate_size")):
        (original / "config.json").write_text(json.dumps({**config, **change}))
        result = cli("convert", twin_dir, "--to", "hf", "--target-base", original, "--out", tmp_path / "out")
        assert result.exit_code == 2 and field in result.output, result.output
    for args in (("--to", "litgpt"), ("--to", "hf", "--qkv", "fused")):
        result = cli("convert", twin_dir, *args, "--target-base", original, "--out", tmp_path / "out")
        assert result.exit_code == 2 and "--target-base" in result.output, result.output
    assert not (tmp_path / "out").exists()
