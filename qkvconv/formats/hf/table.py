"""The schema of the family table (families.py): how one Hugging Face architecture is described as
data. `Read` says where config.json keeps a number, `Choose` picks a value by config flags, `Split` and
`Fused` say where q/k/v live, `Block` names the norms, `HFConfig` the config keys, `Family` one entry.
No code here is per family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qkvconv.errors import UnsupportedFamily
from qkvconv.model import names
from qkvconv.model.layout import QKVOrder

REQUIRED: Any = object()  # a Read default: config.json must hold one of the keys
SET: Any = object()  # a flag value in `unsupported`: the key holds any value but null
NOTHING: Any = object()  # Matcher.neutral: no value to write
VARIANT_KEY = "qkvconv_variant"  # config key of the --variant name merged in (variants.py; absent: none chosen)


class Matcher:
    """A flag value in `unsupported` that tests the config's value instead of equalling it.

    `neutral` is a value that does not match, which hf_config_from_litgpt writes into the config.json it
    makes (transformers' default may match: SmolLM3's derived no_rope_layers), or NOTHING.
    """

    def __call__(self, value: Any) -> bool:
        raise NotImplementedError

    def neutral(self, n_layer: int) -> Any:
        return NOTHING


@dataclass(frozen=True)
class Not(Matcher):
    """Any value but `value` (null included): Granite's residual_multiplier other than 1."""

    value: Any

    def __call__(self, value: Any) -> bool:
        return value != self.value

    def neutral(self, n_layer: int) -> Any:
        return self.value


@dataclass(frozen=True)
class NotAll(Matcher):
    """A per-layer list with an item other than `value`, or no list: SmolLM3's no_rope_layers not all 1."""

    value: Any

    def __call__(self, value: Any) -> bool:
        return not isinstance(value, list) or any(item != self.value for item in value)

    def neutral(self, n_layer: int) -> Any:
        return [self.value] * n_layer


@dataclass(frozen=True)
class Contains(Matcher):
    """A list holding `value`: layer_types with a "sliding_attention"."""

    value: Any

    def __call__(self, value: Any) -> bool:
        return isinstance(value, list) and self.value in value


@dataclass(frozen=True)
class Read:
    """A value from config.json: the first of `keys` present and not null, else `default`.

    A dotted key reaches into a nested dict ("rope_parameters.rope_theta"). When qkvconv writes a
    config.json (hf_config_from_litgpt) it writes the first key.

    `divisor`: the model's number is the config's value divided by this (exactly), where a config counts
    something else than the model's unit: Qwen-1's and the original OLMo's MLP size counts the rows of both
    halves of the gated MLP, twice its width. `times`: the model's number is the config's times this (ChatGLM's
    RoPE base is 10000 times `rope_ratio`). Written back divided/multiplied. Defaults are in the config's units.
    """

    keys: tuple[str, ...]
    default: Any = REQUIRED
    divisor: int = 1
    times: float = 1

    def __init__(self, *keys: str, default: Any = REQUIRED, divisor: int = 1, times: float = 1) -> None:
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "divisor", divisor)
        object.__setattr__(self, "times", times)


@dataclass(frozen=True)
class Choose:
    """A table value chosen by config.json flags: the first case whose flags all equal the config's.

    Flags a config.json omits take the family's `flag_defaults` (transformers' defaults).
    """

    cases: tuple[tuple[Mapping[str, Any], Any], ...]

    def __init__(self, *cases: tuple[Mapping[str, Any], Any]) -> None:
        object.__setattr__(self, "cases", cases)


@dataclass(frozen=True)
class Split:
    """Separate q, k, v projections (modules under the layer prefix); their rows concatenate to sequential."""

    q: str
    k: str
    v: str
    kv_heads: Read | int | None  # key/value heads: from config.json, a fixed number, or None (= n_head, MHA)


@dataclass(frozen=True)
class Fused:
    """One fused QKV projection whose rows are in `order` (see docs/layouts.md)."""

    name: str
    order: QKVOrder
    kv_heads: Read | int | None
    transposed: bool = False  # stored [in, out] (GPT-2's Conv1D): the rows of `order` are the tensor's columns
    # (order, who reads it so): other orders in which software reads these same tensors, where nothing in the
    # checkpoint says which wrote it; inspect then calls the layout ambiguous instead of guessing
    also_read_as: tuple[tuple[QKVOrder, str], ...] = ()


@dataclass(frozen=True)
class Block:
    """The norms of one decoder layer and how the residual stream runs through it."""

    norms: Mapping[str, str]  # HF norm module -> litgpt norm module
    parallel_residual: bool | Read  # x + attn(n1(x)) + mlp(n2(x)) instead of two sequential residuals
    shared_attention_norm: bool = False  # parallel residual with one norm feeding attention and MLP


@dataclass(frozen=True)
class Biases:
    """Which linear layers have biases: fixed, or switched by a config.json flag."""

    qkv: bool | Read
    attn_out: bool | Read
    mlp: bool | Read


@dataclass(frozen=True)
class SlidingWindow:
    """Sliding-window attention: the window size, and which layers use it."""

    size: Read  # null: no window
    enabled: bool | Read = True  # Qwen2: `use_sliding_window` must be true as well
    layer_types: str | None = None  # key of a per-layer list of "sliding_attention" / "full_attention"
    first_layer: Read | None = None  # without that list: layers >= this use the window (Qwen2 max_window_layers)
    untyped: bool = True  # without the list and first_layer: every layer uses the window (False: none)


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts MLP in every layer (litgpt LLaMAMoE): a router picks `per_token` of `n_expert`
    SiLU-gated experts per token and weighs them by the softmax of their router logits, renormalised over
    the chosen ones. Tensors as the Hugging Face checkpoints on the Hub store them, one module per expert
    (transformers 5 fuses them in memory and splits them again on save)."""

    router: str  # layer-relative module -> litgpt mlp.gate (no bias)
    experts: str  # layer-relative module of expert {e}: "block_sparse_moe.experts.{e}"
    expert_tensors: Mapping[str, str]  # expert-relative module -> litgpt LLaMAMLP module (fc_1, fc_2, proj)
    n_expert: Read
    per_token: Read
    # each expert's hidden size where it has its own key (Qwen3-MoE moe_intermediate_size); None: the
    # family's intermediate_size is the experts' (Mixtral)
    expert_size: Read | None = None
    # where the router's renormalisation over the chosen experts is a setting (Qwen3-MoE norm_topk_prob);
    # None: always on (Mixtral). litgpt always renormalises: off is refused through `unsupported`.
    renormalize: Read | None = None
    # True: each linear of all the experts in one [n_expert * size, d_model] parameter without a `.weight`
    # suffix, `{experts}.{linear}` (DBRX's ffn.experts.mlp.w1 / v1 / w2): expert e's rows e * size .. (e + 1) *
    # size, the down projection's ([size, d_model]) transposed
    stacked: bool = False

    def modules(self, n_expert: int) -> dict[str, str]:
        """Layer-relative HF module -> litgpt module, for the router and every expert (the router alone where the
        experts are stacked: see `stacked`)."""
        out = {self.router: names.MOE_ROUTER}
        for e in range(n_expert if not self.stacked else 0):
            out.update({f"{self.experts.format(e=e)}.{hf}": names.expert(e, lit) for hf, lit in self.expert_tensors.items()})
        return out


@dataclass(frozen=True)
class HFConfig:
    """Where config.json keeps the numbers of the model, with the defaults of transformers' config class.

    head_size None: n_embd // n_head (the family has no head_dim setting); a Read whose value is absent
    means the same. intermediate_size absent: 4 * n_embd.
    """

    n_embd: Read
    n_layer: Read
    n_head: Read
    head_size: Read | None
    intermediate_size: Read
    vocab_size: Read
    block_size: Read  # max_position_embeddings
    norm_eps: Read
    activation: Read
    tie_embeddings: Read
    rope_theta: Read
    rotary_fraction: Read | float  # share of each head's dims that rotate (GPT-NeoX rotary_pct)
    attention_scores_scalar: Read | None = None  # scores scaled by its -1/2 power instead of head_size's
    attention_softcap: Read | None = None  # attention scores soft-capped at this value (null: not)
    final_softcap: Read | None = None  # logits soft-capped at this value (null: not)
    local_rope_theta: Read | None = None  # Gemma 3: the sliding layers' own RoPE base (unscaled)
    # attention scores times this value instead of head_size ** -0.5 (Granite's attention_multiplier); litgpt
    # has it where it is 1/sqrt of an integer (attention_scores_scalar)
    attention_scale: Read | None = None
    # embeddings times this value (Granite's embedding_multiplier); litgpt has 1 and sqrt(n_embd) (scale_embeddings)
    embedding_scale: Read | None = None
    # rotating dims per head where config.json gives a count instead of a share (CodeGen's rotary_dim; null: all)
    rotary_dims: Read | None = None
    # intermediate_size absent (null): n_embd times this, divided by intermediate_size's divisor (the original
    # OLMo's mlp_ratio); litgpt's and transformers' default is 4
    mlp_ratio: Read | float = 4


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: tensor names, QKV layout, config rules, implied litgpt fields."""

    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    name: str | Choose  # for people: "Llama", "Falcon 7B (multi-query)"
    layer_prefix: str  # "model.layers.{i}"
    qkv: Split | Fused | Choose
    block: Block | Choose
    # other per-layer modules: HF (under layer_prefix) -> litgpt (under transformer.h.{i})
    layer_tensors: Mapping[str, str]
    embedding: str  # -> transformer.wte
    final_norm: str  # -> transformer.ln_f
    lm_head: str  # -> lm_head; absent from the files when tie_embeddings (transformers >= 5 omits it)
    config: HFConfig
    biases: Biases
    norm_class_name: str  # litgpt: "RMSNorm" | "LayerNorm"
    mlp_class_name: str  # litgpt: "LLaMAMLP" | "GemmaMLP" | "GptNeoxMLP"
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight); litgpt derives it from "Gemma" in the name
    scale_embeddings: bool = False  # embeddings times sqrt(n_embd)
    lm_head_bias: bool = False  # the output head has a bias (Phi)
    norm_affine: bool = True  # False: LayerNorms without weight and bias (OLMo; litgpt knows it by "OLMo" in the name)
    # query/key norms (litgpt norm_qk), mapped to attn.norm_q/attn.norm_k through layer_tensors: "default",
    # one RMSNorm over head_dim shared by the heads (Qwen3, Gemma 3); "olmo2", one over all of q and one over
    # all of k (OLMo 2); None: none
    norm_qk: str | None = None
    # HF module whose rows are these litgpt modules' rows, in equal parts, in order (Phi-3 gate_up_proj)
    fused_rows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sliding_window: SlidingWindow | None = None
    moe: MoE | None = None  # experts in place of the dense MLP (then layer_tensors has no MLP modules)
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")  # RoPE scalings its config class accepts
    # transformers' defaults of the flags that `Choose` and `unsupported` test
    flag_defaults: Mapping[str, Any] = field(default_factory=dict)
    # flags that, all matching, mean a feature litgpt lacks, and what to call it ({}: always); a flag's value
    # is compared for equality, or SET, or a Matcher
    unsupported: tuple[tuple[Mapping[str, Any], str], ...] = ()
    ignored: tuple[str, ...] = ()  # regexes of non-weight buffers some checkpoints carry
    # how positions enter the model, for inspect: "rotary, half order" (rotate_half), "rotary, pairs order"
    # (GPT-J's rotate_every_two), "ALiBi", "learned absolute positions"
    positions: str | Choose = "rotary, half order"
    # a remote-code model (config.json `auto_map`, no transformers class): read, never written unless named, and
    # `convert --to hf` writes it as `twin`, the transformers class that computes the same function
    remote_code: bool = False
    twin: str | None = None
    # where config.json cannot tell models apart that compute different functions: the names a user gives with
    # --variant, each the flags (read as config.json keys) it stands for, and what config.json cannot tell
    # (variants.py); without a name the family is refused
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    undecided: str = ""
    # the head's rows are L2-normalised at run time (Baichuan 2's NormHead): the rows are converted normalised
    normalized_head: bool | Read = False
    # (flags, note): what a conversion says where these flags match, about a behaviour it keeps only in part (Qwen-1's
    # long-context switches act past seq_length only); "{block_size}" takes the model's length, "{key}" config.json's value
    caveats: tuple[tuple[Mapping[str, Any], str], ...] = ()
    # the order in which the class rotates each Q/K head's rotating dims: "half" (rotate_half, dims i and i + d/2)
    # or "pairs" (dims 2i and 2i + 1: Glm); pairs is litgpt's rope_interleave, and the rows stay as they are
    rotary_order: str = "half"
    # Beyond litgpt: what `verify`'s reference pass needs of a transformers class litgpt cannot express (convert
    # still refuses it by `unsupported`). `verifiable`: the reference pass computes every `unsupported` feature,
    # through the fields below (formats/hf/reference.py); `unverifiable`: (flags, feature) it does not compute
    # either, refused by verify ({}: always)
    verifiable: bool = False
    unverifiable: tuple[tuple[Mapping[str, Any], str], ...] = ()
    position_embedding: str | None = None  # module of learned absolute positions (GPT-2's transformer.wpe)
    embedding_norm: str | None = None  # module of a LayerNorm on the embeddings (Bloom)
    alibi: str | None = None  # ALiBi biases with "bloom" or "mpt" slopes (reference/alibi.py)
    norm_bias: bool = True  # False: its LayerNorms have no bias (MPT, DBRX)
    clip_qkv: Read | None = None  # the QKV output clamped to [-c, c] (null or 0: not)
    # the logits multiplied by it, or by the product of several (Cohere's logit_scale; JAIS's mup_output_alpha times
    # mup_width_scale); None: not scaled
    logit_scale: Read | tuple[Read, ...] | None = None
    embedding_scale: Read | None = None  # the embeddings (positions added) multiplied by it (JAIS's mup_embeddings_scale)
    qk_dot_by_d: Read | None = None  # true: scores scaled by 1 / head_size, not its square root (JAIS's muP)
    conv1d: tuple[str, ...] = ()  # layer modules stored [in, out] like GPT-2's Conv1D (a fused qkv: `transposed`)
    # transformers' base_model_prefix ("transformer"): files saved from the base model hold the names without it
    # (GPT-2's on the Hub: `h.0.attn.c_attn.weight`), which verify reads as transformers loads them
    base_model_prefix: str | None = None

    @property
    def fusion(self) -> str:
        """"split" (separate q/k/v projections) or "fused" (one QKV matrix), whatever the flags choose."""
        cases = [c for _, c in self.qkv.cases] if isinstance(self.qkv, Choose) else [self.qkv]
        kinds = {"split" if isinstance(c, Split) else "fused" for c in cases}
        assert len(kinds) == 1, f"{self.architecture}: flags switch between fused and split QKV"
        return kinds.pop()

    def flag(self, config_json: Mapping[str, Any], key: str) -> Any:
        """config.json's value of `key` (a dotted key reaches into a nested dict), else transformers' default."""
        node: Any = config_json
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return self.flag_defaults.get(key)
            node = node[part]
        return node

    def matches(self, config_json: Mapping[str, Any], flags: Mapping[str, Any]) -> bool:
        return all(_match(v, self.flag(config_json, k)) for k, v in flags.items())

    @property
    def convertible(self) -> bool:
        """False where litgpt has no equivalent whatever the flags (an `unsupported` entry with no flags)."""
        return all(flags for flags, _ in self.unsupported)

    def refused_features(self, config_json: Mapping[str, Any]) -> list[str]:
        """The `unsupported` features config.json has, in table order."""
        return [feature for flags, feature in self.unsupported if self.matches(config_json, flags)]

    def resolve(self, config_json: Mapping[str, Any]) -> Family:
        """This entry with every `Choose` replaced by the case config.json selects."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Choose):
                for flags, chosen in value.cases:
                    if self.matches(config_json, flags):
                        changes[f.name] = chosen
                        break
                else:
                    seen = {k: self.flag(config_json, k) for flags, _ in value.cases for k in flags}
                    reason = (f"{self.architecture} with {', '.join(f'{k}={v!r}' for k, v in seen.items())} is no "
                              f"layout transformers can run (no case of `{f.name}` matches)")
                    raise UnsupportedFamily(reason)
        return replace(self, **changes)


def _match(want: Any, got: Any) -> bool:
    if want is SET:
        return got is not None
    if isinstance(want, Matcher):
        return want(got)
    return bool(got == want)
