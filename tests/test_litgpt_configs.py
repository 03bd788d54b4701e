"""Issue #13, done when: every config in litgpt 0.5.13's own list (`litgpt.config.configs`, 210 names)
converts to Hugging Face and back exactly, as a tiny random model of that config.

For each name, `shrink` turns `Config.from_name(name)` into a tiny model with the same structure; litgpt's
GPT with seeded random weights (norm gains and biases included) is saved as litgpt saves a checkpoint
(`lit_model.pth`, `model_config.yaml`); qkvconv's library (what `qkvconv convert SRC --to hf` calls, its
own forward check off: the oracles here are independent of qkvconv) converts it to HF and back. Proved:
1. transformers loads the HF directory with no missing, unexpected or mismatched keys and computes
   litgpt's logits (float32, max abs difference <= 1e-5 * max(1, max abs logit));
2. the litgpt checkpoint converted back holds exactly the original tensors (same names, dtypes, bits);
3. its model_config.yaml is litgpt's original config field for field, except the name (qkvconv names a
   model read from config.json after its architecture; what litgpt reads off a name, Gemma's (1 + w)
   RMSNorm and OLMo's weightless LayerNorm, is checked to survive), `hf_config` (where litgpt downloads
   from), `padding_multiple` (unused when padded_vocab_size is given) and LLaMA-2-7B-32K's
   rope_condense_ratio 8, which config.json can only say as linear RoPE scaling by 8 (the same rotation:
   `condensed_as_linear`); litgpt built from it computes the original logits bit for bit.

Why the tiny model keeps each feature (`shrink`; `test_shrinking_keeps_the_structure` checks it):
- every field not named below is copied unchanged: norm class and eps, biases (bias, attn_bias,
  lm_head_bias), parallel residual, shared attention norm, input norms off (norm_1/norm_2), norm_qk and
  its type, post attention/MLP norms, soft-capping values, rope base, condense ratio and adjustments, the
  local rope base, MLP class and GELU approximation, scale_embeddings, the MoE router settings, and the
  name (litgpt derives Gemma's and OLMo's norms from it);
- attention kind: MHA stays MHA (4 heads), MQA stays MQA (4 heads, 1 group), GQA becomes 6 heads in
  2 groups: 3 queries per group, so a bug that swaps the group count and the group size shows;
- head_size: the smallest even size >= 8 whose rotary share (rotary_percentage) is an even whole number
  of dims (0.25 -> 8: 2 dims, 0.4 -> 10: 4, 0.75 -> 8: 6), so partial rotary stays partial and exact;
- n_embd equals n_head * head_size exactly where the original does (Gemma's head_dim is its own setting;
  GPT-NeoX and Falcon derive it); the attention scores' scalar equals head_size exactly where it did;
- per-layer patterns (sliding_window_indices, rope_indices) keep their shortest prefix, of at least 2
  layers, that has every value the original has (Gemma 2: [1, 0]; Gemma 3: 5 local layers then a
  global one, so 6 layers); a sliding window shorter than the original block_size becomes 4 tokens, so
  it acts on the 12-token inputs; one at least block_size long (Mistral v0.1, Phi-3 128k) does nothing
  in litgpt and stays as it is;
- intermediate_size becomes n_embd + 24 (neither n_embd nor Falcon's implicit 4 * n_embd); MoE: 4
  experts, at most 2 per token, moe_intermediate_size 24 where set; vocabulary 96, block_size 32.

Many names shrink to the same tiny model (the Pythia sizes, the Llama 2 chat/base pairs, ...): each
distinct tiny config (with what litgpt reads off the name) is built and checked once, and every name
still is a test case that shrinks its own config and asserts that this config round-trips exactly.
A failure is never cached: each failing name runs, and reports, its own conversion.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
litgpt = pytest.importorskip("litgpt")
from litgpt import Config  # noqa: E402
from litgpt.config import configs as LITGPT_CONFIGS  # noqa: E402
from litgpt.model import GPT  # noqa: E402

from qkvconv.ops.convert import convert  # noqa: E402

NAMES = [c["name"] for c in LITGPT_CONFIGS]
VOCAB, BLOCK, WINDOW = 96, 32, 4
TOKENS = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(13))
RTOL = 1e-5  # of max(1, max abs logit): the repo's float32 convention
# model_config.yaml fields that may differ after HF and back (see the module docstring)
NOT_MODEL_FIELDS = {"name", "hf_config", "padding_multiple"}


def attention_kind(n_head: int, n_query_groups: int) -> str:
    return "MHA" if n_query_groups == n_head else "MQA" if n_query_groups == 1 else "GQA"


TINY_HEADS = {"MHA": (4, 4), "MQA": (4, 1), "GQA": (6, 2)}


def rotary_head_size(rotary_percentage: float) -> int:
    """The smallest even head_size >= 8 whose rotary share is an even whole number of dims."""
    for head_size in range(8, 65, 2):
        dims = rotary_percentage * head_size
        if dims.is_integer() and int(dims) % 2 == 0 and dims > 0:
            return head_size
    raise AssertionError(f"no small head_size fits rotary_percentage {rotary_percentage}")


def pattern_layers(patterns: list[list[int]]) -> int:
    """The fewest layers (>= 2) whose prefix of every pattern holds all of its values."""
    n_layer = 2
    while any(set(p[:n_layer]) != set(p) for p in patterns):
        n_layer += 1
    return n_layer


def shrink(name: str) -> dict[str, Any]:
    """litgpt's config of `name` as a tiny model of the same structure (the rules: module docstring)."""
    big = asdict(Config.from_name(name))
    tiny = dict(big)
    n_head, n_query_groups = TINY_HEADS[attention_kind(big["n_head"], big["n_query_groups"])]
    head_size = rotary_head_size(big["rotary_percentage"])
    derived_embd = big["n_embd"] == big["n_head"] * big["head_size"]
    n_embd = n_head * head_size if derived_embd else n_head * head_size + 8
    patterns = [big[k] for k in ("sliding_window_indices", "rope_indices") if big[k]]
    n_layer = pattern_layers(patterns)
    tiny.update(
        n_layer=n_layer, n_head=n_head, n_query_groups=n_query_groups, head_size=head_size, n_embd=n_embd,
        intermediate_size=n_embd + 24, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=BLOCK,
    )
    for key in ("sliding_window_indices", "rope_indices"):
        if big[key]:
            tiny[key] = big[key][:n_layer]
    if big["sliding_window_size"] is not None and big["sliding_window_size"] < big["block_size"]:
        tiny["sliding_window_size"] = WINDOW
    if big["attention_scores_scalar"] is not None:
        same = big["attention_scores_scalar"] == big["head_size"]
        tiny["attention_scores_scalar"] = head_size if same else head_size + 4
    if big["n_expert"]:
        tiny.update(n_expert=min(4, big["n_expert"]), n_expert_per_token=min(2, big["n_expert_per_token"]))
    if big["moe_intermediate_size"] is not None:
        tiny["moe_intermediate_size"] = 24
    return tiny


def cache_key(tiny: dict[str, Any]) -> str:
    """The tiny config with its name reduced to what litgpt reads off it."""
    meaning = {"Gemma": "Gemma" in tiny["name"], "OLMo": "OLMo" in tiny["name"]}
    fields = {k: v for k, v in tiny.items() if k not in NOT_MODEL_FIELDS}
    return json.dumps({**fields, "name": meaning}, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# the round trip and its oracles


def random_model(config: Config) -> GPT:
    """litgpt's GPT with seeded random weights: gains around 1 (not all one), biases and the rest
    random, matrices scaled by their fan-in so that the logits stay of order 1-10."""
    torch.manual_seed(0)
    model = GPT(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and bool((p == 1).all()):  # a norm's gain
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def norm_of(config: Config) -> tuple[Any, dict[str, Any]]:
    """The norm litgpt builds for a config: its class and what litgpt reads off the name (Gemma's (1 + w)
    RMSNorm, OLMo's LayerNorm without weight and bias)."""
    norm = config.norm_class
    return (norm.func, norm.keywords) if isinstance(norm, functools.partial) else (norm, {})


def litgpt_logits(config: Config, state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(TOKENS)


def hf_logits(directory: Path) -> torch.Tensor:
    """transformers' logits of an HF directory, loaded with no missing, unexpected or mismatched keys.
    Eager attention: transformers' SDPA path drops Gemma 2's attention soft-capping."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, attn_implementation="eager", dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def condensed_as_linear(fields: dict[str, Any]) -> dict[str, Any]:
    """litgpt's rope_condense_ratio c, where nothing else scales the RoPE, as config.json can say it: linear
    RoPE scaling by c (every inverse frequency / c: the same rotation), which litgpt reads back as
    rope_adjustments {"factor": c}. (With a local base litgpt condenses the local layers too; kept.)"""
    c = fields["rope_condense_ratio"]
    if c == 1 or fields["rope_adjustments"] is not None or fields["rope_local_base_freq"] is not None:
        return fields
    return {**fields, "rope_condense_ratio": 1, "rope_adjustments": {"factor": float(c)}}


def check_round_trip(tiny: dict[str, Any], work: Path) -> None:
    """litgpt -> HF -> litgpt with qkvconv's library; AssertionError (or qkvconv's error) on any difference."""
    config = Config(**tiny)
    model = random_model(config)
    original = model.state_dict()
    source = work / "litgpt"
    source.mkdir()
    torch.save(original, source / "lit_model.pth")
    (source / "model_config.yaml").write_text(yaml.safe_dump(asdict(config)))
    with torch.no_grad():
        expected = model(TOKENS)

    hf = work / "hf"
    convert(source, "hf", hf, forward_check=False)
    got = hf_logits(hf)
    tolerance = RTOL * max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff <= tolerance, f"transformers' logits differ from litgpt's by {diff:.3g} (> {tolerance:.3g})"

    back = work / "back"
    convert(hf, "litgpt", back, forward_check=False)
    state = torch.load(back / "lit_model.pth", weights_only=True)
    assert sorted(state) == sorted(original), (
        f"missing {sorted(set(original) - set(state))}, unexpected {sorted(set(state) - set(original))}")
    differ = [k for k in original if state[k].dtype != original[k].dtype or not torch.equal(state[k], original[k])]
    assert not differ, f"tensors not bitwise equal after HF and back: {differ}"

    again = Config.from_file(back / "model_config.yaml")
    fields, original_fields = asdict(again), condensed_as_linear(asdict(config))
    changed = {k: (original_fields[k], fields[k]) for k in fields
               if k not in NOT_MODEL_FIELDS and fields[k] != original_fields[k]}
    assert not changed, f"model_config.yaml fields changed (original, after): {changed}"
    assert norm_of(again) == norm_of(config), f"litgpt reads another norm off {again.name!r} than off {config.name!r}"
    assert torch.equal(litgpt_logits(again, state), expected), "litgpt computes other logits from the round trip"


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], None]:
    """Check a tiny config's round trip once per distinct model; failures are not cached."""
    passed: set[str] = set()

    def run(tiny: dict[str, Any]) -> None:
        key = cache_key(tiny)
        if key not in passed:
            check_round_trip(tiny, tmp_path_factory.mktemp("roundtrip"))
            passed.add(key)

    return run


def test_the_list_is_litgpts() -> None:
    assert len(NAMES) == len(set(NAMES)) == 210


@pytest.mark.parametrize("name", NAMES)
def test_litgpt_config_round_trips_through_hf(name: str, round_trip: Callable[[dict[str, Any]], None]) -> None:
    round_trip(shrink(name))


@pytest.mark.parametrize("name", NAMES)
def test_shrinking_keeps_the_structure(name: str) -> None:
    big, tiny = asdict(Config.from_name(name)), shrink(name)
    small = Config(**tiny)  # litgpt accepts it
    sized = {"n_layer", "n_head", "n_query_groups", "head_size", "n_embd", "intermediate_size", "vocab_size",
             "padded_vocab_size", "block_size", "sliding_window_indices", "rope_indices", "sliding_window_size",
             "attention_scores_scalar", "n_expert", "n_expert_per_token", "moe_intermediate_size"}
    assert {k: v for k, v in tiny.items() if k not in sized} == {k: v for k, v in big.items() if k not in sized}
    assert attention_kind(tiny["n_head"], tiny["n_query_groups"]) == \
        attention_kind(big["n_head"], big["n_query_groups"])
    assert small.rope_n_elem % 2 == 0 and small.rope_n_elem == tiny["rotary_percentage"] * tiny["head_size"]
    assert (small.rope_n_elem < tiny["head_size"]) == (big["rotary_percentage"] < 1)
    assert (tiny["n_embd"] == tiny["n_head"] * tiny["head_size"]) == (big["n_embd"] == big["n_head"] * big["head_size"])
    for key in ("sliding_window_indices", "rope_indices"):
        assert (tiny[key] is None) == (big[key] is None)
        if big[key]:
            assert len(tiny[key]) == tiny["n_layer"] and set(tiny[key]) == set(big[key])
            assert tiny[key] == big[key][: tiny["n_layer"]]
    if big["sliding_window_size"] is not None:
        acts = big["sliding_window_size"] < big["block_size"]
        assert (tiny["sliding_window_size"] < TOKENS.shape[1]) == acts
    if big["attention_scores_scalar"] is not None:
        same = big["attention_scores_scalar"] == big["head_size"]
        assert (tiny["attention_scores_scalar"] == tiny["head_size"]) == same
    assert bool(tiny["n_expert"]) == bool(big["n_expert"])
    assert tiny["n_expert_per_token"] <= min(2, tiny["n_expert"] or 2)
