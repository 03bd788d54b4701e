"""litgpt's state-dict names, defined once: the pivot every format is read into and written from.

    layer(3, QKV)          # "transformer.h.3.attn.qkv"
    layer(3, NORM_1)       # "transformer.h.3.norm_1"
    f"{EMBEDDING}.weight"  # "transformer.wte.weight"

Modules are named without `.weight` / `.bias`. The fused QKV is `attn.qkv` (litgpt >= 0.5.5, sequential
rows) or `attn.attn` (litgpt <= 0.5.4, grouped rows); a LoRA model names a base linear's weight
`<module>.linear.weight` and its adapter `<module>.lora_A` / `<module>.lora_B`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from qkvconv.errors import QkvconvError

LAYER = "transformer.h.{i}"  # every per-layer module lives under it
EMBEDDING = "transformer.wte"
FINAL_NORM = "transformer.ln_f"
HEAD = "lm_head"
# beyond litgpt (which has neither): the names verify reads these transformers tensors under
POSITION_EMBEDDING = "transformer.wpe"  # learned absolute positions (GPT-2, GPT-BigCode)
EMBEDDING_NORM = "transformer.ln_emb"  # a norm on the embeddings (Bloom's word_embeddings_layernorm)

QKV = "attn.qkv"  # current fused QKV (sequential rows)
LEGACY_QKV = "attn.attn"  # litgpt <= 0.5.4 (grouped rows)
ATTN_PROJ = "attn.proj"
NORM_Q, NORM_K = "attn.norm_q", "attn.norm_k"  # query/key norms (norm_qk): over each head's dims
NORM_1, NORM_2 = "norm_1", "norm_2"  # before attention; before the MLP (when not shared)
POST_ATTENTION_NORM, POST_MLP_NORM = "post_attention_norm", "post_mlp_norm"  # after them (Gemma 2)
MLP_FC = "mlp.fc"  # GptNeoxMLP: proj(act(fc(x)))
MLP_FC_1, MLP_FC_2, MLP_PROJ = "mlp.fc_1", "mlp.fc_2", "mlp.proj"  # LLaMAMLP: proj(act(fc_1(x)) * fc_2(x))
MOE_ROUTER = "mlp.gate"  # LLaMAMoE: the router (no bias); expert e is a LLaMAMLP under EXPERT
EXPERT = "mlp.experts.{e}"
EXPERT_LINEARS = ("fc_1", "fc_2", "proj")


def expert(e: int | str, linear: str = "") -> str:
    """Layer-relative name of expert e's module (`mlp.experts.3.fc_1`), or of the expert itself."""
    prefix = EXPERT.format(e=e)
    return f"{prefix}.{linear}" if linear else prefix


def layer(i: int | str, module: str = "") -> str:
    """The name of `module` under layer i (the layer's prefix itself when `module` is empty)."""
    prefix = LAYER.format(i=i)
    return f"{prefix}.{module}" if module else prefix


# transformer.h.{i}.attn.{attn|qkv}.[linear.]{weight|bias|lora_A|lora_B}
QKV_KEY = re.compile(r"^transformer\.h\.(\d+)\.attn\.(attn|qkv)\.((?:linear\.)?(?:weight|bias)|lora_A|lora_B)$")
LEGACY_NAMING, CURRENT_NAMING = LEGACY_QKV, QKV


def qkv_naming(tensor_names: Iterable[str], where: Path | str) -> str | None:
    """`attn.attn` (legacy), `attn.qkv` (current) or None when there are no fused QKV tensors; a file that
    holds both is neither, and refused."""
    found = {m.group(2) for k in tensor_names if (m := QKV_KEY.match(k))}
    if len(found) > 1:
        raise QkvconvError(f"{where} mixes `attn.attn` and `attn.qkv` tensors; it is neither legacy nor current")
    return f"attn.{found.pop()}" if found else None

QK_NORM_KEY = re.compile(r"^transformer\.h\.\d+\.attn\.norm_([qk])\.(weight|bias)$")  # group 1: q or k
