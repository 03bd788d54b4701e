"""Exact weight transformations (transforms.py, meta_format.py) end to end, on tiny random models.

For each of rotary order (--rope), key/value head expansion (--kv-heads) and norm folding (fold-norms)
on Llama (GQA), GPT-NeoX (partial rotary) and Falcon-40B (grouped QKV), and more: the converted
checkpoint passes the forward-pass check against its source (convert runs it before publishing; here
`verify` is also called directly), and a real framework that loads the result (litgpt with
strict=True, transformers with no missing or unexpected keys) computes the source's logits.
Meta's original layout is checked against the test's own transcription of Meta's reference model
(complex-number rotary on pairs of dims) and against transformers' conversion formula.

Observed in float32 on CPU (printed with -s): row re-orderings and head repeats are bitwise equal in
the forward pass except where the rotary order changes (q.k sums in another order: < 1e-6 of the
logits' scale); folding differs by rounding only (W * g rounded once per weight): < 1e-6 of the scale
in the forward pass, < 1e-5 absolute against transformers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from hf_models import BY_ID, TOKENS, TOL, Case, _build, hf_logits, litgpt_logits  # noqa: F401
from qkvconv.cli import app
from qkvconv.ops.convert import Transformations, transformed_plan
from qkvconv.ops.verify import verify as verify_across
from qkvconv.io.engine import execute, output_layout
from qkvconv.errors import QkvconvError
from qkvconv.formats.hf import litgpt_config_from_hf
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.formats.meta import ffn_hidden_dim, params_from_litgpt
from qkvconv.plans.plan import Plan, Recipe
from qkvconv.model.rotary import RopeOrder
from qkvconv.plans.transforms import Fill, Inline, RowIndex, ScaleColumns, compose, kv_repeat_index
from qkvconv.formats.weights import open_weights

runner = CliRunner()
FOLD_RTOL = 1e-5  # folding, relative to the logits' scale: observed <= 1.1e-6 (Gemma: 7.8e-6 of 7.5); rounding only


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args) -> str:
    """Run a command that must succeed; returns its actions and checks (from --json), one a line."""
    result = cli(*args, *([] if "--json" in args else ["--json"]))
    assert result.exit_code == 0, result.output
    if "--json" in args:
        return result.output
    report = json.loads(result.output)
    return "\n".join(report.get("actions", []) + report.get("checks", []))


def lit_state(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "lit_model.pth", weights_only=True)


def lit_config(directory: Path) -> dict:
    return yaml.safe_load((directory / "model_config.yaml").read_text())


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def folded_ok(d: float, logits: torch.Tensor) -> bool:
    """Within float32 rounding of a fold: FOLD_RTOL of the logits' scale (and at least that absolutely)."""
    return d <= FOLD_RTOL * max(1.0, logits.abs().max().item())


def check_forward(source: Path, result: Path) -> float:
    """verify_across passes; returns the logits' max abs difference."""
    report = verify_across(open_weights(source), open_weights(result))
    assert report.passed, report.as_dict()
    return report.logits_max_abs_diff


# ---------------------------------------------------------------------------------------------
# rotary order


@pytest.mark.parametrize("case_id", ["llama3-gqa", "neox-parallel", "falcon-40b-grouped"])
def test_rope_pairs_in_litgpt_and_back(case_id, built, tmp_path):
    b = built(case_id)
    half = tmp_path / "half"
    ok("convert", b.directory, "--to", "litgpt", "--out", half)
    pairs = tmp_path / "pairs"
    out = ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", pairs)
    assert "rotary order half -> pairs" in out and "computed on random inputs" in out
    cfg = lit_config(pairs)
    assert cfg["rope_interleave"] is True
    state, plain = lit_state(pairs), lit_state(half)
    qkv = "transformer.h.0.attn.qkv.weight"
    assert not torch.equal(state[qkv], plain[qkv])  # the Q/K rows did move
    assert sorted(state[qkv].tolist()) == sorted(plain[qkv].tolist())  # ... and only moved
    # litgpt itself computes the pairs model with rope_interleave: the source's logits
    d_litgpt = diff(litgpt_logits(cfg, state), b.logits)
    d_verify = check_forward(b.directory, pairs)
    # back: HF holds half only, so --to hf re-orders by itself; the original tensors come back bit for bit
    back = tmp_path / "back"
    ok("convert", pairs, "--to", "hf", "--out", back)
    tensors = load_file(back / "model.safetensors")
    assert all(torch.equal(tensors[k], b.tensors[k]) for k in b.tensors)
    print(f"{case_id} rope pairs: litgpt vs transformers {d_litgpt:.1e}, verify {d_verify:.1e}")
    assert d_litgpt < TOL and diff(hf_logits(back), b.logits) < TOL


def test_verify_tells_the_rotary_orders_apart(built, tmp_path):
    """Pairs-ordered rows under a config that says half compute something else, and the check says so."""
    b = built("llama3-gqa")
    pairs = tmp_path / "pairs"
    ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", pairs)
    cfg = lit_config(pairs)
    cfg["rope_interleave"] = False
    (pairs / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    report = verify_across(open_weights(b.directory), open_weights(pairs))
    assert not report.passed and report.first_difference == "layer 0"


def test_rope_refusals(built, tmp_path):
    b = built("llama3-gqa")
    for target, order, words in [("hf", "pairs", "half order only"), ("meta", "half", "pairs of dims"),
                                 ("litgpt-legacy", "pairs", "no rope_interleave")]:
        result = cli("convert", b.directory, "--to", target, "--rope", order, "--out", tmp_path / target)
        assert result.exit_code == 2 and words in result.output, result.output
        assert not (tmp_path / target).exists()


# ---------------------------------------------------------------------------------------------
# key/value heads


@pytest.mark.parametrize("case_id", ["llama3-gqa", "falcon-40b-grouped", "falcon-7b-mqa"])
def test_kv_heads_to_mha(case_id, built, tmp_path):
    b = built(case_id)
    G = BY_ID[case_id].litgpt_tiny["n_query_groups"]
    hf = tmp_path / "hf"
    out = ok("convert", b.directory, "--to", "hf", "--kv-heads", 4, "--out", hf)
    assert f"key/value heads {G} -> 4 (MHA)" in out and f"the KV cache grows {4 // G}x" in out
    assert "largest difference 0 of its scale" in out
    config = json.loads((hf / "config.json").read_text())
    assert litgpt_config_from_hf(config)["n_query_groups"] == 4
    d_hf = diff(hf_logits(hf), b.logits)
    lit = tmp_path / "lit"
    ok("convert", b.directory, "--to", "litgpt", "--kv-heads", 4, "--out", lit)
    cfg = lit_config(lit)
    assert cfg["n_query_groups"] == 4
    d_lit = diff(litgpt_logits(cfg, lit_state(lit)), b.logits)
    assert check_forward(b.directory, lit) == 0.0 and check_forward(hf, lit) == 0.0
    print(f"{case_id} kv-heads {G} -> 4: transformers {d_hf:.1e}, litgpt {d_lit:.1e}, verify 0 (bitwise)")
    assert d_hf < TOL and d_lit < TOL


@pytest.fixture(scope="module")
def eight_heads(tmp_path_factory):
    """A Llama with 8 query heads and 2 key/value heads: 4 lies between (each head repeated twice)."""
    case = Case("llama-8h", {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
                             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                             "vocab_size": 96, "max_position_embeddings": 64}, QKVOrder.SPLIT)
    return _build(case, tmp_path_factory.mktemp("llama-8h"))


def test_kv_heads_between_and_refusals(eight_heads, built, tmp_path):
    b = eight_heads
    out = tmp_path / "gqa4"
    assert "key/value heads 2 -> 4 (GQA): each repeated 2x" in ok(
        "convert", b.directory, "--to", "hf", "--kv-heads", 4, "--out", out)
    k = load_file(out / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    k0 = b.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k, k0.view(2, 1, 4, 32).expand(2, 2, 4, 32).reshape(16, 32))
    assert diff(hf_logits(out), b.logits) < TOL
    for n, words in [(1, "fewer than the source's 2"), (3, "must be a multiple of 2"), (16, "that divides 8")]:
        result = cli("convert", b.directory, "--to", "hf", "--kv-heads", n, "--out", tmp_path / f"x{n}")
        assert result.exit_code == 2 and words in result.output, result.output
    # GPT-NeoX is multi-head already: its own count is a no-op, fewer is refused
    neox = built("neox-parallel")
    result = cli("convert", neox.directory, "--to", "litgpt", "--kv-heads", 2, "--out", tmp_path / "neox")
    assert result.exit_code == 2 and "changes what the model computes" in result.output
    assert "hold the source's bits" in ok("convert", neox.directory, "--to", "litgpt", "--kv-heads", 4, "--out", tmp_path / "n4")


def test_kv_repeat_index_is_llamas_repeat_kv():
    heads = HeadLayout(8, 2, 3)
    w = torch.randn(heads.rows, 5)
    q, k, v = torch.split(w, [8 * 3, 2 * 3, 2 * 3])
    rep = lambda t, n: t.view(2, 3, -1).repeat_interleave(n // 2, dim=0).reshape(n * 3, -1)  # noqa: E731
    for n in (2, 4, 8):  # llama's repeat_kv, for each n_kv that 2 divides and that divides 8
        assert torch.equal(w[kv_repeat_index(heads, n)], torch.cat([q, rep(k, n), rep(v, n)]))


# ---------------------------------------------------------------------------------------------
# norm folding


def norms_of(tensors: dict[str, torch.Tensor], *words: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if any(w in k for w in words)}


@pytest.mark.parametrize("case_id, kept", [
    ("llama3-gqa", []),
    ("neox-parallel", ["gpt_neox.final_layer_norm"]),  # transformers' GPT-NeoX head has no bias for its beta
    ("falcon-40b-grouped", ["transformer.ln_f"]),  # tied head
    ("falcon-7b-mqa", ["transformer.ln_f"]),  # one norm feeds attention and MLP: folded into both
    ("gemma-head-dim", ["model.norm"]),  # (1 + w) RMSNorm; tied head
])
def test_fold_norms_hf(case_id, kept, built, tmp_path):
    b = built(case_id)
    out = tmp_path / "folded"
    text = ok("fold-norms", b.directory, "--out", out, "--json")
    report = json.loads(text)
    assert report["target_format"] == "hf" and any(a.startswith("folded ") for a in report["actions"])
    assert any("not folded" in a for a in report["actions"]) == bool(kept)
    tensors = load_file(out / "model.safetensors")
    gain = 0.0 if case_id.startswith("gemma") else 1.0
    norm_words = ("norm", "ln_", "layernorm")
    for name, t in norms_of(tensors, *norm_words).items():
        if any(name.startswith(k) for k in kept):
            assert torch.equal(t, b.tensors[name]), name
        else:
            assert torch.all(t == (gain if name.endswith("weight") else 0.0)), name
    d = diff(hf_logits(out), b.logits)
    d_verify = check_forward(b.directory, out)
    scale = b.logits.abs().max().item()
    print(f"{case_id} fold-norms: transformers {d:.1e} of scale {scale:.1f} (rounding), verify {d_verify:.1e}")
    assert folded_ok(d, b.logits)


def test_fold_layernorm_bias_into_litgpt(built, tmp_path):
    """litgpt can hold the biases folding creates: Falcon-40B (no linear biases) gets `bias: true`, and
    GPT-NeoX's final LayerNorm folds into an lm_head bias."""
    for case_id, folded_head in [("falcon-40b-grouped", False), ("neox-parallel", True)]:
        b = built(case_id)
        out = tmp_path / case_id
        ok("convert", b.directory, "--to", "litgpt", "--fold-norms", "--out", out)
        cfg, state = lit_config(out), lit_state(out)
        assert cfg["bias"] is True and cfg["lm_head_bias"] is folded_head
        assert torch.all(state["transformer.h.1.norm_2.bias"] == 0)
        if case_id.startswith("falcon"):
            assert torch.all(state["transformer.h.0.attn.proj.bias"] == 0)  # new, and nothing folds into it
            assert state["transformer.h.0.attn.qkv.bias"].abs().sum() > 0  # W @ beta
        d = diff(litgpt_logits(cfg, state), b.logits)
        print(f"{case_id} fold-norms -> litgpt: {d:.1e}")
        assert folded_ok(d, b.logits)


def test_fold_in_bfloat16_is_checked_at_bfloat16_rounding(built, tmp_path):
    """W * g rounded to bf16 differs from the unfolded model by bf16 rounding (observed 0.3% of the logits'
    scale), far outside float32's tolerance: the check holds a folded bf16 model to bf16's 1e-2 instead.
    Re-orderings stay exact in bf16 and keep float32's tolerance."""
    b = built("llama3-gqa")
    bf16 = tmp_path / "bf16"
    shutil.copytree(b.directory, bf16)
    tensors = load_file(bf16 / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16 / "model.safetensors", metadata={"format": "pt"})
    text = ok("fold-norms", bf16, "--out", tmp_path / "folded")
    assert "atol 0.01 + rtol 0.01" in text
    assert load_file(tmp_path / "folded" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert "largest difference 0 of its scale" in ok("convert", bf16, "--to", "hf", "--kv-heads", 4, "--out", tmp_path / "kv")


# ---------------------------------------------------------------------------------------------
# all at once: one plan, each source tensor read once


class Sink:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.clone()


@pytest.mark.parametrize("case_id, to", [("llama3-gqa", "litgpt"), ("falcon-40b-grouped", "hf"),
                                         ("neox-parallel", "litgpt-legacy")])
def test_everything_in_one_pass(case_id, to, built, tmp_path):
    b = built(case_id)
    rope = None if to != "litgpt" else RopeOrder.PAIRS
    changes = Transformations(rope=rope, kv_heads=4, fold_norms=True)
    plan, reader, notes = transformed_plan(b.directory, "hf", to, changes)
    output_layout(plan, reader)
    reads = execute(plan, reader, Sink())
    assert set(reads.values()) == {1}  # every source tensor read once, whatever the recipes do with it
    args = ["--fold-norms", "--kv-heads", 4] + (["--rope", rope.value] if rope else [])
    out = tmp_path / "out"
    text = ok("convert", b.directory, "--to", to, *args, "--out", out)
    assert "computed on random inputs" in text
    if to == "hf":
        d = diff(hf_logits(out), b.logits)
    else:
        if to == "litgpt-legacy":
            ok("upgrade", out)  # current litgpt reads the legacy layout as it loads; upgrade makes it current
        d = diff(litgpt_logits(lit_config(out), lit_state(out)), b.logits)
    print(f"{case_id} -> {to} fold + kv 4 {'+ pairs' if rope else ''}: {d:.1e}")
    assert folded_ok(d, b.logits)


def test_dry_run_shows_the_composed_steps(built, tmp_path):
    b = built("llama3-gqa")
    result = cli("convert", b.directory, "--to", "litgpt", "--fold-norms", "--kv-heads", 4, "--rope", "pairs",
                 "--dry-run", "--json", "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    plan = {r["output"]: r for r in json.loads(result.output)["plan"]}
    qkv = plan["transformer.h.0.attn.qkv.weight"]
    assert qkv["inputs"] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] + \
        ["model.layers.0.input_layernorm.weight"]
    for words in ("fuse q, k, v", "scale columns", "key/value heads 2 -> 4", "rotary half -> pairs"):
        assert words in qkv["steps"]
    assert qkv["shape"] == [(4 + 2 * 4) * 8, 32]
    assert not (tmp_path / "never").exists()


def test_steps_are_plain_data():
    w, g = torch.randn(3, 4), torch.randn(4)
    assert torch.equal(ScaleColumns().apply([w, g])[0], w * g)
    assert torch.equal(ScaleColumns(1.0).apply([w, g])[0], w * (1 + g))
    inner = Plan([Recipe("a", ("x",), (RowIndex(torch.tensor([1, 0, 2]), "swap"),)), Recipe("b", ("y",))])
    outer = Plan([Recipe("c", ("a", "b"), (ScaleColumns(),)), Recipe("d", ("b",), (Fill(1.0),))])
    composed = compose(outer, inner)
    c, d = composed.recipes
    assert c.inputs == ("x", "y") and isinstance(c.steps[0], Inline)
    assert d.inputs == ("y",) and not any(isinstance(s, Inline) for s in d.steps)  # copies need no Inline
    out = composed.apply_in_memory({"x": w, "y": g})
    assert torch.equal(out["c"], w[[1, 0, 2]] * g) and torch.equal(out["d"], torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Meta's original layout


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py `permute`: Meta pairs -> HF half."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Its inverse: HF half -> Meta pairs."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_by_hand(b, directory: Path) -> dict[str, torch.Tensor]:
    """A Meta checkpoint of an HF Llama, written without qkvconv: renamed, Q/K rows back to pairs."""
    c = b.config_json
    H, G = c["num_attention_heads"], c["num_key_value_heads"]
    sd = {"tok_embeddings.weight": b.tensors["model.embed_tokens.weight"]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q, k = b.tensors[p + "self_attn.q_proj.weight"], b.tensors[p + "self_attn.k_proj.weight"]
        assert torch.equal(hf_permute(hf_unpermute(q, H), H), q)
        sd |= {
            f"layers.{i}.attention.wq.weight": hf_unpermute(q, H),
            f"layers.{i}.attention.wk.weight": hf_unpermute(k, G),
            f"layers.{i}.attention.wv.weight": b.tensors[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": b.tensors[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": b.tensors[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": b.tensors[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": b.tensors[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": b.tensors[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": b.tensors[p + "post_attention_layernorm.weight"],
        }
    sd |= {"norm.weight": b.tensors["model.norm.weight"], "output.weight": b.tensors["lm_head.weight"],
           "rope.freqs": torch.zeros(4)}  # Llama 2 files carry this buffer
    directory.mkdir()
    torch.save({k: v.clone() for k, v in sd.items()}, directory / "consolidated.00.pth")
    rope = c["rope_parameters"]
    # Meta's FFN width for dim 32: int(0.565 * int(8 * 32 / 3)) = 48, rounded up to a multiple of 16
    params = {"dim": 32, "n_layers": 2, "n_heads": H, "n_kv_heads": G, "vocab_size": c["vocab_size"],
              "multiple_of": 16, "ffn_dim_multiplier": 0.565, "norm_eps": c["rms_norm_eps"],
              "rope_theta": rope["rope_theta"], "use_scaled_rope": True}
    assert ffn_hidden_dim(32, 16, 0.565) == c["intermediate_size"]
    (directory / "params.json").write_text(json.dumps(params))
    (directory / "tokenizer.model").write_bytes(b"not really a tokenizer")
    return sd


def meta_reference_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's llama3 reference model.py (Transformer.forward without the KV cache), transcribed: complex
    rotary on pairs of dims, repeat_kv, RMSNorm, SwiGLU; Llama 3.1's apply_scaling."""
    params = json.loads((directory / "params.json").read_text())
    sd = torch.load(directory / "consolidated.00.pth", weights_only=True)
    dim, H = params["dim"], params["n_heads"]
    G = params.get("n_kv_heads") or H
    hs, eps = dim // H, params["norm_eps"]
    B, T = tokens.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hs, 2)[: hs // 2].float() / hs))
    if params.get("use_scaled_rope"):
        scale, low, high, old = 8, 1, 4, 8192
        new = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                new.append(f)
            elif wavelen > old / low:
                new.append(f / scale)
            else:
                smooth = (old / wavelen - low) / (high - low)
                new.append((1 - smooth) * f / scale + smooth * f)
        freqs = torch.tensor(new, dtype=freqs.dtype)
    angles = torch.outer(torch.arange(T).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)  # (T, hs/2)

    def rms(x, w):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

    def rotary(x):  # (B, T, heads, hs)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    def repeat_kv(x, n):
        b, t, g, d = x.shape
        return x[:, :, :, None, :].expand(b, t, g, n, d).reshape(b, t, g * n, d)

    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rotary((x @ sd[p + "attention.wq.weight"].T).view(B, T, H, hs))
        k = rotary((x @ sd[p + "attention.wk.weight"].T).view(B, T, G, hs))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, G, hs)
        k, v = repeat_kv(k, H // G), repeat_kv(v, H // G)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = torch.softmax((q @ k.transpose(2, 3) / math.sqrt(hs) + mask).float(), dim=-1).type_as(q)
        h = h + (scores @ v).transpose(1, 2).reshape(B, T, -1) @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_meta_layout_round_trip(built, tmp_path):
    """HF Llama -> Meta (by hand) -> qkvconv -> HF: the original tensors, bit for bit, and logits; and
    qkvconv's own --to meta writes what the hand-made one holds."""
    b = built("llama3-gqa")
    meta = tmp_path / "meta"
    by_hand = write_meta_by_hand(b, meta)
    d_meta = diff(meta_reference_logits(meta, TOKENS), b.logits)  # the transcription is right
    assert d_meta < TOL

    hf = tmp_path / "hf"
    text = ok("convert", meta, "--to", "hf", "--out", hf)
    assert "pairs -> half" in text and "computed on random inputs" in text
    tensors = load_file(hf / "model.safetensors")
    assert sorted(tensors) == sorted(b.tensors) and all(torch.equal(tensors[k], b.tensors[k]) for k in b.tensors)
    assert diff(hf_logits(hf), b.logits) < TOL
    assert not (hf / "params.json").exists() and (hf / "tokenizer.model").exists()

    ours = tmp_path / "ours"
    text = ok("convert", b.directory, "--to", "meta", "--out", ours)
    assert "half -> pairs" in text
    written = torch.load(ours / "consolidated.00.pth", weights_only=True)
    assert sorted(written) == sorted(k for k in by_hand if k != "rope.freqs")
    assert all(torch.equal(written[k], by_hand[k]) for k in written)
    params = json.loads((ours / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["use_scaled_rope"] and params["rope_theta"] == 500000.0
    assert ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 48
    assert not (ours / "config.json").exists()
    d_ours = diff(meta_reference_logits(ours, TOKENS), b.logits)
    print(f"Meta layout: reference model vs transformers {d_meta:.1e}; on qkvconv's output {d_ours:.1e}")
    assert d_ours < TOL


def test_meta_to_litgpt_keeps_pairs_and_transforms(built, tmp_path):
    b = built("llama3-gqa")
    meta = tmp_path / "meta"
    write_meta_by_hand(b, meta)
    lit = tmp_path / "lit"
    ok("convert", meta, "--to", "litgpt", "--out", lit)
    cfg = lit_config(lit)
    assert cfg["rope_interleave"] is True and cfg["rope_adjustments"]["factor"] == 8.0
    assert diff(litgpt_logits(cfg, lit_state(lit)), b.logits) < TOL
    # Meta in, Meta out, with every transformation
    out = tmp_path / "meta2"
    ok("convert", meta, "--to", "meta", "--fold-norms", "--kv-heads", 4, "--out", out)
    assert json.loads((out / "params.json").read_text())["n_kv_heads"] == 4
    written = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert torch.all(written["layers.0.attention_norm.weight"] == 1) and torch.all(written["norm.weight"] == 1)
    d = diff(meta_reference_logits(out, TOKENS), b.logits)
    print(f"Meta -> Meta fold + kv 4: reference model {d:.1e}")
    assert folded_ok(d, b.logits)


def test_meta_refusals(built, tmp_path):
    b = built("llama3-gqa")
    meta = tmp_path / "meta"
    write_meta_by_hand(b, meta)
    shutil.copy(meta / "consolidated.00.pth", meta / "consolidated.01.pth")
    result = cli("convert", meta, "--to", "hf", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "model-parallel" in result.output
    (meta / "consolidated.01.pth").unlink()
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    result = cli("convert", meta, "--to", "hf", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "feed-forward width of 256" in result.output
    neox = built("neox-parallel")
    result = cli("convert", neox.directory, "--to", "meta", "--out", tmp_path / "z")
    assert result.exit_code == 2 and "cannot express" in result.output and "partial rotary" in result.output
    with pytest.raises(QkvconvError, match="half order"):
        params_from_litgpt({**litgpt_config_from_hf(b.config_json), "rope_interleave": False})


def test_the_verify_command_compares_across_representations(built, tmp_path: Path) -> None:  # noqa: F811
    """`qkvconv verify` itself accepts a pairs-rotary, K/V-expanded, norm-folded result of the same model."""
    from typer.testing import CliRunner

    from qkvconv.cli import app

    b = built("llama3-gqa")
    out = tmp_path / "lit"
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(b.directory), "--to", "litgpt", "--out", str(out),
                                 "--rope", "pairs", "--kv-heads", "4", "--fold-norms"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(b.directory), str(out)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# query/key norms (Qwen3): one RMSNorm over head_dim shared by the heads, tensors laid out by dims


def test_qwen3_query_key_norms_follow_every_transformation(built, tmp_path):
    """--rope permutes q_norm/k_norm like the rows of a head, --kv-heads leaves the shared k_norm alone,
    --fold-norms folds the input norms around them; litgpt and transformers compute the source's logits.
    A conversion that forgets the norms' dims is wrong, and the check says so."""
    b = built("qwen3-qk-norm")
    pairs = tmp_path / "pairs"
    text = ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", pairs)
    assert "query/key norm weights permuted alike" in text and "computed on random inputs" in text
    state, cfg = lit_state(pairs), lit_config(pairs)
    assert cfg["norm_qk"] is True and cfg["rope_interleave"] is True
    norm_q = "transformer.h.0.attn.norm_q.weight"
    hf_norm_q = b.tensors["model.layers.0.self_attn.q_norm.weight"]
    assert not torch.equal(state[norm_q], hf_norm_q) and sorted(state[norm_q].tolist()) == sorted(hf_norm_q.tolist())
    assert diff(litgpt_logits(cfg, state), b.logits) < TOL  # litgpt itself, pairs rotary and permuted norms
    # the norms left in half order under pairs rows: another function, and verify finds it in layer 0
    state[norm_q] = hf_norm_q
    torch.save(state, pairs / "lit_model.pth")
    report = verify_across(open_weights(b.directory), open_weights(pairs))
    assert not report.passed and report.first_difference == "layer 0"
    # back to HF (half order again): every tensor bit for bit
    back = tmp_path / "back"
    ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", tmp_path / "pairs2")
    ok("convert", tmp_path / "pairs2", "--to", "hf", "--out", back)
    tensors = load_file(back / "model.safetensors")
    assert all(torch.equal(tensors[k], b.tensors[k]) for k in b.tensors)
    # K/V heads repeated: the shared k_norm stays as it is
    mha = tmp_path / "mha"
    ok("convert", b.directory, "--to", "hf", "--kv-heads", 4, "--out", mha)
    assert diff(hf_logits(mha), b.logits) < TOL
    assert torch.equal(load_file(mha / "model.safetensors")["model.layers.0.self_attn.k_norm.weight"],
                       b.tensors["model.layers.0.self_attn.k_norm.weight"])
    # norm folding: the input norms fold into q/k/v and the MLP; the query/key norms stay
    folded = tmp_path / "folded"
    ok("fold-norms", b.directory, "--out", folded)
    d = diff(hf_logits(folded), b.logits)
    assert folded_ok(d, b.logits)
    assert torch.all(load_file(folded / "model.safetensors")["model.layers.0.input_layernorm.weight"] == 1.0)
    # --qkv fused: no architecture with one fused QKV matrix has query/key norms (Phi-3 has none): refused
    result = cli("convert", b.directory, "--to", "hf", "--qkv", "fused", "--out", tmp_path / "fused")
    assert result.exit_code == 2 and "norm_qk" in result.output and not (tmp_path / "fused").exists()


@pytest.mark.parametrize("case_id", ["gemma2-softcap", "gemma3-local-rope"])
def test_gemma2_and_3_transformations_and_verify(case_id, built, tmp_path):
    """Gemma 2 (norms after attention and MLP, soft-capping, an alternating window) and Gemma 3 (query/key
    norms, RoPE per layer type): to litgpt in pairs rotary and back, K/V heads repeated, input norms
    folded; transformers (eager) computes the source's logits from each, and verify tells a wrong
    post-attention norm apart."""
    b = built(case_id)
    pairs = tmp_path / "pairs"
    assert "computed on random inputs" in ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs",
                                                      "--out", pairs)
    back = tmp_path / "back"
    ok("convert", pairs, "--to", "hf", "--out", back)
    tensors = load_file(back / "model.safetensors")
    assert all(torch.equal(tensors[k], b.tensors[k]) for k in b.tensors)
    assert diff(hf_logits(back), b.logits) < TOL
    mha = tmp_path / "mha"
    ok("convert", b.directory, "--to", "hf", "--kv-heads", 4, "--out", mha)
    assert diff(hf_logits(mha), b.logits) < TOL
    folded = tmp_path / "folded"
    ok("fold-norms", b.directory, "--out", folded)
    assert folded_ok(diff(hf_logits(folded), b.logits), b.logits)
    state = lit_state(pairs)
    state["transformer.h.1.post_attention_norm.weight"] = state["transformer.h.1.post_attention_norm.weight"] * 1.5
    torch.save(state, pairs / "lit_model.pth")
    report = verify_across(open_weights(b.directory), open_weights(pairs))
    assert not report.passed and report.first_difference == "layer 1"


def test_olmo_norms_without_weights(built, tmp_path):
    """OLMo 1's LayerNorms have no tensors: conversions carry none, folding has nothing to fold and says
    so, the rotary order and K/V heads still change exactly."""
    b = built("olmo-no-norm-weights")
    lit = tmp_path / "lit"
    ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", lit)
    assert not any("norm" in name for name in lit_state(lit))
    assert diff(litgpt_logits(lit_config(lit), lit_state(lit)), b.logits) < TOL
    back = tmp_path / "back"
    ok("convert", lit, "--to", "hf", "--out", back)
    assert diff(hf_logits(back), b.logits) < TOL
    text = ok("fold-norms", b.directory, "--out", tmp_path / "folded")
    assert "nothing to fold" in text


def test_olmo2_query_key_norms_over_all_heads(built, tmp_path):
    """OLMo 2's q_norm/k_norm span every head: --rope permutes each head's dims in them, --kv-heads repeats
    the k norm's heads with the K rows; no input norms to fold, the final one folds into the head."""
    b = built("olmo2-qk-norm")
    pairs = tmp_path / "pairs"
    text = ok("convert", b.directory, "--to", "litgpt", "--rope", "pairs", "--out", pairs)
    assert "query/key norm weights permuted alike" in text
    assert diff(litgpt_logits(lit_config(pairs), lit_state(pairs)), b.logits) < TOL
    back = tmp_path / "back"
    ok("convert", pairs, "--to", "hf", "--out", back)
    tensors = load_file(back / "model.safetensors")
    assert all(torch.equal(tensors[k], b.tensors[k]) for k in b.tensors)
    mha = tmp_path / "mha"
    assert "k norm's heads repeated alike" in ok("convert", b.directory, "--to", "hf", "--kv-heads", 4, "--out", mha)
    assert load_file(mha / "model.safetensors")["model.layers.0.self_attn.k_norm.weight"].shape == (32,)
    assert diff(hf_logits(mha), b.logits) < TOL
    folded = tmp_path / "folded"
    ok("fold-norms", b.directory, "--out", folded)
    assert folded_ok(diff(hf_logits(folded), b.logits), b.logits)
