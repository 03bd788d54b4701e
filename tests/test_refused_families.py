"""Families, and flags of families, that litgpt 0.5.13 has no equivalent of (hf_models.REFUSED: SmolLM3's
layers without RoPE, Granite's multipliers, Cohere): `inspect` names their QKV layout like any other, and
`convert` refuses with exit code 2, one line naming exactly the feature, and nothing written. Where a
family is refused only for some flags, the flag must matter: the model with it neutralised is another
function (transformers' logits differ), and with it neutral the family converts (hf_models.CASES)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import REFUSED, REFUSED_BY_ID, litgpt_logits
from qkvconv.cli import app
from qkvconv.errors import UnsupportedFamily
from qkvconv.formats.hf import hf_config_from_litgpt, litgpt_config_from_hf, plan_hf_to_litgpt
from qkvconv.formats.hf.families import FAMILIES

transformers = pytest.importorskip("transformers")

runner = CliRunner()
IDS = [c.id for c in REFUSED]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def heads(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) as transformers builds the model: from its q/k projections."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    attn = model.model.layers[0].self_attn
    head_size = attn.head_dim
    return attn.q_proj.out_features // head_size, attn.k_proj.out_features // head_size, head_size


@pytest.mark.parametrize("case_id", IDS)
def test_inspect_names_the_layout(case_id: str, built) -> None:  # noqa: F811
    b = built(case_id)
    family = FAMILIES[b.config_json["architectures"][0]]
    result = cli("inspect", b.directory, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    n_head, n_kv, head_size = heads(b.case.hf)
    assert (report["architecture"], report["family"]) == (family.architecture, family.name)
    assert (report["naming"], report["qkv_order"]) == ("split", "split")
    assert (report["n_head"], report["n_query_groups"], report["head_size"]) == (n_head, n_kv, head_size)
    assert report["attention"] == ("MHA" if n_kv == n_head else "GQA")
    assert report["evidence"][0] == (f"{family.architecture}: separate model.layers.{{i}}.{{self_attn.q_proj,"
                                       "self_attn.k_proj,self_attn.v_proj} (rows sequential when concatenated)")
    assert report["evidence"][1].startswith("decided by the architecture (config.json architectures)")
    assert report["notes"] == [f"not convertible to litgpt: {b.case.refused}"]
    text = cli("inspect", b.directory)
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.replace("│", " ").split())
    assert family.name in flat and "not convertible to litgpt" in flat and "qkv_order split" in flat


@pytest.mark.parametrize("case_id", IDS)
@pytest.mark.parametrize("to", ["litgpt", "hf", "litgpt-legacy"])
def test_convert_refuses_the_feature(case_id: str, to: str, built, tmp_path: Path) -> None:  # noqa: F811
    b = built(case_id)
    out = tmp_path / "out"
    result = cli("convert", b.directory, "--to", to, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {b.case.refused}; qkvconv maps: ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # nothing, not even a temp dir
    result = cli("convert", b.directory, "--to", to, "--out", out, "--json")
    assert result.exit_code == 2 and json.loads(result.output)["error"].startswith(b.case.refused)
    with pytest.raises(UnsupportedFamily) as refusal:
        litgpt_config_from_hf(b.config_json)
    assert refusal.value.reason == b.case.refused and refusal.value.exit_code == 2


@pytest.mark.parametrize("case_id", ["cohere-qk-norm", "granite-3-multipliers"])
def test_inspect_checks_the_qkv_shapes(case_id: str, built, tmp_path: Path) -> None:  # noqa: F811
    """No conversion plan checks the model here, but config.json's heads and layers must fit the q/k/v tensors."""
    source = built(case_id).directory
    for i, change in enumerate(({"num_key_value_heads": 4 if case_id == "cohere-qk-norm" else 1},
                                {"num_attention_heads": 8}, {"num_hidden_layers": 3}, {"num_hidden_layers": 1})):
        broken = tmp_path / f"broken-{i}"
        shutil.copytree(source, broken)
        config = json.loads((source / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, **change}))
        result = cli("inspect", broken)
        assert result.exit_code == 2, (change, result.output)
        assert "config.json does not match the tensors" in result.output, (change, result.output)


def neutralised(case_id: str) -> dict:
    """The refused flags of a case set to the values litgpt has (where it has any)."""
    neutral = {"smollm3-nope": {"no_rope_layers": [1, 1, 1, 1]},
               "granite-3-multipliers": {"embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                                         "logits_scaling": 1.0}}
    return neutral[case_id]


@pytest.mark.parametrize("case_id", ["smollm3-nope", "granite-3-multipliers"])
def test_the_refused_feature_changes_the_model(case_id: str, built) -> None:  # noqa: F811
    """Converting as if the flag were neutral would give another model: the refusal is needed."""
    b = built(case_id)
    cfg = {**b.config_json, **neutralised(case_id)}
    lit_cfg = litgpt_config_from_hf(cfg)  # with the flags neutral, litgpt has it
    state = plan_hf_to_litgpt(cfg, list(b.tensors)).apply_in_memory(b.tensors)
    assert (litgpt_logits(lit_cfg, state) - b.logits).abs().max() > 1e-2


def test_absent_no_rope_layers_is_refused() -> None:
    """SmolLM3Config derives a layer without RoPE every no_rope_layer_interval layers where config.json has no list."""
    cfg = {**REFUSED_BY_ID["smollm3-nope"].hf, "architectures": ["SmolLM3ForCausalLM"]}
    assert transformers.AutoConfig.for_model(**cfg).no_rope_layers == [1, 1, 1, 0]
    with pytest.raises(UnsupportedFamily, match=r"no_rope_layers"):
        litgpt_config_from_hf(cfg)
    assert litgpt_config_from_hf({**cfg, "no_rope_layers": [1, 1, 1, 1]})["n_layer"] == 4


@pytest.mark.parametrize("multiplier, scalar", [(1.0, 1), (0.0078125, 16384), (0.1, 100), (8 ** -0.5, None)])
def test_granite_attention_multiplier_is_litgpts_scores_scalar(multiplier: float, scalar: int | None) -> None:
    cfg = {**REFUSED_BY_ID["granite-3-multipliers"].hf, "architectures": ["GraniteForCausalLM"],
           "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0,
           "attention_multiplier": multiplier}
    assert litgpt_config_from_hf(cfg).get("attention_scores_scalar") == scalar  # None: head_size's (8)


@pytest.mark.parametrize("change, feature", [
    ({"attention_multiplier": 0.3}, "attention scores scaled by attention_multiplier=0.3, not 1/sqrt of an integer"),
    ({"attention_multiplier": 0.0}, "attention scores scaled by attention_multiplier=0.0"),
    ({"embedding_multiplier": 5.0}, "embeddings scaled by embedding_multiplier=5.0"),
    ({"residual_multiplier": None}, "residual branches scaled by residual_multiplier"),
])
def test_granite_scales_litgpt_lacks(change: dict, feature: str) -> None:
    cfg = {**REFUSED_BY_ID["granite-3-multipliers"].hf, "architectures": ["GraniteForCausalLM"],
           "embedding_multiplier": 1.0, "residual_multiplier": 1.0, "logits_scaling": 1.0, **change}
    with pytest.raises(UnsupportedFamily) as refusal:
        litgpt_config_from_hf(cfg)
    assert refusal.value.reason.startswith(f"GraniteForCausalLM with {feature}")


def test_refused_families_are_never_written(built) -> None:  # noqa: F811
    lit_cfg = litgpt_config_from_hf(built("llama3-gqa").config_json)
    with pytest.raises(UnsupportedFamily) as refusal:
        hf_config_from_litgpt(lit_cfg, "CohereForCausalLM")
    assert refusal.value.reason == ("CohereForCausalLM with LayerNorms without a bias (CohereLayerNorm; litgpt's "
                                    "LayerNorm always has one) has no litgpt equivalent")
    # a model no architecture computes: the nearest miss is a family litgpt can be written as, not Cohere
    with pytest.raises(UnsupportedFamily) as miss:
        hf_config_from_litgpt({**lit_cfg, "rope_interleave": True})
    assert "nearest: LlamaForCausalLM differs in rope_interleave" in miss.value.reason
    assert "Cohere" not in str(miss.value)
    # the conditionally refused families write their flags neutral, so transformers builds litgpt's model
    for architecture, key, value in (("SmolLM3ForCausalLM", "no_rope_layers", [1, 1]),
                                     ("GraniteForCausalLM", "residual_multiplier", 1.0)):
        written = hf_config_from_litgpt(lit_cfg, architecture)
        assert written[key] == value
        assert getattr(transformers.AutoConfig.for_model(**written), key) == value


def test_qk_norm_tensors_do_not_stop_inspect(built, tmp_path: Path) -> None:  # noqa: F811
    """Cohere's per-head q_norm/k_norm weights are (heads, head_size): inspect reports, a stray layer does not pass."""
    b = built("cohere-qk-norm")
    assert b.tensors["model.layers.0.self_attn.q_norm.weight"].shape == (4, 8)
    assert cli("inspect", b.directory).exit_code == 0
    extra = tmp_path / "extra"
    shutil.copytree(b.directory, extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    result = cli("inspect", extra)
    assert result.exit_code == 2 and "model.layers.2.self_attn.q_proj.weight is beyond its layers" in result.output
