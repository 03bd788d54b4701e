"""A reference forward pass of litgpt-style decoder models, in plain torch.

`qkvconv verify` uses it to decide, from the numbers alone, whether a converted checkpoint computes
the same function as its source: shapes never tell a QKV row order (see docs/layouts.md), logits do.
It mirrors current litgpt's `litgpt.model.GPT` (0.5.13) operation for operation, so in float32 it
matches litgpt to 1e-6 or better (bitwise where the op order is the same), yet it imports neither
litgpt nor transformers, and it reads weights through a getter one layer at a time, so a caller can
stream a checkpoint that does not fit in memory.

    arch = Architecture.from_litgpt_config(yaml.safe_load(open("model_config.yaml")))
    state = torch.load("lit_model.pth", mmap=True, weights_only=True)
    for stage, h in forward(arch, state.__getitem__, tokens, dtype=torch.float32):
        print(stage, h.shape)  # embed, layer 0, ..., layer {n_layer - 1}, logits

`get(name)` returns a tensor by its current litgpt state-dict name (`transformer.h.3.attn.qkv.weight`,
rows in sequential Q, K, V order) and raises KeyError when it is absent. Which optional tensors are
asked for (biases) is decided by the config, as litgpt's strict load does: a bias the config
promises but the checkpoint lacks surfaces as that KeyError instead of being read as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from qkvconv.model.architecture import Architecture
from qkvconv.model import names
from qkvconv.reference import alibi

Getter = Callable[[str], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# building blocks


def _param(get: Getter, name: str, like: torch.Tensor) -> torch.Tensor:
    """A weight in the caller's compute dtype and device: litgpt runs every op in the model dtype."""
    return get(name).to(device=like.device, dtype=like.dtype)


def _linear(get: Getter, prefix: str, x: torch.Tensor, bias: bool) -> torch.Tensor:
    b = _param(get, f"{prefix}.bias", x) if bias else None
    return F.linear(x, _param(get, f"{prefix}.weight", x), b)


def _norm(arch: Architecture, get: Getter, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.LayerNorm (OLMo's without weight and bias; MPT's and DBRX's without bias), or litgpt's RMSNorm
    (which always computes in float32, then casts back)."""
    if not arch.norm_affine:
        return F.layer_norm(x, (x.size(-1),), None, None, arch.norm_eps)
    weight = _param(get, f"{prefix}.weight", x)
    bias = _param(get, f"{prefix}.bias", x) if arch.norm_class_name == "LayerNorm" and arch.norm_bias else None
    if weight.dim() == 2:  # a weight per head (norm_qk "per_head"), x (B, nh, T, hs): broadcast over T
        weight, bias = weight.unsqueeze(1), None if bias is None else bias.unsqueeze(1)
        if arch.norm_class_name == "LayerNorm":
            x = F.layer_norm(x, (x.size(-1),), None, None, arch.norm_eps) * weight
            return x if bias is None else x + bias
    if arch.norm_class_name == "LayerNorm":
        return F.layer_norm(x, (x.size(-1),), weight, bias, arch.norm_eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + arch.norm_eps)
    if arch.norm_unit_offset:
        weight = 1 + weight  # in the model dtype, as litgpt does it
    return (x32 * weight.float()).to(dtype=x.dtype)


def _rope_cache(arch: Architecture, T: int, device: torch.device, *, local: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, rope_n_elem) in float32, as litgpt's build_rope_cache (first T rows). `local`:
    a Gemma 3 sliding layer's, with the local base and no scaling."""
    n = arch.rope_n_elem
    base = arch.rope_local_base if local else arch.rope_base
    theta = 1.0 / (base ** (torch.arange(0, n, 2, device=device).float() / n))  # (n/2,)
    scaling = "none" if local else arch.rope_scaling
    if scaling == "llama3":
        wavelen = 2 * torch.pi / theta
        ratio = arch.rope_original_max_seq_len / wavelen
        smooth = (ratio - arch.rope_low_freq_factor) / (arch.rope_high_freq_factor - arch.rope_low_freq_factor)
        smooth = torch.clamp(smooth, min=0.0, max=1.0)
        theta = (1 - smooth) * (theta / arch.rope_factor) + smooth * theta
    elif scaling == "linear":
        theta = theta / arch.rope_factor
    positions = torch.arange(T, device=device).float() / arch.rope_condense_ratio  # (T,)
    angles = torch.outer(positions, theta).repeat(1, 2)  # (T, n): frequency i at columns i and i + n/2
    return torch.cos(angles), torch.sin(angles)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the rotary dims of x (B, nh, T, n); cos/sin (T, n) in float32, result in x's dtype.

    Half ("rotate_half", litgpt/NeoX/HF): dim i pairs with dim i + n/2.
    Pairs (Meta's original Llama, GPT-J): dim 2i pairs with 2i + 1, both at frequency i; the output
    stays in the input's dim order. litgpt's `apply_rope_interleave` instead leaves its output in
    [even dims, odd dims] order; applied to Q and K alike, that reorder cancels in q @ k^T.
    """
    half = x.size(-1) // 2
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, n/2) each
        c, s = cos[:, :half], sin[:, :half]
        roped = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (B, nh, T, n/2, 2)
        return roped.flatten(-2).to(dtype=x.dtype)  # (B, nh, T, n)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, nh, T, n)
    return ((x * cos) + (rotated * sin)).to(dtype=x.dtype)


def _attention(arch: Architecture, index: int, get: Getter, x: torch.Tensor) -> torch.Tensor:
    """litgpt's CausalSelfAttention without KV cache: fused sequential QKV (clamped where the config says),
    query/key norms, RoPE, GQA, causal attention (soft-capped, or with ALiBi biases, where the config says)."""
    B, T, _ = x.shape
    H, G, hs, n = arch.n_head, arch.n_query_groups, arch.head_size, arch.rope_n_elem
    prefix = names.layer(index, "attn")

    qkv = _linear(get, f"{prefix}.qkv", x, arch.qkv_bias)  # (B, T, (H + 2G) * hs)
    if arch.clip_qkv is not None:  # MPT, DBRX: clamp(min=-clip_qkv, max=clip_qkv)
        qkv = qkv.clamp(min=-arch.clip_qkv, max=arch.clip_qkv)
    q, k, v = qkv.split((H * hs, G * hs, G * hs), dim=-1)
    if arch.norm_qk == "olmo2":  # over all of q and all of k: (B, T, H * hs), (B, T, G * hs)
        q = _norm(arch, get, names.layer(index, names.NORM_Q), q)
        k = _norm(arch, get, names.layer(index, names.NORM_K), k)
    q = q.view(B, T, H, hs).transpose(1, 2)  # (B, nh_q, T, hs)
    k = k.view(B, T, G, hs).transpose(1, 2)  # (B, nh_k, T, hs)
    v = v.view(B, T, G, hs).transpose(1, 2)  # (B, nh_v, T, hs)
    if arch.norm_qk in ("default", "per_head"):  # a norm over each head's hs dims: shared, or each head's own
        q = _norm(arch, get, names.layer(index, names.NORM_Q), q)
        k = _norm(arch, get, names.layer(index, names.NORM_K), k)

    if n > 0:
        local = arch.rope_local_base is not None and arch.rope_local_layers[index]
        cos, sin = _rope_cache(arch, T, x.device, local=local)
        q = torch.cat((_apply_rope(q[..., :n], cos, sin, arch.rope_interleave), q[..., n:]), dim=-1)
        k = torch.cat((_apply_rope(k[..., :n], cos, sin, arch.rope_interleave), k[..., n:]), dim=-1)

    if G != H:
        # Each K/V head serves q_per_kv consecutive query heads.
        k = k.repeat_interleave(arch.q_per_kv, dim=1)  # (B, nh_q, T, hs)
        v = v.repeat_interleave(arch.q_per_kv, dim=1)  # (B, nh_q, T, hs)

    mask = None
    window = arch.sliding_window_size
    if window is not None and arch.sliding_window_layers[index] and window < T:
        # Query i sees keys i - window + 1 .. i. A window of >= T is plain causal attention.
        i = torch.arange(T, device=x.device)
        offset = i[:, None] - i[None, :]  # (T, T): query position minus key position
        mask = (offset >= 0) & (offset < window)  # (T, T), True = attend
    cap = arch.attention_logit_softcapping
    if cap is None and arch.alibi is None:
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=0.0, scale=arch.attention_scale, is_causal=mask is None
        )  # (B, nh_q, T, hs)
    else:  # soft-capped or biased scores: litgpt's (and transformers' eager) way
        scores = q @ k.mT * arch.attention_scale  # (B, nh_q, T, T)
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        if arch.alibi is not None:  # Bloom rounds its bias to the model dtype; MPT's stays float32
            bias = alibi.bias(arch.alibi, H, T, x.device, arch.alibi_bias_max)  # (nh_q, 1, T)
            scores = scores + (bias.to(scores.dtype) if arch.alibi == "bloom" else bias)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = F.softmax(scores, dim=-1, dtype=torch.float).to(dtype=q.dtype) @ v  # (B, nh_q, T, hs)
    y = y.transpose(1, 2).reshape(B, T, H * hs)  # (B, T, nh_q * hs)
    return _linear(get, f"{prefix}.proj", y, arch.proj_bias)  # (B, T, n_embd)


def _activation(arch: Architecture, x: torch.Tensor) -> torch.Tensor:
    """GptNeoxMLP's activation, each written as transformers 5.3 computes it (activations.py; Bloom's
    bloom_gelu_forward)."""
    if arch.mlp_activation == "gelu_new":  # NewGELUActivation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if arch.mlp_activation == "gelu_bloom":
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    if arch.mlp_activation == "relu2":  # ReLUSquaredActivation
        return torch.square(F.relu(x))
    return F.gelu(x, approximate=arch.gelu_approximate)


def _mlp(arch: Architecture, prefix: str, get: Getter, x: torch.Tensor) -> torch.Tensor:
    """The MLP under `prefix` (a layer's `mlp`, or one expert of it: LLaMAMLP)."""
    bias = arch.mlp_bias
    if arch.mlp_class_name == "GptNeoxMLP":
        h = _activation(arch, _linear(get, f"{prefix}.fc", x, bias))
    else:
        gate = _linear(get, f"{prefix}.fc_1", x, bias)  # (B, T, intermediate_size)
        up = _linear(get, f"{prefix}.fc_2", x, bias)  # (B, T, intermediate_size)
        if arch.mlp_class_name == "GemmaMLP":
            h = F.gelu(gate, approximate=arch.gelu_approximate) * up
        else:  # LLaMAMLP, and each expert of LLaMAMoE
            h = F.silu(gate) * up
    return _linear(get, f"{prefix}.proj", h, bias)  # (B, T, n_embd)


Probe = Callable[[torch.Tensor, torch.Tensor], None]


def _moe(arch: Architecture, index: int, get: Getter, x: torch.Tensor, probe: Probe | None = None) -> torch.Tensor:
    """litgpt's LLaMAMoE: each token goes to the n_expert_per_token experts with the largest router
    logits, weighted by the softmax over those logits (equal to transformers' softmax over all experts
    renormalised over the chosen ones); outputs summed expert by expert in index order, as litgpt does.

    The output depends only on the experts the tokens pick. `probe`, where given, also receives the router
    logits (B*T, n_expert) and every expert's output on every token (n_expert, B*T, n_embd), computed apart
    from the model's own arithmetic, so that a check can cover the experts no token reaches."""
    B, T, C = x.shape
    flat = x.reshape(B * T, C)  # (B*T, C)
    router = F.linear(flat, _param(get, names.layer(index, f"{names.MOE_ROUTER}.weight"), x))  # (B*T, n_expert)
    if probe is not None:
        probe(router, torch.stack([_mlp(arch, names.layer(index, names.expert(e)), get, flat)
                                   for e in range(arch.n_expert)]))
    probs, chosen = torch.topk(router, arch.n_expert_per_token)  # (B*T, k) each
    probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
    y = torch.zeros_like(flat)  # (B*T, C)
    for e in range(arch.n_expert):
        token, slot = torch.where(chosen == e)
        if token.numel():
            out = _mlp(arch, names.layer(index, names.expert(e)), get, flat[token])  # (n, C)
            y[token] += probs[token, slot, None] * out
    return y.view(B, T, C)


# ---------------------------------------------------------------------------------------------
# public API: one call per stage, so a caller can load, run and drop one layer at a time


_math_settled = False


def settle_math() -> None:
    """Make the process's first vectorised math call now, on one thread, so that every later one is repeatable.

    torch's CPU tanh/exp/sin/cos of float32 run through MKL's vector math, whose code path is chosen on the
    process's first call. When that first call is a parallel one (over 2048 elements: torch splits it across
    threads), the threads race that choice, and in about 1 fresh process of 12 (2 threads, torch 2.13) the main
    thread's share of that one call comes out of another code path, a few ulp off on every element. Bloom's
    GELU was such a first call: the reference side's layer 0 then differed from the candidate's by 2.5e-5 of
    its scale, and `verify` of two identical models failed. One small call first, here, settles it: in 150
    fresh processes each, the race showed in 13 without it and in none after one tanh, exp or sin.
    """
    global _math_settled
    if not _math_settled:
        t = torch.full((8,), 0.5)  # under the grain size: computed on this thread alone
        for op in (torch.tanh, torch.exp, torch.sin, torch.cos, torch.log, torch.erf):
            op(t)
        _math_settled = True


def embed(arch: Architecture, get: Getter, tokens: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T, n_embd) on tokens' device, in `dtype` (default: the weight's dtype).

    The dtype chosen here is the compute dtype of every later stage (they follow x). The first stage of every
    pass, so it settles the math library first (settle_math).
    """
    settle_math()
    weight = get(f"{names.EMBEDDING}.weight")
    x = F.embedding(tokens.to(weight.device), weight)  # (B, T, n_embd); gather first, then move
    x = x.to(device=tokens.device, dtype=dtype or weight.dtype)
    if arch.scale_embeddings:
        # Gemma: scale by sqrt(n_embd) rounded to the compute dtype, as litgpt does.
        x = x * torch.tensor(arch.n_embd**0.5, dtype=x.dtype, device=x.device)
    if arch.learned_positions:  # GPT-2: inputs_embeds + wpe(positions 0 .. T-1)
        table = get(f"{names.POSITION_EMBEDDING}.weight")
        x = x + table[: tokens.size(-1)].to(device=x.device, dtype=x.dtype)
    x = scaled_embeddings(arch, x)
    if arch.embedding_norm:  # Bloom: word_embeddings_layernorm
        x = _norm(arch, get, names.EMBEDDING_NORM, x)
    return x


def scaled_embeddings(arch: Architecture, x: torch.Tensor) -> torch.Tensor:
    """x times the embedding scale, in x's dtype (JAIS: `hidden_states *= torch.tensor(float(embeddings_scale),
    dtype=...)`, positions added); the check compares embedding tables through it too (ops/check.py)."""
    if arch.embedding_scale == 1.0:
        return x
    return x * torch.tensor(arch.embedding_scale, dtype=x.dtype, device=x.device)


def block(arch: Architecture, index: int, get: Getter, x: torch.Tensor, *, probe: Probe | None = None) -> torch.Tensor:
    """Transformer block `index` (B, T, n_embd) -> (B, T, n_embd); asks `get` for that layer only.

    Sequential: x + attn(norm_1(x)), then + mlp(norm_2(.)). Parallel residual: x + attn(norm_1(x))
    + mlp(n(x)) where n is norm_1 when shared_attention_norm (Falcon-7B) else norm_2 applied to the
    same input x (NeoX, Falcon-40B). `probe`: a mixture of experts' router logits and every expert's
    output on this layer's MLP input (see _moe); never called for a dense MLP.
    """
    prefix = names.layer(index)
    x_normed = _norm(arch, get, f"{prefix}.{names.NORM_1}", x) if arch.norm_1 else x
    attention_output = _attention(arch, index, get, x_normed)
    if arch.post_attention_norm:  # Gemma 2: the output normed before the residual add
        attention_output = _norm(arch, get, names.layer(index, names.POST_ATTENTION_NORM), attention_output)
    if arch.parallel_residual:
        if not arch.shared_attention_norm:
            x_normed = _norm(arch, get, f"{prefix}.{names.NORM_2}", x)
        x = attention_output + x
    else:
        x = attention_output + x
        x_normed = _norm(arch, get, f"{prefix}.{names.NORM_2}", x) if arch.norm_2 else x
    if arch.n_expert:
        mlp_output = _moe(arch, index, get, x_normed, probe)
    else:
        mlp_output = _mlp(arch, names.layer(index, "mlp"), get, x_normed)
    if arch.post_mlp_norm:
        mlp_output = _norm(arch, get, names.layer(index, names.POST_MLP_NORM), mlp_output)
    return mlp_output + x


def head(arch: Architecture, get: Getter, x: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head (its output scaled by logit_scale, capped by final_logit_softcapping where the
    architecture says): (B, T, n_embd) -> (B, T, padded_vocab_size) logits."""
    x = _norm(arch, get, names.FINAL_NORM, x)
    logits = _linear(get, names.HEAD, x, arch.lm_head_bias)
    if arch.logit_scale != 1.0:  # Cohere: lm_head(x) * logit_scale, before any cap (Cohere has none)
        logits = logits * arch.logit_scale
    if arch.final_logit_softcapping is not None:
        cap = arch.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def forward(
    arch: Architecture, get: Getter, tokens: torch.Tensor, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ("embed", h), ("layer 0", h), ..., (f"layer {n_layer - 1}", h), ("logits", logits).

    A generator, so the caller can compare each stage against another model as it goes and stop at
    the first one that differs.
    """
    x = embed(arch, get, tokens, dtype=dtype)
    yield "embed", x
    for index in range(arch.n_layer):
        x = block(arch, index, get, x)
        yield f"layer {index}", x
    yield "logits", head(arch, get, x)
