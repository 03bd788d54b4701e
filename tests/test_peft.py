"""litgpt LoRA runs <-> PEFT LoRA adapters (qkvconv/formats/peft/), with the real libraries as oracles.

Tiny random models (2 layers; 4 query heads, 2 key/value heads where the family has GQA) of Llama
(split q/k/v), GPT-NeoX (fused per-head), Falcon 40B (fused grouped), Phi-3 (fused sequential
qkv_proj and gate_up_proj) and Gemma (tied head), every weight random and nonzero:
1. export: a litgpt.lora.GPT with random lora_A / lora_B, saved as a LoRA run, exported; transformers
   + PeftModel.from_pretrained on the HF base must compute litgpt's logits;
2. legacy: every committed litgpt 0.5.4 LoRA fixture exported reproduces the logits litgpt 0.5.4
   computed (reference.pt), and gives the same updates as `upgrade` followed by export;
3. import: adapters made by peft.get_peft_model (rank_pattern, alpha_pattern, rslora,
   layers_to_transform, lm_head) imported; litgpt.lora.GPT loading base + adapter with strict=True
   must compute PeftModel's logits;
4. round trips keep every update matrix;
5. what litgpt cannot hold is refused with one line (exit code 2).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.hf import hf_config_from_litgpt, plan_litgpt_to_hf
from qkvconv.io.config_files import read_yaml
from qkvconv.formats.litgpt import migrate_config
from qkvconv.formats.peft import (
    KNOWN_FIELDS,
    REFUSED_SETTINGS,
    inspect_peft,
    is_peft_dir,
    litgpt_lora_to_peft,
    peft_to_litgpt_lora,
)
from qkvconv.ops.upgrade import upgrade

from conftest import CASES as LEGACY_CASES
from conftest import FIXTURES, LORA_CASES, reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
litgpt = pytest.importorskip("litgpt")
from litgpt.lora import GPT as LoRAGPT  # noqa: E402
from litgpt.lora import Config as LoRAConfig  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from peft_models import (  # noqa: E402
    BASES,
    MOE_BASES,
    Base,
    EXPORT_FLAGS,
    LLAMA_SIZES,
    TOKENS,
    TOL,
    _build_base,
    assert_same_updates,
    litgpt_lora_logits,
    litgpt_updates,
    load_lora_run,
    make_lora_run,
    make_peft_adapter,
    max_diff,
    peft_logits,
    peft_updates,
)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("flags", list(EXPORT_FLAGS))
def test_export_matches_litgpt(kind, flags, bases, tmp_path):
    base = bases(kind)
    flags = EXPORT_FLAGS[flags]
    if flags.get("lora_mlp") and kind in MOE_BASES:  # litgpt adapts the router and experts; PEFT cannot
        make_lora_run(base, tmp_path / "moe-run", flags)
        with pytest.raises(UnsupportedFamily, match=r"router and experts \(lora_mlp\) have no PEFT counterpart"):
            litgpt_lora_to_peft(tmp_path / "moe-run", tmp_path / "moe-peft", hf_config=base.config_json)
        assert not (tmp_path / "moe-peft").exists()
        flags = {**flags, "lora_mlp": False}  # the rest of the run converts
    hyper, want = make_lora_run(base, tmp_path / "run", flags)
    assert max_diff(want, base.logits) > 1e-3  # the adapter changes the model
    result = litgpt_lora_to_peft(tmp_path / "run", tmp_path / "peft", hf_config=base.config_json,
                                 base_model_name_or_path=str(base.directory))
    assert result.out == tmp_path / "peft" and result.notes
    assert is_peft_dir(tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = LoraConfig.from_pretrained(tmp_path / "peft")
    assert config.task_type == "CAUSAL_LM" and config.r >= 3 and not config.use_rslora
    got = peft_logits(base.directory, tmp_path / "peft")
    diff = max_diff(got, want)
    print(f"export {kind} {flags}: PEFT vs litgpt logits max abs diff {diff:.2e}")
    assert diff < TOL


def test_export_config_for_mixed_ranks(bases, tmp_path):
    """Phi-3: fc_1 + fc_2 become one gate_up_proj adapter at rank 2r: a rank_pattern / alpha_pattern entry."""
    base = bases("phi3")
    make_lora_run(base, tmp_path / "run", dict(lora_query=True, lora_value=True, lora_mlp=True))
    litgpt_lora_to_peft(tmp_path / "run", tmp_path / "peft", hf_config=base.config_json)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_up_proj", "qkv_proj"]
    # q+v on the fused qkv_proj: rank 2r; gate_up_proj: 2r; down_proj: r
    assert (cfg["r"], cfg["lora_alpha"]) == (6, 10)
    assert cfg["rank_pattern"] == {"down_proj": 3} and cfg["alpha_pattern"] == {"down_proj": 5}
    # every field is one peft's LoraConfig knows
    assert set(cfg) <= {f.name for f in fields(LoraConfig)}


# ---------------------------------------------------------------------------------------------
# 2. legacy litgpt 0.5.4 adapters


def legacy_base_as_hf(base_name: str, directory: Path) -> dict[str, Any]:
    """The legacy fixture base converted to a Hugging Face directory (in memory); its config.json."""
    cfg = migrate_config(read_yaml(FIXTURES / base_name / "model_config.yaml"))[0]
    hf_cfg = hf_config_from_litgpt(cfg)
    state = torch.load(FIXTURES / base_name / "lit_model.pth", weights_only=True)
    state = state.get("model", state)
    tensors = plan_litgpt_to_hf(cfg, list(state), hf_cfg).apply_in_memory(state)
    directory.mkdir()
    save_file({k: v.clone() for k, v in tensors.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    return hf_cfg


@pytest.mark.parametrize("case", LORA_CASES)
def test_legacy_adapters_reproduce_litgpt_054(case, legacy, tmp_path):
    run = legacy(case)
    ref = reference(FIXTURES / case)
    hf_dir = tmp_path / "hf-base"
    hf_cfg = legacy_base_as_hf(LEGACY_CASES[case]["base"], hf_dir)
    result = litgpt_lora_to_peft(run, tmp_path / "peft", hf_config=hf_cfg)
    got = peft_logits(hf_dir, tmp_path / "peft", ref["tokens"])
    diff = max_diff(got, ref["logits"])
    print(f"legacy {case}: PEFT vs litgpt 0.5.4 logits max abs diff {diff:.2e}; notes: {result.notes[0]}")
    assert diff < TOL
    assert max_diff(got, ref["base_logits"]) > 1e-3

    # the same updates as `qkvconv upgrade` followed by export (which has rank 3r everywhere)
    upgrade(run, tmp_path / "upgraded")
    litgpt_lora_to_peft(tmp_path / "upgraded", tmp_path / "peft-upgraded", hf_config=hf_cfg)
    assert_same_updates(peft_updates(tmp_path / "peft"), peft_updates(tmp_path / "peft-upgraded"))


def test_legacy_all_qkv_rank_is_minimal(legacy, tmp_path):
    """Legacy all-q,k,v on GQA (r 4): parts keep only the A blocks their rows used, alpha/r unchanged."""
    run = legacy("lora_qkv_gqa")
    hf_cfg = legacy_base_as_hf("gqa_llama", tmp_path / "hf")
    result = litgpt_lora_to_peft(run, tmp_path / "peft", hf_config=hf_cfg,
                                 base_model_name_or_path=str(run.parent / "gqa_llama"))
    # inspect finds the family through the litgpt base the adapter names
    report = inspect_peft(tmp_path / "peft")
    assert report["family"] == "Llama" and report["lora"]["key"] and report["n_query_groups"] == 2
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {k: cfg["rank_pattern"].get(k, cfg["r"]) for k in cfg["target_modules"]}
    alphas = {k: cfg["alpha_pattern"].get(k, cfg["lora_alpha"]) for k in cfg["target_modules"]}
    assert set(ranks) == {"q_proj", "k_proj", "v_proj"}
    assert all(r in (4, 8, 12) for r in ranks.values()) and max(ranks.values()) > 4
    assert all(alphas[k] / ranks[k] == 16 / 4 for k in ranks)
    assert "legacy all-q,k,v semantics" in result.notes[0]


# ---------------------------------------------------------------------------------------------
# 3. PEFT -> litgpt

IMPORT_CASES = {
    "llama-patterns": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], r=4,
                                     lora_alpha=8, rank_pattern={"k_proj": 2, "o_proj": 6},
                                     alpha_pattern={"v_proj": 12})),
    "llama-rslora": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=6,
                                   use_rslora=True)),
    "llama-head-layer-rank": ("llama", dict(target_modules=["k_proj", "lm_head"], r=2, lora_alpha=4,
                                            rank_pattern={"lm_head": 4, "model.layers.1.self_attn.k_proj": 3})),
    "llama-some-layers": ("llama", dict(target_modules=["q_proj", "up_proj"], r=2, lora_alpha=2,
                                        layers_to_transform=[1])),
    "neox": ("neox", dict(target_modules=["query_key_value", "dense_4h_to_h"], r=4, lora_alpha=8)),
    "falcon40b": ("falcon40b", dict(target_modules=["query_key_value", "dense"], r=4, lora_alpha=8,
                                    rank_pattern={"dense": 2})),
    "phi3": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj", "o_proj"], r=3, lora_alpha=7,
                          alpha_pattern={"gate_up_proj": 14})),
    "gemma-head": ("gemma", dict(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], r=4, lora_alpha=4)),
    "qwen3": ("qwen3", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], r=4, lora_alpha=8)),
    "phi": ("phi", dict(target_modules=["q_proj", "v_proj", "dense", "fc1", "lm_head"], r=4, lora_alpha=8)),
    "stablelm": ("stablelm", dict(target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], r=2, lora_alpha=4)),
    "gemma2": ("gemma2", dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], r=2, lora_alpha=4)),
    "gemma3": ("gemma3", dict(target_modules=["q_proj", "k_proj", "gate_proj", "lm_head"], r=2, lora_alpha=4)),
    "olmo": ("olmo", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=2, lora_alpha=4)),
    "olmo2": ("olmo2", dict(target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], r=2, lora_alpha=4)),
    # experts and routers are no nn.Linear in transformers 5: the attention and the head carry the adapters
    "mixtral": ("mixtral", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"], r=2, lora_alpha=4)),
    "qwen3_moe": ("qwen3_moe", dict(target_modules=["q_proj", "v_proj", "o_proj"], r=3, lora_alpha=5)),
    "starcoder2": ("starcoder2", dict(target_modules=["q_proj", "v_proj", "o_proj", "c_fc", "c_proj", "lm_head"], r=2,
                                      lora_alpha=4)),
    "granite": ("granite", dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], r=2, lora_alpha=4)),
    "smollm3": ("smollm3", dict(target_modules=["k_proj", "o_proj", "gate_proj", "lm_head"], r=2, lora_alpha=4)),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_matches_peft(case, bases, tmp_path):
    kind, settings = IMPORT_CASES[case]
    base = bases(kind)
    want = make_peft_adapter(base, tmp_path / "peft", settings)
    assert max_diff(want, base.logits) > 1e-3
    result = peft_to_litgpt_lora(tmp_path / "peft", tmp_path / "run", hf_config=base.config_json,
                                 checkpoint_dir="checkpoints/base")
    assert result.out == tmp_path / "run"
    lit_cfg, hyper, lora = load_lora_run(tmp_path / "run")
    assert lit_cfg == base.lit_cfg and hyper["checkpoint_dir"] == "checkpoints/base"
    got = litgpt_lora_logits(lit_cfg, base.lit_state, lora, hyper)  # strict=True
    diff = max_diff(got, want)
    print(f"import {case}: litgpt vs PEFT logits max abs diff {diff:.2e}; {result.notes}")
    assert diff < TOL


def test_import_settings(bases, tmp_path):
    """One lora_r (the largest rank), the most common scaling kept, flags from the targets."""
    base = bases("llama")
    make_peft_adapter(base, tmp_path / "peft", IMPORT_CASES["llama-patterns"][1])
    result = peft_to_litgpt_lora(tmp_path / "peft", tmp_path / "run", hf_config=base.config_json)
    _, hyper, lora = load_lora_run(tmp_path / "run")
    assert hyper == {"lora_r": 6, "lora_alpha": 12, "lora_dropout": 0.0, "lora_query": True, "lora_key": True,
                     "lora_value": True, "lora_projection": True, "lora_mlp": True, "lora_head": False}
    assert lora["transformer.h.0.attn.qkv.lora_A"].shape == (18, 32)
    assert not lora["transformer.h.1.mlp.proj.lora_B"].any()  # PEFT adapted only gate_proj: exact zeros
    assert any("zero adapters" in n for n in result.notes)


def test_import_bf16_adapter(bases, tmp_path):
    """A bfloat16 adapter stays bfloat16; a scaling folded into its lora_B is rounded once and checked."""
    base = bases("llama")
    make_peft_adapter(base, tmp_path / "peft", IMPORT_CASES["llama-patterns"][1])
    path = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    result = peft_to_litgpt_lora(tmp_path / "peft", tmp_path / "run", hf_config=base.config_json)
    _, hyper, lora = load_lora_run(tmp_path / "run")
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}
    assert any("folded" in n for n in result.notes)
    got = litgpt_updates(base.lit_cfg, hyper, lora)
    want = peft_updates(tmp_path / "peft")
    for part, rows in (("q_proj", slice(0, 32)), ("v_proj", slice(48, 64))):
        delta = got["transformer.h.0.attn.qkv"][rows]
        ref = want[f"model.layers.0.self_attn.{part}"]
        assert float((delta - ref).abs().max()) <= 2 ** -8 * float(ref.abs().max())


# ---------------------------------------------------------------------------------------------
# 4. round trips


@pytest.mark.parametrize("kind", ["llama", "neox", "phi3"])
def test_litgpt_peft_litgpt_keeps_updates(kind, bases, tmp_path):
    base = bases(kind)
    flags = dict(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=True)
    make_lora_run(base, tmp_path / "run", flags)
    litgpt_lora_to_peft(tmp_path / "run", tmp_path / "peft", hf_config=base.config_json)
    peft_to_litgpt_lora(tmp_path / "peft", tmp_path / "back", hf_config=base.config_json)
    cfg0, hyper0, lora0 = load_lora_run(tmp_path / "run")
    cfg1, hyper1, lora1 = load_lora_run(tmp_path / "back")
    assert_same_updates(litgpt_updates(cfg1, hyper1, lora1), litgpt_updates(cfg0, hyper0, lora0))
    if kind == "llama":  # split q/k/v at one rank: the very same tensors come back
        assert hyper1["lora_r"] == hyper0["lora_r"] and hyper1["lora_alpha"] == hyper0["lora_alpha"]
        assert sorted(lora1) == sorted(lora0) and all(torch.equal(lora1[k], lora0[k]) for k in lora0)


@pytest.mark.parametrize("case", ["llama-patterns", "neox", "phi3"])
def test_peft_litgpt_peft_keeps_updates_and_ranks(case, bases, tmp_path):
    kind, settings = IMPORT_CASES[case]
    base = bases(kind)
    make_peft_adapter(base, tmp_path / "peft", settings)
    peft_to_litgpt_lora(tmp_path / "peft", tmp_path / "run", hf_config=base.config_json)
    litgpt_lora_to_peft(tmp_path / "run", tmp_path / "back", hf_config=base.config_json)
    # a scaling folded into lora_B on import (alpha_pattern) is rounded once
    assert_same_updates(peft_updates(tmp_path / "back"), peft_updates(tmp_path / "peft"), rtol=1e-6)
    # zero padding, zero adapters and the A repeated for litgpt's q, k, v blocks are gone again
    shapes = lambda d: {k: tuple(v.shape) for k, v in load_file(d / "adapter_model.safetensors").items()  # noqa: E731
                        if ".lora_" in k}
    assert shapes(tmp_path / "back") == shapes(tmp_path / "peft")


# ---------------------------------------------------------------------------------------------
# 5. refusals


@pytest.fixture(scope="module")
def plain_adapter(bases, tmp_path_factory):
    """A plain q_proj adapter on the Llama base, to edit."""
    base = bases("llama")
    directory = tmp_path_factory.mktemp("plain") / "peft"
    make_peft_adapter(base, directory, dict(target_modules=["q_proj"], r=2, lora_alpha=4))
    return base, directory


def edited(plain: Path, tmp_path: Path, **changes: Any) -> Path:
    directory = tmp_path / "edited"
    shutil.copytree(plain, directory)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def refused(src: Path, out: Path, hf_config: dict, match: str) -> str:
    with pytest.raises(QkvconvError, match=match) as info:
        peft_to_litgpt_lora(src, out, hf_config=hf_config)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return str(info.value)


@pytest.mark.parametrize("settings, match", [
    (dict(target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embed_tokens.*no litgpt LoRA equivalent"),
    (dict(target_modules=["q_proj"], bias="lora_only"), "trains biases"),
])
def test_peft_features_without_litgpt_equivalent_are_refused(settings, match, bases, tmp_path):
    base = bases("llama")
    make_peft_adapter(base, tmp_path / "peft", dict(r=2, lora_alpha=4, **settings))
    refused(tmp_path / "peft", tmp_path / "run", base.config_json, match)


@pytest.mark.parametrize("changes, match", [  # fan_in_fan_out is PEFT's per module: tests/test_gpt2_lora.py
    (dict(init_lora_weights="pissa_niter_4"), "rewrites the base weights"),
    (dict(peft_type="IA3"), "LoRA adapters only"),
    (dict(some_future_variant={"on": True}), "does not know.*some_future_variant"),
    (dict(rank_pattern={"q_proj": 3}), "rank 2, but adapter_config.json"),
])
def test_config_settings_are_refused(changes, match, plain_adapter, tmp_path):
    base, plain = plain_adapter
    refused(edited(plain, tmp_path, **changes), tmp_path / "run", base.config_json, match)


def test_wrong_base_and_unknown_family_are_refused(plain_adapter, bases, tmp_path):
    base, plain = plain_adapter
    refused(plain, tmp_path / "run", bases("phi3").config_json, "no litgpt LoRA equivalent")  # q_proj: not Phi-3
    mamba = {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    with pytest.raises(UnsupportedFamily, match="MambaForCausalLM.*supported"):
        peft_to_litgpt_lora(plain, tmp_path / "run", hf_config=mamba)
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}  # in the table for inspect only
    with pytest.raises(UnsupportedFamily, match="GPT2LMHeadModel with learned absolute position embeddings"):
        peft_to_litgpt_lora(plain, tmp_path / "run", hf_config=gpt2)
    other = {**base.config_json, "hidden_size": 64}
    refused(plain, tmp_path / "run", other, "belongs to another model")


def test_export_refusals(bases, tmp_path):
    base = bases("llama")
    make_lora_run(base, tmp_path / "run", dict(lora_query=True))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(QkvconvError, match="not empty"):
        litgpt_lora_to_peft(tmp_path / "run", tmp_path / "taken", hf_config=base.config_json)
    with pytest.raises(QkvconvError, match="does not describe this litgpt model"):
        litgpt_lora_to_peft(tmp_path / "run", tmp_path / "out", hf_config=bases("neox").config_json)
    assert not (tmp_path / "out").exists()
    with pytest.raises(QkvconvError, match="not a litgpt LoRA run|no litgpt checkpoint"):
        litgpt_lora_to_peft(base.directory, tmp_path / "out", hf_config=base.config_json)


def test_a_wrong_conversion_is_caught_before_publishing(bases, tmp_path, monkeypatch):
    """The check of the written files against the source catches rows in the wrong place: CheckFailed
    (exit 1), and neither `out` nor a temporary directory is left."""
    from qkvconv.formats.peft import export as peft_format
    from qkvconv.errors import CheckFailed

    base = bases("falcon40b")
    make_lora_run(base, tmp_path / "run", dict(lora_query=True, lora_key=True, lora_value=True))
    right = peft_format._qkv_plain
    monkeypatch.setattr(peft_format, "_qkv_plain", lambda *a, **k: tuple(t.roll(8, 0) for t in right(*a, **k)))
    (tmp_path / "out").mkdir()  # an empty directory may be the target
    with pytest.raises(CheckFailed, match="differs from the source"):
        litgpt_lora_to_peft(tmp_path / "run", tmp_path / "out", hf_config=base.config_json)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"] and not any((tmp_path / "out").iterdir())


def test_known_fields_cover_installed_peft():
    """Every LoraConfig field of the installed peft is known, and every LoRA variant is refused."""
    names = {f.name for f in fields(LoraConfig)}
    assert names <= KNOWN_FIELDS, sorted(names - KNOWN_FIELDS)
    variants = {f.name for f in fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert variants <= set(REFUSED_SETTINGS), sorted(variants - set(REFUSED_SETTINGS))


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_peft(bases, tmp_path):
    base = bases("falcon40b")
    make_peft_adapter(base, tmp_path / "peft", IMPORT_CASES["falcon40b"][1])
    report = inspect_peft(tmp_path / "peft", hf_config=base.config_json)
    assert report["format"] == "peft" and report["r"] == 4 and report["lora_alpha"] == 8
    assert sorted(report["target_modules"]) == ["dense", "query_key_value"]
    assert report["rank_pattern"] == {"dense": 2} and not report["use_rslora"]
    assert report["qkv_order"] == "grouped" and report["n_query_groups"] == 2
    assert report["lora"]["query"] and report["lora"]["projection"] and not report["lora"]["mlp"]
    assert report["parameters"] > 0 and report["dtype"] == "float32"
    # without the base config: the family from auto_mapping, no head counts
    bare = inspect_peft(tmp_path / "peft")
    assert bare["family"] is not None and bare["lora"]["projection"]
    # refusable settings are reported, not raised
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert any("DoRA" in n for n in inspect_peft(tmp_path / "peft")["notes"])


def test_imported_run_points_at_its_base_from_anywhere(plain_adapter, tmp_path, monkeypatch):
    """`convert ADAPTER --to litgpt-lora --base HF_DIR` with a relative --base: checkpoint_dir is absolute,
    so `verify` of the run finds its (HF) base from another directory, and the notes say what litgpt needs."""
    from typer.testing import CliRunner

    from qkvconv.cli import app

    base, adapter = plain_adapter
    monkeypatch.chdir(base.directory.parent)
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(adapter), "--to", "litgpt-lora", "--base", base.directory.name,
                                 "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    hyper = yaml.safe_load((tmp_path / "run" / "hyperparameters.yaml").read_text())
    assert Path(hyper["checkpoint_dir"]).is_absolute() and Path(hyper["checkpoint_dir"]) == base.directory.resolve()
    assert any("--to litgpt" in note for note in json.loads(result.stdout)["actions"])
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["verify", str(adapter), "run"])
    assert result.exit_code == 0, result.output
