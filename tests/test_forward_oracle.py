"""qkvconv.reference.forward against the oracle it imitates: current litgpt's own `litgpt.model.GPT`.

Every family runs from a real litgpt config shrunk to toy sizes (each family keeps its own norm,
MLP, residual, rotary, bias and GQA/MQA flags), with every parameter random and nonzero, so a wrong
norm, bias, head grouping or rotary order shows up as a logit difference far above 1e-5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import yaml

litgpt = pytest.importorskip("litgpt")
from litgpt import Config  # noqa: E402
from litgpt.model import GPT  # noqa: E402

from qkvconv.errors import UnsupportedFamily  # noqa: E402
from qkvconv.model.architecture import Architecture  # noqa: E402
from qkvconv.reference.forward import forward  # noqa: E402

B, T = 2, 12
VOCAB = 96
TOL = 1e-5

torch.set_num_threads(2)


def config_dict(config: Config) -> dict[str, Any]:
    """The plain dict a model_config.yaml holds: litgpt's save_config yaml-dumps asdict(config)."""
    return yaml.safe_load(yaml.dump(dataclasses.asdict(config)))


def tiny(name: str, **overrides: Any) -> Config:
    """A real litgpt config, shrunk: 2 layers, a toy vocabulary, sizes given per family."""
    sizes = dict(n_layer=2, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=32)
    return Config.from_name(name, **{**sizes, **overrides})


def randomized(config: Config, seed: int = 0) -> GPT:
    """litgpt.model.GPT with every parameter random: norm weights near 1, biases clearly nonzero."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name == "transformer.wte.weight":
                p.copy_(torch.randn_like(p))
            else:  # Linear (out, in): unit-scale outputs, so attention is far from uniform
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def getter(state: dict[str, torch.Tensor], log: list[str] | None = None) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if log is not None:
            log.append(name)
        return state[name]  # KeyError when absent, as the interface promises

    return get


def litgpt_states(model: GPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """litgpt's own embed output, per-block outputs and logits, captured with hooks."""
    states: dict[str, torch.Tensor] = {}
    hooks = [model.transformer.wte.register_forward_hook(lambda m, i, o: states.__setitem__("wte", o))]
    for index, blk in enumerate(model.transformer.h):
        hooks.append(blk.register_forward_hook(lambda m, i, o, index=index: states.__setitem__(f"layer {index}", o)))
    with torch.no_grad():
        states["logits"] = model(tokens)
    for h in hooks:
        h.remove()
    return states


def ours(
    config: Config, model: GPT, tokens: torch.Tensor, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    arch = Architecture.from_litgpt_config(config_dict(config))
    with torch.no_grad():
        return dict(forward(arch, getter(model.state_dict()), tokens, dtype=dtype))


# (test id, litgpt config name, shrunk sizes and flags). Sizes keep each family's GQA ratio.
FAMILIES = [
    # LayerNorm, GptNeoxMLP, parallel residual with two norms, 25% rotary, biases, MHA
    ("pythia", "pythia-14m", dict(n_embd=64, n_head=4, head_size=16, intermediate_size=128)),
    # RMSNorm, SwiGLU, sequential residual, full rotary, MHA
    ("llama-2", "Llama-2-7b-hf", dict(n_embd=64, n_head=4, intermediate_size=96)),
    # GQA 4:1, rope_base 500000
    ("llama-3", "Llama-3-8B", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)),
    # Llama-3.1 RoPE frequency adjustments (factor 8, low/high freq factors)
    ("llama-3.1", "Llama-3.1-8B", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)),
    # Llama-3.2: head_size != n_embd / n_head, factor 32 adjustments
    ("llama-3.2", "Llama-3.2-1B", dict(n_embd=64, n_head=4, head_size=32, n_query_groups=1, intermediate_size=96)),
    # GQA 4:1, sliding_window_size 4096 from the config (cannot matter at T=12)
    ("mistral", "Mistral-7B-v0.1", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)),
    # ... and a window shorter than the sequence, so it does matter
    (
        "mistral-window-5",
        "Mistral-7B-v0.1",
        dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96, sliding_window_size=5),
    ),
    # GQA 8:1, head_size 8
    ("tinyllama", "tiny-llama-1.1b", dict(n_embd=64, n_head=16, head_size=8, n_query_groups=2, intermediate_size=96)),
    # GQA 7:1, attention bias only (bias=False), norm_eps 1e-6, head_size * n_head != n_embd
    ("qwen2.5", "Qwen2.5-0.5B", dict(n_embd=64, n_head=14, head_size=8, n_query_groups=2, intermediate_size=96)),
    # query/key norms over head_size (norm_qk "default"); head_size 16 != n_embd / n_head
    ("qwen3", "Qwen3-0.6B", dict(n_embd=64, n_head=8, head_size=16, n_query_groups=2, intermediate_size=96)),
    # LayerNorms without weight or bias (litgpt: "OLMo" in the name)
    ("olmo", "OLMo-1B-hf", dict(n_embd=64, n_head=4, head_size=16, n_query_groups=4, intermediate_size=96)),
    # OLMo 2: query/key norms over all of q and of k, no input norms, norms after attention and MLP
    ("olmo-2", "OLMo-2-1124-7B", dict(n_embd=64, n_head=4, head_size=16, n_query_groups=2, intermediate_size=96)),
    # LayerNorm, GELU MLP, parallel residual with one shared norm, MQA, no biases
    ("falcon-7b", "falcon-7b", dict(n_embd=64, n_head=4, head_size=16, n_query_groups=1, intermediate_size=128)),
    # parallel residual with norm_1 and norm_2 both applied to the block input, GQA 16:1 -> 4:1
    ("falcon-40b", "falcon-40b", dict(n_embd=64, n_head=8, head_size=16, n_query_groups=2, intermediate_size=128)),
    # RMSNorm with (1 + weight), GemmaMLP (tanh GELU), scaled embeddings, MQA, head_size 256 -> 32 > n_embd/n_head
    ("gemma-2b", "Gemma-2b", dict(n_embd=64, n_head=4, head_size=32, n_query_groups=1, intermediate_size=96)),
    # post-attention and post-MLP norms, attention and final logit soft-capping, a window on every other
    # layer, query_pre_attn_scalar != head_size
    ("gemma-2", "Gemma-2-2b", dict(n_embd=64, n_head=4, head_size=32, n_query_groups=2, intermediate_size=96,
                                   sliding_window_size=4, attention_logit_softcapping=5.0,
                                   final_logit_softcapping=3.0, attention_scores_scalar=20)),
    # query/key norms with (1 + w), a local RoPE base on the sliding layers (global ones: rope_base and
    # linear scaling), norms after attention and MLP
    ("gemma-3", "Gemma-3-4b-it", dict(n_layer=3, n_embd=64, n_head=4, head_size=32, n_query_groups=2,
                                      intermediate_size=96, sliding_window_size=4, sliding_window_indices=[1, 0, 1],
                                      rope_indices=[1, 0, 1], attention_scores_scalar=20)),
    # mixture of experts: 4 SiLU-gated experts per layer, 2 per token (softmax over the chosen logits)
    ("mixtral", "Mixtral-8x7B-v0.1", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96, n_expert=4)),
    # ... experts with their own hidden size, query/key norms, 3 of 6 per token
    ("qwen3-moe", "Qwen3-30B-A3B", dict(n_embd=64, n_head=8, head_size=16, n_query_groups=2, intermediate_size=96,
                                        moe_intermediate_size=32, n_expert=6, n_expert_per_token=3)),
    # StarCoder2's shape (no litgpt config of its own): LayerNorm, GptNeoxMLP with biases, sequential
    # residual, GQA, full rotary, a window shorter than the sequence
    ("starcoder2-shape", "pythia-14m", dict(n_embd=64, n_head=4, head_size=16, n_query_groups=2, intermediate_size=128,
                                            parallel_residual=False, rotary_percentage=1.0, sliding_window_size=5)),
    # Granite's with neutral residual/logits multipliers: a Llama with attention_scores_scalar and
    # scale_embeddings (no "Gemma" in the name: plain RMSNorm)
    ("granite-shape", "Llama-3-8B", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96,
                                         attention_scores_scalar=256, scale_embeddings=True)),
    # Gemma-7b: MHA, head_size 256 with n_embd/n_head 192 -> 24 vs 16
    ("gemma-7b", "Gemma-7b", dict(n_embd=64, n_head=4, head_size=24, n_query_groups=4, intermediate_size=96)),
    # pythia with a partial rotary of 50% and litgpt's rope_condense_ratio
    (
        "pythia-condense",
        "pythia-14m",
        dict(n_embd=64, n_head=4, head_size=16, intermediate_size=128, rotary_percentage=0.5, rope_condense_ratio=4),
    ),
    # litgpt's rope_interleave (dims 2i, 2i+1 rotate together) on a GQA Llama-3
    (
        "llama-3-interleave",
        "Llama-3-8B",
        dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96, rope_interleave=True),
    ),
    # ... and on a partial rotary with biases
    (
        "pythia-interleave",
        "pythia-14m",
        dict(n_embd=64, n_head=4, head_size=16, intermediate_size=128, rope_interleave=True),
    ),
]


@pytest.mark.parametrize("name, overrides", [f[1:] for f in FAMILIES], ids=[f[0] for f in FAMILIES])
def test_matches_litgpt_float32(name: str, overrides: dict[str, Any]) -> None:
    config = tiny(name, **overrides)
    model = randomized(config)
    tokens = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))

    expected = litgpt_states(model, tokens)
    got = ours(config, model, tokens)

    assert list(got) == ["embed"] + [f"layer {i}" for i in range(config.n_layer)] + ["logits"]
    assert got["logits"].shape == (B, T, VOCAB)
    # litgpt scales Gemma's embeddings after wte, so compare the raw lookup only where it is unscaled
    if not config.scale_embeddings:
        assert torch.equal(got["embed"], expected["wte"])
    for stage in [f"layer {i}" for i in range(config.n_layer)] + ["logits"]:
        diff = (got[stage] - expected[stage]).abs().max().item()
        assert diff < TOL, f"{stage}: max abs diff {diff:.3g}"
    # the test means something only if the model is far from trivial
    assert expected["logits"].std() > 0.3


def test_sliding_window_changes_the_result() -> None:
    """The short-window Mistral case above would be vacuous if the window did not matter."""
    sizes = dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)
    model = randomized(tiny("Mistral-7B-v0.1", **sizes, sliding_window_size=5))
    tokens = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    windowed = ours(tiny("Mistral-7B-v0.1", **sizes, sliding_window_size=5), model, tokens)["logits"]
    full = ours(tiny("Mistral-7B-v0.1", **sizes), model, tokens)["logits"]
    assert (windowed[:, :5] - full[:, :5]).abs().max() < TOL  # first 5 positions see everything anyway
    assert (windowed[:, 5:] - full[:, 5:]).abs().max() > 1e-2


def test_block_asks_only_for_its_own_layer() -> None:
    """A streaming caller loads one layer at a time: block(i) must not reach into other layers."""
    config = tiny("falcon-40b", n_embd=64, n_head=8, head_size=16, n_query_groups=2, intermediate_size=128)
    model = randomized(config)
    arch = Architecture.from_litgpt_config(config_dict(config))
    tokens = torch.randint(0, VOCAB, (B, T))
    log: list[str] = []
    with torch.no_grad():
        for stage, _ in forward(arch, getter(model.state_dict(), log), tokens, dtype=torch.float32):
            if stage == "embed":
                assert log == ["transformer.wte.weight"]
            elif stage == "logits":
                assert log and all(n.startswith(("transformer.ln_f.", "lm_head.")) for n in log), log
            else:
                index = stage.split()[1]
                assert log and all(n.startswith(f"transformer.h.{index}.") for n in log), log
            log.clear()
    assert arch.n_layer == 2


def _pairs_to_half(state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """docs/layouts.md: within each Q and K head's rotary dims, new row j <- old row (2j if j < d/2 else 2(j-d/2)+1)."""
    d, hs = arch.rope_n_elem, arch.head_size
    within = list(range(0, d, 2)) + list(range(1, d, 2)) + list(range(d, hs))  # new j <- old within[j]
    n_rotating_heads = arch.n_head + arch.n_query_groups  # Q heads then K heads; V rows stay
    rows = [h * hs + j for h in range(n_rotating_heads) for j in within]
    rows += list(range(n_rotating_heads * hs, (arch.n_head + 2 * arch.n_query_groups) * hs))
    index = torch.tensor(rows)
    out = dict(state)
    for name, t in state.items():
        if ".attn.qkv." in name:
            out[name] = t[index]
    return out


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("Llama-3-8B", dict(n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)),
        ("pythia-14m", dict(n_embd=64, n_head=4, head_size=16, intermediate_size=128, rotary_percentage=0.5)),
    ],
    ids=["llama-3-gqa", "pythia-partial-rotary-bias"],
)
def test_rotary_pairs_equal_half_after_row_permutation(name: str, overrides: dict[str, Any]) -> None:
    """A checkpoint in Meta's pairs order, permuted per docs/layouts.md, is the same model in half order."""
    half_config = tiny(name, **overrides)
    pairs_config = tiny(name, **overrides, rope_interleave=True)
    model = randomized(half_config)  # its weights, read as a pairs-order checkpoint
    pairs_arch = Architecture.from_litgpt_config(config_dict(pairs_config))
    half_arch = Architecture.from_litgpt_config(config_dict(half_config))
    assert pairs_arch.rope_interleave and not half_arch.rope_interleave
    tokens = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))

    pairs_state = {k: v.clone() for k, v in model.state_dict().items()}  # load_state_dict below writes in place
    half_state = _pairs_to_half(pairs_state, half_arch)
    with torch.no_grad():
        pairs_logits = dict(forward(pairs_arch, getter(pairs_state), tokens, dtype=torch.float32))["logits"]
        half_logits = dict(forward(half_arch, getter(half_state), tokens, dtype=torch.float32))["logits"]
        model.load_state_dict(half_state)
        litgpt_half_logits = model(tokens)

    assert (pairs_logits - half_logits).abs().max() < TOL
    assert (pairs_logits - litgpt_half_logits).abs().max() < TOL
    # and the permutation is not a no-op: read in the wrong order, the model changes
    with torch.no_grad():
        wrong = dict(forward(half_arch, getter(pairs_state), tokens, dtype=torch.float32))["logits"]
    assert (wrong - pairs_logits).abs().max() > 1e-2


def test_bf16_close_to_float32() -> None:
    config = tiny("Llama-3-8B", n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96)
    model = randomized(config)
    tokens = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    f32 = ours(config, model, tokens, dtype=torch.float32)
    bf16 = ours(config, model, tokens, dtype=torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in bf16.values())
    scale = f32["logits"].abs().max()
    assert (bf16["logits"].float() - f32["logits"]).abs().max() < 0.05 * scale
    # and litgpt itself, run in bf16, lands as close
    with torch.no_grad():
        litgpt_bf16 = model.to(torch.bfloat16)(tokens).float()
    assert (bf16["logits"].float() - litgpt_bf16).abs().max() < 0.05 * scale


UNSUPPORTED = [  # litgpt mixture-of-experts features the forward pass does not compute (DeepSeek's)
    (dict(n_shared_expert=1), "shared experts"),
    (dict(n_expert_groups=2), "grouped expert routing"),
    (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    (dict(first_k_dense_replace=1), "first_k_dense_replace"),
]


@pytest.mark.parametrize("overrides, feature", UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_unsupported_feature_is_refused(overrides: dict[str, Any], feature: str) -> None:
    name = "Mixtral-8x7B-v0.1"
    with pytest.raises(UnsupportedFamily) as info:
        Architecture.from_litgpt_config({**config_dict(Config.from_name(name, n_layer=2)), **overrides})
    message = str(info.value)
    assert feature in message and name in message and "\n" not in message
    assert feature in info.value.reason  # the refused feature, structured (no message parsing)


@pytest.mark.parametrize(
    "overrides, feature",
    [
        (dict(rope_adjustments=dict(factor=4.0, beta_fast=32, beta_slow=1, original_max_seq_len=4096)), "YaRN"),
        (dict(rope_local_base_freq=10000.0), "without rope_indices"),
    ],
    ids=["yarn", "local-rope"],
)
def test_single_unsupported_flag_is_refused(overrides: dict[str, Any], feature: str) -> None:
    cfg = config_dict(tiny("Llama-3-8B", n_embd=64, n_head=8, n_query_groups=2, intermediate_size=96))
    with pytest.raises(UnsupportedFamily, match=feature):
        Architecture.from_litgpt_config({**cfg, **overrides})
