"""Transformers-native classes with one fused QKV matrix (families_fused.py: GPT-2, GPT-BigCode, Bloom, MPT, DBRX,
Persimmon, CodeGen): `inspect` names the order with its evidence, `convert` refuses with the reason, and the
order is right by transformers' own numbers.

The oracle (test_the_order_is_transformers_own): a row order is a claim about which rows are which head's q, k
and v. If it is right, scaling the rows it calls V of KV head g by c_g (and the output projection's inputs of the
query heads reading that V by 1 / c_g), and the rows it calls Q of group g by a_g against K_g by 1 / a_g, leaves
the model's function unchanged (rotary, ALiBi and the q/k LayerNorms are linear in, blind to, or invariant under
such scales; powers of two keep it exact in float). Under a wrong order the scales land on the wrong rows and the
logits move: every other order valid for the heads is checked to fail, so the test can fail.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from hf_models import NATIVE, NATIVE_BY_ID, TOKENS
from qkvconv.cli import app
from qkvconv.errors import UnsupportedFamily
from qkvconv.formats.hf import detect_family, litgpt_config_from_hf
from qkvconv.formats.hf.config import _heads
from qkvconv.formats.hf.table import Fused
from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder, fuse, same_rows, split

transformers = pytest.importorskip("transformers")
runner = CliRunner()
IDS = [c.id for c in NATIVE]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def scaled(state: dict, config_json: dict, order: QKVOrder, *, k_is_v: bool = False) -> dict:
    """The state dict with layer 0's heads scaled as the module docstring says, rows read in `order`
    (`k_is_v`: the K and V rows mistaken for each other, a wrong reading where only one order exists)."""
    family = detect_family(config_json)
    qkv = family.qkv
    assert isinstance(qkv, Fused)
    _, heads = _heads(family, config_json)
    prefix = family.layer_prefix.format(i=0)
    out_module = next(hf for hf, lit in family.layer_tensors.items() if lit == "attn.proj")
    hs, q_per_kv = heads.head_size, heads.q_per_kv
    v_scale = torch.tensor([2.0 ** (g % 3 + 1) for g in range(heads.n_query_groups)])
    qk_scale = torch.tensor([2.0 ** -(g % 2 + 2) for g in range(heads.n_query_groups)])
    per_q_row = (qk_scale.repeat_interleave(q_per_kv)).repeat_interleave(hs)
    per_kv_row = qk_scale.repeat_interleave(hs)
    per_v_row = v_scale.repeat_interleave(hs)
    per_out_column = v_scale.repeat_interleave(q_per_kv).repeat_interleave(hs)
    state = dict(state)
    for kind in ("weight", "bias"):
        name = f"{prefix}.{qkv.name}.{kind}"
        if name not in state:
            continue
        t = state[name].T if qkv.transposed and kind == "weight" else state[name]
        q, k, v = split(t, order, heads)
        if k_is_v:
            k, v = v, k
        shape = (-1,) + (1,) * (t.dim() - 1)
        k, v = k / per_kv_row.view(shape), v * per_v_row.view(shape)
        if k_is_v:
            k, v = v, k
        t = fuse(q * per_q_row.view(shape), k, v, order, heads)
        state[name] = t.T.contiguous() if qkv.transposed and kind == "weight" else t
    name = f"{prefix}.{out_module}.weight"
    # GPT-2's c_proj is a Conv1D like its c_attn: [in, out], so the inputs are rows
    state[name] = state[name] / (per_out_column.view(-1, 1) if qkv.transposed else per_out_column.view(1, -1))
    return state


@pytest.mark.parametrize("case_id", IDS)
def test_the_order_is_transformers_own(case_id: str, built) -> None:  # noqa: F811
    b = built(case_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(b.directory)
    model.eval()
    base = model.state_dict()
    family = detect_family(b.config_json)
    assert family.qkv.order is b.case.expect_order
    _, heads = _heads(family, b.config_json)

    def logits(order: QKVOrder, k_is_v: bool = False) -> torch.Tensor:
        model.load_state_dict(scaled(base, b.config_json, order, k_is_v=k_is_v))
        with torch.no_grad():
            return model(TOKENS).logits

    scale = b.logits.abs().max().item()
    assert (logits(b.case.expect_order) - b.logits).abs().max().item() <= 1e-5 * scale
    wrong = 0
    for other in QKVOrder:
        try:
            if same_rows(other, b.case.expect_order, heads):
                continue
        except LayoutError:  # an order these heads cannot have
            continue
        assert (logits(other) - b.logits).abs().max().item() > 1e-3 * scale, other
        wrong += 1
    # MQA's orders all coincide (grouped with one group is sequential): the wrong reading there swaps K and V
    assert (logits(b.case.expect_order, k_is_v=True) - b.logits).abs().max().item() > 1e-3 * scale
    assert wrong >= {"MQA": 0, "GQA": 1, "MHA": 3}[heads.attention]  # GQA: grouped; MHA: per-head, interleaved, ...


@pytest.mark.parametrize("case_id", IDS)
def test_inspect_names_the_layout(case_id: str, built) -> None:  # noqa: F811
    b = built(case_id)
    family = detect_family(b.config_json)
    result = cli("inspect", b.directory, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**b.case.hf))
    attn = next(m for n, m in model.named_modules() if n.endswith(family.qkv.name.rsplit(".", 1)[0]) and ".0." in n)
    n_head = next(getattr(attn, a) for a in ("num_heads", "n_heads", "num_attention_heads") if hasattr(attn, a))
    head_size = attn.head_dim
    rows = (getattr(model.config, "n_embd", None) or model.config.hidden_size) + 0
    weight = b.tensors[f"{family.layer_prefix.format(i=0)}.{family.qkv.name}.weight"]
    fused_rows = weight.shape[1] if family.qkv.transposed else weight.shape[0]
    n_kv = (fused_rows // head_size - n_head) // 2
    assert (report["n_head"], report["n_query_groups"], report["head_size"]) == (n_head, n_kv, head_size)
    assert report["naming"] == f"fused {family.qkv.name}" and report["n_embd"] == rows
    assert report["n_layer"] == 2
    ambiguous = case_id == "gpt-bigcode-mha"
    assert report["qkv_order"] == ("ambiguous" if ambiguous else b.case.expect_order.value)
    evidence = " | ".join(report["evidence"])
    assert f"rows in {b.case.expect_order.value} order" in evidence
    assert ("stored transposed" in evidence) == (case_id == "gpt2")
    assert ("ambiguous: per-head is how transformers reads" in evidence) == ambiguous
    assert report["notes"] == [f"not convertible to litgpt: {b.case.refused}"]
    text = cli("inspect", b.directory)
    assert text.exit_code == 0 and family.qkv.name in text.output


def test_evidence_names_the_deciding_key_and_positions(built) -> None:  # noqa: F811
    def evidence(case_id: str) -> str:
        return " | ".join(json.loads(cli("inspect", built(case_id).directory, "--json").output)["evidence"])

    assert "multi_query=True" in evidence("gpt-bigcode-mqa") and "fixed at 1" in evidence("gpt-bigcode-mqa")
    assert "multi_query=False" in evidence("gpt-bigcode-mha")
    assert "key/value heads: config.json attn_config.kv_n_heads" in evidence("dbrx-gqa")
    assert "positions: rotary, pairs order, on the first 4 of 6 dims of each Q/K head (config.json rotary_dim)" \
        in evidence("codegen")
    assert re.search(r"positions: rotary, half order, on the first 4 of 8 dims .*partial_rotary_factor",
                     evidence("persimmon"))
    assert "positions: ALiBi" in evidence("bloom") and "positions: ALiBi" in evidence("mpt")
    assert "positions: learned absolute positions" in evidence("gpt2")
    # a value config.json does not hold is said to be the default, not attributed to a key
    b = built("persimmon")
    cfg = {k: v for k, v in b.config_json.items() if k not in ("partial_rotary_factor", "rope_parameters")}
    from qkvconv.formats.hf import describe_layout

    assert "on the first 4 of 8 dims of each Q/K head (the default, config.json having no rope_parameters.partial_rotary_factor)" \
        in describe_layout(cfg)["details"][1]


@pytest.mark.parametrize("case_id", ["gpt2", "codegen", "dbrx-gqa"])
def test_convert_refuses(case_id: str, built, tmp_path) -> None:  # noqa: F811
    b = built(case_id)
    out = tmp_path / "out"
    result = cli("convert", b.directory, "--to", "litgpt", "--out", out)
    assert result.exit_code == 2 and result.output.startswith(f"error: {b.case.refused}"), result.output
    assert not out.exists()
    with pytest.raises(UnsupportedFamily):
        litgpt_config_from_hf(b.config_json)


def test_inspect_checks_the_transposed_shape(built, tmp_path) -> None:  # noqa: F811
    """GPT-2's c_attn is [n_embd, 3 * n_embd]: a config with other heads does not pass."""
    import shutil

    b = built("gpt2")
    broken = tmp_path / "broken"
    shutil.copytree(b.directory, broken)
    (broken / "config.json").write_text(json.dumps({**b.config_json, "n_embd": 48}))
    result = cli("inspect", broken)
    assert result.exit_code == 2 and "config.json does not match the tensors" in result.output
