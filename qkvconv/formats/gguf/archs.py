"""llama.cpp's architectures as data: per `general.architecture`, where every litgpt tensor lives in a
GGUF file, what llama.cpp does to it on the way, and how llama.cpp runs the model. Torch-free.

    arch = resolve("falcon", tensor_names)   # Falcon-40B's layout when attn_norm_2 is present
    arch.rope                                # RopeOrder.HALF: llama.cpp's NEOX rope (pairs offset by n_rot/2)
    arch.layer["norm_1"]                     # "attn_norm_2": the norm that feeds attention

Every fact below is read from llama.cpp as vendored in llama-cpp-python 0.3.36 (cited per entry; see
docs/layouts.md "GGUF"): the converter (`convert_hf_to_gguf.py`, `conversion/*.py`), the model graphs
(`src/models/*.cpp`) and `llama_model_rope_type` in `src/llama-model.cpp`, which says which
architectures rotate adjacent pairs of a head's dims ("NORM": Meta's order, litgpt `rope_interleave`) and
which rotate dims i and i + n_rot/2 ("NEOX": the half order of transformers and litgpt).

Tensor names are modules without `.weight` / `.bias` (both map alike); `{i}` is the layer. q/k/v are either
`split` (attn_q, attn_k, attn_v) or `fused` (attn_qkv, rows sequential: Q heads, K heads, V heads, which the
converter makes of Falcon's grouped and GPT-NeoX's per-head rows and which Phi-3's qkv_proj already is).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Collection, Mapping

from qkvconv.errors import UnsupportedFamily
from qkvconv.model import names as L
from qkvconv.model.rotary import RopeOrder

GLOBAL = {L.EMBEDDING: "token_embd", L.FINAL_NORM: "output_norm", L.HEAD: "output"}
QKV_SPLIT = ("blk.{i}.attn_q", "blk.{i}.attn_k", "blk.{i}.attn_v")
QKV_FUSED = "blk.{i}.attn_qkv"

# litgpt module (under transformer.h.{i}) -> GGUF module
LLAMA_LAYER = {
    L.NORM_1: "blk.{i}.attn_norm",
    L.ATTN_PROJ: "blk.{i}.attn_output",
    L.NORM_2: "blk.{i}.ffn_norm",
    L.MLP_FC_1: "blk.{i}.ffn_gate",  # the activated one: down(act(gate(x)) * up(x))
    L.MLP_FC_2: "blk.{i}.ffn_up",
    L.MLP_PROJ: "blk.{i}.ffn_down",
}
NEOX_LAYER = {
    L.NORM_1: "blk.{i}.attn_norm",
    L.ATTN_PROJ: "blk.{i}.attn_output",
    L.NORM_2: "blk.{i}.ffn_norm",
    L.MLP_FC: "blk.{i}.ffn_up",
    L.MLP_PROJ: "blk.{i}.ffn_down",
}
QK_NORMS = {L.NORM_Q: "blk.{i}.attn_q_norm", L.NORM_K: "blk.{i}.attn_k_norm"}

# llama.cpp's GELU (ggml_gelu, used by LLM_FFN_GELU) is the tanh approximation on the CPU and GPU
# backends; GGUF records no activation, so this is how llama.cpp runs every GELU architecture here.
GGML_GELU = "tanh"


@dataclass(frozen=True)
class Windows:
    """llama.cpp's interleaved sliding windows and what its Gemma graphs set with them (load_arch_hparams of
    src/models/gemma2.cpp and gemma3.cpp): which layers slide, how they rotate, Q's scale, soft-capping."""

    period: int  # load_swa_pattern(ml, period) without attention.sliding_window_pattern: see swa_layers
    size: int | None  # n_swa without attention.sliding_window; None: no window then (every layer global)
    local_rope: bool  # sliding layers rotate with rope.freq_base_swa (default 10000), unscaled; False: as the others
    wide_q_layers: int  # the 27B's n_layer: Q scaled by 1/sqrt(n_embd / n_head) there, else 1/sqrt(head_dim)
    attn_softcap: float | None  # scores always capped, by attn_logit_softcapping or this default; None: never
    final_softcap: float  # logits capped by final_logit_softcapping or this default; 0: not capped (gemma3 only
    # tests it: gemma2 divides by it, so a gemma2 model must cap)


@dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture (`general.architecture`) as qkvconv reads and writes it."""

    name: str  # general.architecture
    label: str  # for people, and litgpt's `name` (which decides Gemma's 1 + w norms)
    rope: RopeOrder  # NORM -> pairs, NEOX -> half (llama_model_rope_type)
    qkv: str  # "split" | "fused"
    layer: Mapping[str, str]  # litgpt module -> GGUF module, per layer (q/k/v apart)
    norm_class_name: str  # "RMSNorm" | "LayerNorm"
    mlp_class_name: str  # "LLaMAMLP" | "GptNeoxMLP" | "GemmaMLP"
    eps_key: str  # attention.layer_norm_rms_epsilon | attention.layer_norm_epsilon
    parallel_residual: bool = False
    parallel_residual_key: str | None = None  # a metadata key that says it (gptneox.use_parallel_residual)
    shared_attention_norm: bool = False  # one norm feeds attention and MLP (Falcon-7B, Phi-2)
    gate_up: bool = False  # ffn_up holds gate then up rows (Phi-3's gate_up_proj), no ffn_gate
    norm_offset: float = 0.0  # the converter stores Gemma's norm weights as 1 + w
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(n_embd) (the graph's ggml_scale)
    norm_qk: str | None = None  # litgpt norm_qk_type of attn_q_norm / attn_k_norm
    tied_only: bool = False  # no output tensor at all: the head is token_embd (Gemma)
    output_required: bool = False  # llama.cpp loads no file without `output` (written even for a tied head)
    windows: Windows | None = None  # None: llama.cpp ignores any window (every earlier token is attended to)
    norm_weights: bool = True  # False: LayerNorms without weight or bias, so no norm tensors (OLMo; litgpt drops
    # them where its name holds "OLMo", as `label` does)
    full_rotary: bool = False  # llama.cpp refuses rope.dimension_count other than the head size (or asserts it)
    heads_span_embd: bool = False  # Q is n_embd wide: head_size * n_head must be n_embd (no key_length read)
    where: str = ""  # where in llama.cpp this is done (docs)
    converter: str = ""  # the HF architecture whose converter class writes it
    gelu: str = GGML_GELU
    # biases llama.cpp's graph has for it (src/models/*.cpp): on q/k/v ("optional" or "required"), and on the
    # other linears (attention output, MLP); writing refuses a model whose biases do not fit
    qkv_bias: str = "none"
    proj_bias: str = "none"
    experts: str = "none"  # a mixture of experts in every layer: "none", "optional" (llama: Mixtral), "required"
    multipliers: bool = False  # Granite's scale keys (attention.scale, embedding_scale, residual_scale, logit_scale)
    no_rope_step: int = 0  # llama.cpp's n_no_rope_layer_step: layer il without RoPE where (il + 1) % step == 0
    keys: frozenset[str] = frozenset()  # `{arch}.*` keys it reads beyond every architecture's (reading.KNOWN_KEYS)
    # llama.cpp loads q/k/v either way (llama-model.cpp create_tensor_qkv: attn_qkv where present, else attn_q/k/v):
    # a file with attn_qkv is read as fused, and these HF classes are written fused, as their converter writes them
    fused_converters: tuple[str, ...] = ()
    # how positions enter where not by RoPE (the reference pass's fields, model/architecture.py REFERENCE_DEFAULTS):
    # llama.cpp's learned position table or its embedding norm (litgpt module -> GGUF module, once per model), and
    # ALiBi: ggml_soft_max_ext's slopes for max_bias 8 are build_alibi_tensor's ("bloom"; alibi.py)
    more_global: Mapping[str, str] = field(default_factory=dict)
    alibi: str | None = None
    rotary: bool = True  # False: no RoPE in the graph, whatever rope.dimension_count says
    rotary_layers: tuple[int, ...] = ()  # RoPE only for models of these layer counts (the graph's model-type switch)
    alibi_layers: tuple[int, ...] = ()  # ALiBi of max bias 8 ("bloom" slopes) and no RoPE for these layer counts
    alibi_key: bool = False  # ALiBi as attention.max_alibi_bias says (0 or absent: none; 8: `alibi`'s slopes)
    ffn_scale: int = 1  # feed_forward_length / the FFN tensors' width (qwen: 2, llama.cpp's n_ff/2)
    logit_scale: bool = False  # the logits times `{arch}.logit_scale` where set and nonzero (command-r)
    # tensors (`{i}`: any layer) the graph never creates, though the source class may have them: llama.cpp refuses a
    # file that holds one (command-r: no attn_output bias, while CohereForCausalLM's attention_bias gives o_proj one)
    unloaded: tuple[str, ...] = ()
    one_kv_head: bool = False  # the graph takes one K/V head whatever the file says (starcoder: multi-query only)
    kv_key: bool = True  # its converter writes attention.head_count_kv (gpt2, mpt: absent, llama.cpp takes n_head)
    # its converter writes attention.key_length/value_length and rope.dimension_count; False: it leaves them to
    # llama.cpp's defaults (n_embd / n_head, every dim rotated), which heads_span_embd and full_rotary then ensure
    head_keys: bool = True
    # attn_q_norm/attn_k_norm, a weight per head (norm_qk "per_head"), loaded and required only in models of at
    # least this many layers (command-r: 64, Command R+); 0: none
    qk_norm_layers: int = 0
    clamp_required: bool = False  # llama.cpp requires attention.clamp_kqv (written 0, no clamping, where unset)
    qk_scale_power: float = 0.5  # Q·K scaled by head_size ** -power (jais: 1, muP's 1/d; windows: Windows says)
    # the embedding and logit scales a source has are multiplied into token_embd and output, as its converter does
    # (jais: mup_embeddings_scale, mup_output_alpha * mup_width_scale); the graph applies none
    baked_scales: bool = False
    norm_bias: str = "required"  # the LayerNorms' bias: "required", "optional" (mpt: MPT's no_bias) or "none"
    # (command-r's build_norm(attn_norm, NULL)): llama.cpp loads the file only so

    @property
    def norm_1(self) -> bool:
        """litgpt's norm_1: a norm before attention, with a tensor or without (OLMo's); OLMo 2 has none."""
        return L.NORM_1 in self.layer or not self.norm_weights

    def module(self, litgpt_module: str, i: int | str) -> str:
        return self.layer[litgpt_module].format(i=i)

    def qkv_modules(self, i: int | str) -> tuple[str, ...]:
        return tuple(m.format(i=i) for m in QKV_SPLIT) if self.qkv == "split" else (QKV_FUSED.format(i=i),)


LLAMA = GGUFArch(
    "llama", "Llama (GGUF)", RopeOrder.PAIRS, "split", LLAMA_LAYER, "RMSNorm", "LLaMAMLP",
    "attention.layer_norm_rms_epsilon", converter="LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM",
    qkv_bias="optional", experts="optional",
    full_rotary=True,
    where="conversion/llama.py LlamaModel.modify_tensors permutes q_proj and k_proj (LlamaModel.permute, per "
          "head: half -> pairs; K with num_key_value_heads); src/models/llama.cpp reads no sliding window; "
          "llama-model.cpp load_hparams: n_rot must be the head size",
)
QWEN2 = GGUFArch(
    "qwen2", "Qwen2 (GGUF)", RopeOrder.HALF, "split", LLAMA_LAYER, "RMSNorm", "LLaMAMLP",
    "attention.layer_norm_rms_epsilon", converter="Qwen2ForCausalLM", qkv_bias="required",
    where="conversion/qwen.py Qwen2Model: tensors renamed only; NEOX rope",
)
QWEN3 = replace(QWEN2, name="qwen3", label="Qwen3 (GGUF)", layer={**LLAMA_LAYER, **QK_NORMS}, norm_qk="default",
                qkv_bias="none",
                converter="Qwen3ForCausalLM", where="conversion/qwen.py Qwen3Model: tensors renamed only; NEOX rope")
QWEN3MOE = replace(QWEN3, name="qwen3moe", label="Qwen3-MoE (GGUF)", converter="Qwen3MoeForCausalLM", experts="required",
                   where="conversion/qwen.py Qwen3MoeModel (Qwen2MoeModel.modify_tensors): the experts of a layer "
                         "stacked into 3D ffn_gate_exps / ffn_up_exps / ffn_down_exps; NEOX rope; "
                         "src/models/qwen3moe.cpp always renormalises the chosen experts' weights")
PHI3 = GGUFArch(
    "phi3", "Phi-3 (GGUF)", RopeOrder.HALF, "fused",
    {L.NORM_1: "blk.{i}.attn_norm", L.ATTN_PROJ: "blk.{i}.attn_output", L.NORM_2: "blk.{i}.ffn_norm",
     L.MLP_PROJ: "blk.{i}.ffn_down"},
    "RMSNorm", "LLaMAMLP", "attention.layer_norm_rms_epsilon", gate_up=True, converter="Phi3ForCausalLM",
    where="conversion/phi.py Phi3MiniModel: qkv_proj and gate_up_proj kept fused (attn_qkv, ffn_up; "
          "src/models/phi3.cpp splits ffn_up with swiglu, gate first); its sliding window is switched off "
          "(\"Phi SWA is currently disabled\")",
)
FALCON = GGUFArch(
    "falcon", "Falcon 7B (GGUF)", RopeOrder.HALF, "fused", {k: v for k, v in NEOX_LAYER.items() if k != L.NORM_2},
    "LayerNorm", "GptNeoxMLP",
    "attention.layer_norm_epsilon", parallel_residual=True, shared_attention_norm=True,
    converter="FalconForCausalLM", full_rotary=True,
    where="conversion/falcon.py FalconModel.modify_tensors re-orders query_key_value from grouped (per KV group: "
          "its Q heads, K, V) to sequential; src/models/falcon.cpp: attention reads attn_norm_2 where present "
          "(Falcon-40B: HF ln_attn), the MLP attn_norm (HF ln_mlp; Falcon-7B: the one shared input_layernorm)",
)
FALCON_40B = replace(FALCON, label="Falcon 40B (GGUF)", shared_attention_norm=False,
                     layer={**NEOX_LAYER, L.NORM_1: "blk.{i}.attn_norm_2", L.NORM_2: "blk.{i}.attn_norm"})
GPTNEOX = GGUFArch(
    "gptneox", "GPT-NeoX (GGUF)", RopeOrder.HALF, "fused", NEOX_LAYER, "LayerNorm", "GptNeoxMLP",
    "attention.layer_norm_epsilon", parallel_residual=True, parallel_residual_key="use_parallel_residual",
    converter="GPTNeoXForCausalLM", qkv_bias="required", proj_bias="required", output_required=True,
    heads_span_embd=True,
    where="conversion/gptneox.py GPTNeoXModel.modify_tensors re-orders query_key_value (weight and bias) from "
          "per-head (q_h, k_h, v_h) to sequential; rope.dimension_count = rotary_pct * head_size",
)
GEMMA = GGUFArch(
    "gemma", "Gemma (GGUF)", RopeOrder.HALF, "split", LLAMA_LAYER, "RMSNorm", "GemmaMLP",
    "attention.layer_norm_rms_epsilon", norm_offset=1.0, scale_embeddings=True, tied_only=True,
    converter="GemmaForCausalLM",
    where="conversion/gemma.py GemmaModel.modify_tensors stores every norm weight as w + 1 and drops lm_head "
          "(tied); src/models/gemma.cpp scales embeddings by sqrt(n_embd), Q by 1/sqrt(head_dim), GELU-gated MLP",
)
GEMMA2 = replace(
    GEMMA, name="gemma2", label="Gemma 2 (GGUF)", converter="Gemma2ForCausalLM",
    layer={**LLAMA_LAYER, L.POST_ATTENTION_NORM: "blk.{i}.post_attention_norm",
           L.POST_MLP_NORM: "blk.{i}.post_ffw_norm"},
    windows=Windows(period=2, size=4096, local_rope=False, wide_q_layers=46, attn_softcap=50.0,
                    final_softcap=30.0),
    keys=frozenset({"attn_logit_softcapping", "final_logit_softcapping", "attention.sliding_window_pattern"}),
    where="conversion/gemma.py Gemma2Model: norm weights stored as w + 1, lm_head dropped; src/models/gemma2.cpp: "
          "the window on layers il % 2 == 0 (load_swa_pattern(2), default 4096), Q scaled by 1/sqrt(head_dim) "
          "(27B, 46 layers: 1/sqrt(n_embd / n_head)) whatever query_pre_attn_scalar was, attention and final "
          "logits soft-capped (defaults 50 and 30, llama-hparams.h)",
)
GEMMA3 = replace(
    GEMMA2, name="gemma3", label="Gemma 3 (GGUF)", converter="Gemma3ForCausalLM",
    layer={**GEMMA2.layer, **QK_NORMS}, norm_qk="default", tied_only=False,
    windows=Windows(period=6, size=None, local_rope=True, wide_q_layers=62, attn_softcap=None, final_softcap=0.0),
    keys=frozenset({"final_logit_softcapping", "attention.sliding_window_pattern", "rope.freq_base_swa"}),
    where="conversion/gemma.py Gemma3Model: every norm weight (attn_q_norm, attn_k_norm too) stored as w + 1, "
          "rope.freq_base from rope_parameters.full_attention, rope.freq_base_swa from sliding_attention, linear "
          "scaling (rope.scaling.*) from full_attention, attention.sliding_window unless sliding_window_pattern "
          "is 1, "
          "final_logit_softcapping where set, attn_logit_softcapping must be null; src/models/gemma3.cpp: with a "
          "window, layers il % 6 < 5 slide (load_swa_pattern(6)) and rotate with freq_base_swa unscaled "
          "(llama_model::get_rope_freq_base/scale), the others with freq_base and the scaling; without one every "
          "layer is global; Q scaled by 1/sqrt(head_dim) (62 layers: 1/sqrt(n_embd / n_head)) whatever "
          "query_pre_attn_scalar was; no score soft-capping; output optional (tied: token_embd)",
)
STABLELM = GGUFArch(
    "stablelm", "StableLM (GGUF)", RopeOrder.HALF, "split", LLAMA_LAYER, "LayerNorm", "LLaMAMLP",
    "attention.layer_norm_epsilon", converter="StableLmForCausalLM", qkv_bias="optional", output_required=True,
    where="conversion/stablelm.py: tensors renamed only; a model without ffn_norm runs attention and MLP in "
          "parallel on attn_norm (use_parallel_residual)",
)
PHI2 = GGUFArch(
    "phi2", "Phi-2 (GGUF)", RopeOrder.HALF, "split", {k: v for k, v in NEOX_LAYER.items() if k != L.NORM_2},
    "LayerNorm", "GptNeoxMLP", "attention.layer_norm_epsilon", parallel_residual=True, shared_attention_norm=True,
    converter="PhiForCausalLM", qkv_bias="required", proj_bias="required", output_required=True,
    where="conversion/phi.py Phi2Model: tensors renamed only; one LayerNorm feeds attention and MLP in parallel",
)
OLMO2 = GGUFArch(
    "olmo2", "OLMo 2 (GGUF)", RopeOrder.HALF, "split",
    {L.ATTN_PROJ: "blk.{i}.attn_output", L.POST_ATTENTION_NORM: "blk.{i}.post_attention_norm",
     L.POST_MLP_NORM: "blk.{i}.post_ffw_norm", L.MLP_FC_1: "blk.{i}.ffn_gate", L.MLP_FC_2: "blk.{i}.ffn_up",
     L.MLP_PROJ: "blk.{i}.ffn_down", **QK_NORMS},
    "RMSNorm", "LLaMAMLP", "attention.layer_norm_rms_epsilon", norm_qk="olmo2", converter="Olmo2ForCausalLM",
    output_required=True,
    where="conversion/olmo.py Olmo2Model: tensors renamed only; NEOX rope",
)
OLMO = GGUFArch(
    "olmo", "OLMo (GGUF)", RopeOrder.PAIRS, "split",
    {k: v for k, v in LLAMA_LAYER.items() if k not in (L.NORM_1, L.NORM_2)}, "LayerNorm", "LLaMAMLP",
    "attention.layer_norm_epsilon", norm_weights=False, converter="OlmoForCausalLM", qkv_bias="optional",
    full_rotary=True, heads_span_embd=True,
    where="conversion/olmo.py OlmoModel.modify_tensors permutes q_proj and k_proj as LlamaModel does (half -> "
          "pairs), writes layer_norm_epsilon 1e-5 (OlmoLayerNorm's fixed eps) and clip_qkv as clamp_kqv; "
          "src/models/olmo.cpp: LayerNorms without weight or bias (build_norm(NULL, NULL, LLM_NORM)), no norm "
          "tensors, Q of n_embd rows, n_rot = head size asserted, q/k/v biases optional, output optional (tied)",
)
STARCODER2 = GGUFArch(
    "starcoder2", "StarCoder2 (GGUF)", RopeOrder.HALF, "split", NEOX_LAYER, "LayerNorm", "GptNeoxMLP",
    "attention.layer_norm_epsilon", converter="Starcoder2ForCausalLM", qkv_bias="required", proj_bias="required",
    heads_span_embd=True,
    where="conversion/starcoder.py StarCoder2Model: tensors renamed only; NEOX rope; src/models/starcoder2.cpp: "
          "LayerNorms with biases, attn_output and ffn_up/ffn_down biases required, sequential residual, tanh GELU "
          "MLP, Q scaled by 1/sqrt(head_dim), no sliding window",
)
SMOLLM3 = replace(
    LLAMA, name="smollm3", label="SmolLM3 (GGUF)", converter="SmolLM3ForCausalLM", qkv_bias="none", experts="none",
    no_rope_step=4, full_rotary=False,
    where="conversion/llama.py SmolLM3Model (LlamaModel): q_proj/k_proj permuted half -> pairs like Llama's; "
          "src/models/smollm3.cpp: n_no_rope_layer_step = 4 is fixed (layer il has no RoPE where (il + 1) % 4 == 0), "
          "so only models of fewer than 4 layers rotate in every layer as litgpt does",
)
GRANITE = replace(
    LLAMA, name="granite", label="Granite (GGUF)", converter="GraniteForCausalLM", qkv_bias="none", experts="none",
    multipliers=True, full_rotary=False, heads_span_embd=True,
    keys=frozenset({"attention.scale", "embedding_scale", "residual_scale", "logit_scale"}),
    where="conversion/granite.py GraniteModel (LlamaModel): q_proj/k_proj permuted half -> pairs, head_dim dropped, "
          "attention_multiplier -> attention.scale, embedding_multiplier -> embedding_scale, residual_multiplier -> "
          "residual_scale, logits_scaling -> logit_scale (each written where truthy); src/models/granite.cpp: Q·K "
          "scaled by attention.scale (0 or absent: 1/sqrt(head_dim)), logits divided by logit_scale (required), "
          "residual branches times residual_scale and embeddings times embedding_scale where nonzero",
)

CHATGLM = GGUFArch(
    "chatglm", "ChatGLM / GLM-4 (GGUF)", RopeOrder.PAIRS, "split", PHI3.layer, "RMSNorm", "LLaMAMLP",
    "attention.layer_norm_rms_epsilon", gate_up=True, converter="GlmForCausalLM, ChatGLMModel, "
    "ChatGLMForConditionalGeneration", qkv_bias="optional", heads_span_embd=True,
    fused_converters=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    where="conversion/chatglm.py ChatGLMModel: no tensor hook, so GlmForCausalLM's q_proj/k_proj/v_proj go to "
          "attn_q/attn_k/attn_v and ChatGLM's query_key_value to attn_qkv unchanged (both already rotate in pairs: "
          "no permutation), gate_up_proj / dense_h_to_4h to ffn_up (gate rows, then up); rope.dimension_count = "
          "(hidden_size / num_attention_heads) * partial_rotary_factor (0.5), rope.freq_base = 10000 * rope_ratio "
          "(GlmForCausalLM's rope_theta is not read); src/models/chatglm.cpp: NORM rope on the first n_rot dims, "
          "Q scaled by 1/sqrt(head size), attn_output n_embd x n_embd without bias, ffn_up split by swiglu (gate "
          "first), output optional (tied: token_embd)",
)

INTERNLM2 = replace(
    LLAMA, name="internlm2", label="InternLM2 (GGUF)", converter="InternLM2ForCausalLM", experts="none",
    full_rotary=False, heads_span_embd=True, output_required=True,
    where="conversion/internlm.py InternLM2Model.modify_tensors cuts attention.wqkv (grouped: per K/V group its Q "
          "heads, K, V) into attn_q / attn_k / attn_v and permutes Q and K half -> pairs (LlamaModel.permute; a wqkv "
          "bias would not reshape: only bias-free models convert); src/models/internlm2.cpp: NORM rope, attn_output "
          "without bias, SiLU-gated MLP, output required",
)
BAICHUAN = replace(
    LLAMA, name="baichuan", label="Baichuan 7B (GGUF)", converter="BaichuanForCausalLM", qkv_bias="none",
    experts="none", full_rotary=False, heads_span_embd=True, output_required=True, rotary_layers=(32,),
    alibi_layers=(40,),
    where="conversion/baichuan.py BaichuanModel.modify_tensors cuts W_pack into thirds (attn_q / attn_k / attn_v) "
          "and permutes Q and K half -> pairs (_reverse_hf_permute_part); src/models/baichuan.cpp rotates only a "
          "model of 32 layers (LLM_TYPE_7B), gives one of 40 ALiBi (13B: f_max_alibi_bias 8, no key, no RoPE; "
          "ggml's slopes for max_bias 8 are Baichuan's _get_interleave) and any other no positions at all",
)

# GPT-2-shaped graphs (src/models/gpt2.cpp, starcoder.cpp, bloom.cpp): LayerNorms with biases, one attn_qkv of
# sequential rows with its bias, attn_output n_embd x n_embd, ffn_up / ffn_down with biases, LLM_FFN_GELU (ggml's
# tanh GELU), sequential residuals, Q scaled by 1/sqrt(n_embd / n_head), output optional (tied: token_embd). qkvconv
# writes them from transformers' classes read as verify reads them (learned positions, ALiBi: fields litgpt has not;
# formats/base.py Format.holds_reference), with the keys their converter writes and no RoPE keys
GPT2 = GGUFArch(
    "gpt2", "GPT-2 (GGUF)", RopeOrder.HALF, "fused", NEOX_LAYER, "LayerNorm", "GptNeoxMLP",
    "attention.layer_norm_epsilon", converter="GPT2LMHeadModel", qkv_bias="required", proj_bias="required",
    heads_span_embd=True, more_global={L.POSITION_EMBEDDING: "position_embd"}, rotary=False, kv_key=False,
    where="conversion/gpt2.py GPT2Model.modify_tensors transposes the Conv1D weights (c_attn, c_proj, c_fc) into "
          "Linear's [out, in], c_attn's rows kept sequential (Q, K, V); feed_forward_length = 4 * n_embd; "
          "src/models/gpt2.cpp adds position_embd rows 0.. to the embeddings, no RoPE",
)
STARCODER = replace(
    GPT2, name="starcoder", label="StarCoder / GPT-BigCode (GGUF)", converter="GPTBigCodeForCausalLM",
    one_kv_head=True, kv_key=True,
    where="conversion/starcoder.py StarCoderModel: c_attn (a Linear) kept as it is, head_count_kv written as 1 "
          "(multi-query: all Q heads, then one K and one V, sequential); src/models/starcoder.cpp: position_embd "
          "added, no RoPE; a multi-head GPT-BigCode (per-head rows, 3 * n_embd) does not fit head_count_kv 1",
)
BLOOM = replace(
    GPT2, name="bloom", label="Bloom (GGUF)", converter="BloomForCausalLM", more_global={L.EMBEDDING_NORM:
                                                                                        "token_embd_norm"},
    alibi="bloom", kv_key=True,
    where="conversion/bloom.py BloomModel.modify_tensors re-orders query_key_value (weight and bias) from per-head "
          "(q_h, k_h, v_h) to sequential; src/models/bloom.cpp: token_embd_norm (LayerNorm) on the embeddings, "
          "ALiBi with f_max_alibi_bias = 8 fixed in load_arch_hparams (ggml_soft_max_ext: the slopes of "
          "build_alibi_tensor), no RoPE",
)
# src/models/mpt.cpp: LayerNorm and linear biases optional (MPT's no_bias: none), position_embd optional, QKV
# clamped by attention.clamp_kqv (llama-graph.cpp build_qkv), q/k LayerNorms where present, ALiBi by
# attention.max_alibi_bias
MPT = replace(
    GPT2, name="mpt", label="MPT (GGUF)", converter="MPTForCausalLM, MptForCausalLM", qkv_bias="optional",
    proj_bias="optional", norm_bias="optional",
    more_global={}, alibi="mpt", alibi_key=True, keys=frozenset({"attention.clamp_kqv", "attention.max_alibi_bias"}),
    where="conversion/mpt.py MPTModel (registered for MosaicML's MPTForCausalLM, not transformers' MptForCausalLM, "
          "whose tensors and config keys are the same): tensors renamed only (Wqkv sequential -> attn_qkv); "
          "layer_norm_epsilon written as 1e-5, feed_forward_length 4 * d_model, attn_config.clip_qkv as "
          "attention.clamp_kqv, attention.max_alibi_bias = attn_config.alibi_bias_max where attn_config.alibi, "
          "else 0 (no ALiBi: transformers' MptModel adds it whatever attn_config.alibi says); ggml's slopes for "
          "max_bias 8 are build_mpt_alibi_tensor's",
)

QWEN = replace(
    QWEN2, name="qwen", label="Qwen-1 (GGUF)", qkv="fused", converter="QWenLMHeadModel", heads_span_embd=True,
    output_required=True, ffn_scale=2,
    where="conversion/qwen.py QwenModel: no tensor hook, so c_attn ([q; k; v] rows and bias) goes to attn_qkv as it "
          "is, mlp.w2 to ffn_gate and mlp.w1 to ffn_up (gguf-py tensor_mapping.py); feed_forward_length is the "
          "config's intermediate_size, twice the MLP width; src/models/qwen.cpp: attn_qkv (n_embd x 3 n_embd, bias "
          "required), attn_output without bias, ffn_gate/ffn_up/ffn_down n_ff/2 wide, output required, RMS norms "
          "with attention.layer_norm_rms_epsilon (required), NEOX rope (llama_model_rope_type)",
)

# transformers' CohereForCausalLM (a LayerNorm without bias, a logit scale: no litgpt target holds it, GGUF does)
COMMAND_R = GGUFArch(
    "command-r", "Command R (GGUF)", RopeOrder.PAIRS, "split", {k: v for k, v in LLAMA_LAYER.items() if k != L.NORM_2},
    "LayerNorm", "LLaMAMLP", "attention.layer_norm_epsilon", parallel_residual=True, shared_attention_norm=True,
    tied_only=True, heads_span_embd=True, full_rotary=True, head_keys=False, qkv_bias="optional", logit_scale=True,
    keys=frozenset({"logit_scale"}), qk_norm_layers=64,
    unloaded=("blk.{i}.attn_output.bias",), norm_bias="none",
    converter="CohereForCausalLM",
    where="conversion/command_r.py CommandR2Model: tensors renamed only (q_proj/k_proj already rotate in pairs: "
          "no permutation), logit_scale written, rope.scaling.type none; src/models/command-r.cpp: one LayerNorm "
          "without bias (build_norm(attn_norm, NULL, LLM_NORM)) feeds attention and the SiLU-gated MLP, both added "
          "to the residual; NORM rope; Q·K scaled by 1/sqrt(head_dim); q/k biases optional (create_tensor_qkv), "
          "attn_output without bias; attn_q_norm {head_dim, n_head} / attn_k_norm {head_dim, n_head_kv}, a LayerNorm "
          "weight per head without bias (build_norm over each head's dims), loaded and required for 64 layers or "
          "more, else none; the head is always "
          "token_embd (TENSOR_DUPLICATED), the logits times logit_scale where nonzero",
)

# JAIS (remote code): GPT-2's shape with ALiBi, SwiGLU and muP scales
JAIS = replace(
    GPT2, name="jais", label="JAIS (GGUF)", layer=LLAMA_LAYER, mlp_class_name="LLaMAMLP", converter="JAISLMHeadModel",
    more_global={}, alibi="bloom", alibi_key=True, keys=frozenset({"attention.max_alibi_bias"}), output_required=True,
    qk_scale_power=1.0, baked_scales=True,
    where="conversion/jais.py JaisModel (asserts activation_function swiglu and position_embedding_type alibi): the "
          "Conv1D weights transposed, c_fc to ffn_up and c_fc2 to ffn_gate (gguf-py tensor_mapping.py), token_embd "
          "multiplied by mup_embeddings_scale and output by mup_output_alpha * mup_width_scale (or width_scale), "
          "max_alibi_bias from relative_pe.slopes (8 where absent), no head_count_kv, no RoPE keys; "
          "src/models/jais.cpp: LayerNorms with biases, attn_qkv and attn_output with biases, Q·K scaled by "
          "1/head_size (muP), ALiBi by attention.max_alibi_bias, ffn_down(silu(ffn_gate(x)) * ffn_up(x)) with "
          "biases, output required",
)

# transformers' DbrxForCausalLM (LayerNorms without bias, a mixture of experts stored stacked, QKV clamped)
DBRX = GGUFArch(
    "dbrx", "DBRX (GGUF)", RopeOrder.HALF, "fused",
    {L.NORM_1: "blk.{i}.attn_norm", L.ATTN_PROJ: "blk.{i}.attn_output", L.NORM_2: "blk.{i}.attn_output_norm"},
    "LayerNorm", "LLaMAMLP", "attention.layer_norm_epsilon", experts="required", norm_bias="none",
    full_rotary=True, heads_span_embd=True, head_keys=False, output_required=True, clamp_required=True,
    keys=frozenset({"attention.clamp_kqv"}), converter="DbrxForCausalLM",
    where="conversion/dbrx.py DbrxModel: Wqkv (sequential) to attn_qkv as it is, norm_1 to attn_norm, norm_2 to "
          "attn_output_norm, the router to ffn_gate_inp; ffn.experts.mlp.w1 / v1 viewed as [n_expert, n_ff, n_embd] "
          "(ffn_gate_exps / ffn_up_exps), w2 viewed so and transposed per expert (ffn_down_exps); "
          "layer_norm_epsilon written as 1e-5, attn_config.clip_qkv as attention.clamp_kqv (required by "
          "src/models/dbrx.cpp, 0: no clamp), no key_length nor rope.dimension_count (n_embd / n_head, asserted "
          "equal to n_rot); src/models/dbrx.cpp: LayerNorms without bias (build_norm(.., NULL, LLM_NORM)), NEOX "
          "rope, attn_output without bias, output required, build_moe_ffn with SiLU-gated experts, softmax gating "
          "and the chosen weights renormalised (norm_w true), expert_weights_scale 0 (not applied)",
)

ARCHS: dict[str, GGUFArch] = {a.name: a for a in (LLAMA, QWEN2, QWEN3, QWEN3MOE, PHI3, FALCON, GPTNEOX, GEMMA,
                                                  GEMMA2, GEMMA3, STABLELM, PHI2, OLMO, OLMO2, STARCODER2, SMOLLM3,
                                                  GRANITE, CHATGLM, GPT2, STARCODER, BLOOM, INTERNLM2, BAICHUAN,
                                                  MPT, QWEN, COMMAND_R, DBRX, JAIS)}

# litgpt's LLaMAMoE router and experts (under transformer.h.{i}) <-> llama.cpp's, whose experts of one layer are
# stacked in one 3D tensor per linear (expert e: index e of its first dim); src/models/llama.cpp renormalises
# the chosen experts' softmax weights (build_moe_ffn norm_w = true), as litgpt does
ROUTER = "blk.{i}.ffn_gate_inp"
EXPERTS = {"fc_1": "blk.{i}.ffn_gate_exps", "fc_2": "blk.{i}.ffn_up_exps", "proj": "blk.{i}.ffn_down_exps"}
DENSE_MLP = (L.MLP_FC, L.MLP_FC_1, L.MLP_FC_2, L.MLP_PROJ)


# llama_model_rope_type (src/llama-model.cpp, llama-cpp-python 0.3.36) by general.architecture, for inspect of
# architectures qkvconv does not map: NORM rotates adjacent pairs, NEOX dims i and i + n_rot/2
ROPE_NORM = frozenset((
    "llama llada llama4 deci baichuan starcoder internlm2 minicpm xverse command-r cohere2 cohere2moe olmo arctic "
    "deepseek deepseek2 deepseek2-ocr deepseek32 deepseek4 muse-glimmer plm chatglm granite granitemoe granitehybrid "
    "graniteswitch granite_swa chameleon bailingmoe neo-bert smollm3 arcee ernie4_5 ernie4_5-moe mistral3 eagle3 "
    "mistral4 llama-embed maincoder glm-dsa dots3note nanbeige pockettts").split())
ROPE_NEOX = frozenset((
    "falcon falcon-h1 grok dbrx bert jina-bert-v3 modern-bert nomic-bert nomic-bert-moe eurobert stablelm bitnet qwen "
    "qwen2 dream qwen2moe qwen3 qwen3moe llada-moe rnd1 olmo2 olmoe phi2 phi3 phimoe plamo plamo2 plamo3 gemma gemma2 "
    "gemma3 gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 openelm gptneox codeshell orion nemotron exaone "
    "exaone4 exaone-moe minicpm3 bailingmoe2 dots1 hunyuan-moe jais2 gpt-oss hunyuan-dense hy_v3 lfm2 lfm2moe "
    "smallthinker seed_oss grovemoe apertus minimax-01 minimax-m2 minimax-m3 cogvlm pangu-embedded afmoe laguna "
    "qwen3next mimo2 step35 spark2_5 talkie mellum maple hrm_text").split())


def rope_of(name: str) -> RopeOrder | None:
    """How llama.cpp rotates architecture `name` (None: no RoPE, or an order chosen at run time)."""
    return RopeOrder.PAIRS if name in ROPE_NORM else RopeOrder.HALF if name in ROPE_NEOX else None


def for_layers(arch: GGUFArch, n_layer: int) -> GGUFArch:
    """The entry as llama.cpp builds a model of `n_layer` layers (command-r: per-head q/k norms from 64 layers;
    baichuan: ALiBi at 40)."""
    if arch.qk_norm_layers and n_layer >= arch.qk_norm_layers:
        return replace(arch, layer={**arch.layer, **QK_NORMS}, norm_qk="per_head")
    if n_layer in arch.alibi_layers:  # baichuan's 13B (40 layers): ALiBi instead of RoPE
        return replace(arch, label=arch.label.replace("7B", "13B"), alibi="bloom", rotary=False, rotary_layers=())
    return arch


def resolve(name: str, tensor_names: Collection[str], n_layer: int = 0) -> GGUFArch:
    """The entry of `general.architecture`, with the variant its tensors show (Falcon-40B: attn_norm_2;
    StableLM without ffn_norm: parallel residual on one norm) and its block count (for_layers). Unknown
    architectures are refused."""
    arch = ARCHS.get(name)
    if arch is None:
        raise UnsupportedFamily(f"GGUF architecture {name!r} is not one qkvconv reads (it reads: {', '.join(ARCHS)})")
    arch = for_layers(arch, n_layer)
    if arch.fused_converters and "blk.0.attn_qkv.weight" in tensor_names:
        return replace(arch, qkv="fused")
    if arch is FALCON and "blk.0.attn_norm_2.weight" in tensor_names:
        return FALCON_40B
    if arch is STABLELM and "blk.0.ffn_norm.weight" not in tensor_names:
        return replace(arch, parallel_residual=True, shared_attention_norm=True,
                       layer={k: v for k, v in arch.layer.items() if k != L.NORM_2})
    return arch


def for_family(cfg: Mapping[str, object]) -> GGUFArch | None:
    """The architecture `convert --to gguf` writes for a litgpt config, or None (no llama.cpp architecture
    computes it): chosen by what the config computes, as llama.cpp's converter chooses by the HF class."""
    from qkvconv.model.architecture import Architecture

    mlp, norm = cfg.get("mlp_class_name"), cfg.get("norm_class_name")
    mlp = "LLaMAMLP" if mlp == "LLaMAMoE" else mlp
    weights = Architecture.from_litgpt_config(cfg).norm_affine
    for arch in _WRITE_ORDER:
        if arch.mlp_class_name == mlp and arch.norm_class_name == norm and arch.norm_weights == weights and \
                _fits(arch, cfg):
            return arch
    return None


def _fits(arch: GGUFArch, cfg: Mapping[str, object]) -> bool:
    parallel, shared = bool(cfg.get("parallel_residual")), bool(cfg.get("shared_attention_norm"))
    if arch.parallel_residual_key is None and (parallel, shared) != (arch.parallel_residual, arch.shared_attention_norm):
        return False
    if arch.parallel_residual_key is not None and shared:
        return False
    if not bias_fits(arch.experts, cfg.get("mlp_class_name") == "LLaMAMoE"):
        return False
    proj = bool(cfg.get("bias"))
    qkv = proj or bool(cfg.get("attn_bias"))
    if not bias_fits(arch.qkv_bias, qkv) or not bias_fits(arch.proj_bias, proj):
        return False
    if bool(cfg.get("post_attention_norm")) != (L.POST_ATTENTION_NORM in arch.layer):
        return False
    norm_qk = cfg.get("norm_qk_type", "default") if cfg.get("norm_qk") else None
    return norm_qk == arch.norm_qk and bool(cfg.get("norm_1", True)) == arch.norm_1


def bias_fits(rule: str, present: bool) -> bool:
    """Whether biases `present` (or not) fit an architecture's rule: "none", "optional" or "required"."""
    return rule == "optional" or present == (rule == "required")


# StarCoder2 before GPT-NeoX: a sequential-residual GPT-NeoX shape (LayerNorms, biases, GELU MLP) is StarCoder2's
# (transformers' GPTNeoX is parallel by default and MHA only; llama.cpp's starcoder2 also loads a tied head)
_WRITE_ORDER = (LLAMA, QWEN3, QWEN3MOE, GEMMA, GEMMA2, GEMMA3, STARCODER2, GPTNEOX, FALCON, FALCON_40B, OLMO, OLMO2)


def query_scalar(windows: Windows, n_layer: int, n_embd: int, n_head: int, head_size: int) -> int:
    """What llama.cpp's Gemma 2 / 3 scale Q by the -1/2 power of: n_embd / n_head for the 27B (its layer count),
    else head_size (src/models/gemma2.cpp, gemma3.cpp; the file has no query_pre_attn_scalar)."""
    return n_embd // n_head if n_layer == windows.wide_q_layers else head_size


def swa_layers(n_layer: int, pattern: int) -> list[int]:
    """llama_hparams::set_swa_pattern(n, dense_first=false): layer il slides when il % n < n - 1 (n = 0: all)."""
    return [int(pattern == 0 or il % pattern < pattern - 1) for il in range(n_layer)]


__all__ = ["ARCHS", "GGUFArch", "GGML_GELU", "Windows", "bias_fits", "for_layers", "resolve", "rope_of", "for_family",
           "query_scalar", "swa_layers"]
