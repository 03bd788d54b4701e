"""Make litgpt checkpoints with random weights at real model shapes, for benchmarks.

    python benchmarks/make_checkpoint.py --shape tinyllama --order legacy --out /tmp/bench/tl-legacy
    python benchmarks/make_checkpoint.py --shape llama2-7b --order legacy --out /tmp/bench/7b-legacy

Weights are random (std 0.02, norm gains near 1), in bf16 by default, written the way litgpt writes
them (`lit_model.pth` by torch.save, `model_config.yaml`). `--order legacy` names the fused QKV
`attn.attn` (litgpt <= 0.5.4, grouped rows), `current` names it `attn.qkv` (sequential rows); the
rows are random either way. Generation runs on a GPU when one is present (much faster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

SHAPES = {
    # litgpt config fields of the real models (only the sizes are real; weights are random)
    "tinyllama": dict(name="tiny-llama-1.1b", n_layer=22, n_embd=2048, n_head=32, n_query_groups=4,
                      intermediate_size=5632, padded_vocab_size=32000, vocab_size=32000),
    "llama2-7b": dict(name="Llama-2-7b-hf", n_layer=32, n_embd=4096, n_head=32, n_query_groups=32,
                      intermediate_size=11008, padded_vocab_size=32000, vocab_size=32000),
    "tiny": dict(name="tiny-llama-test", n_layer=4, n_embd=256, n_head=8, n_query_groups=2,
                 intermediate_size=512, padded_vocab_size=1024, vocab_size=1024),
}
LLAMA = dict(block_size=4096, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP",
             parallel_residual=False, rotary_percentage=1.0, rope_base=10000)


def config_for(shape: str) -> dict:
    cfg = {**LLAMA, **SHAPES[shape]}
    cfg["head_size"] = cfg["n_embd"] // cfg["n_head"]
    return cfg


def random_state_dict(cfg: dict, order: str, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)

    def w(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        t = torch.empty(*shape, device=device, dtype=torch.float32).normal_(mean, std, generator=g)
        return t.to(dtype).cpu()

    E, I, V, hs = cfg["n_embd"], cfg["intermediate_size"], cfg["padded_vocab_size"], cfg["head_size"]
    rows = (cfg["n_head"] + 2 * cfg["n_query_groups"]) * hs
    qkv = "attn" if order == "legacy" else "qkv"
    sd = {"transformer.wte.weight": w(V, E, std=1.0)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = w(E, mean=1.0, std=0.1)
        sd[p + f"attn.{qkv}.weight"] = w(rows, E)
        sd[p + "attn.proj.weight"] = w(E, cfg["n_head"] * hs)
        sd[p + "norm_2.weight"] = w(E, mean=1.0, std=0.1)
        sd[p + "mlp.fc_1.weight"] = w(I, E)
        sd[p + "mlp.fc_2.weight"] = w(I, E)
        sd[p + "mlp.proj.weight"] = w(E, I)
    sd["transformer.ln_f.weight"] = w(E, mean=1.0, std=0.1)
    sd["lm_head.weight"] = w(V, E)
    return sd


def write_hf(sd: dict[str, torch.Tensor], cfg: dict, out: Path, max_shard_size: int) -> None:
    """The same model as a Hugging Face directory (LlamaForCausalLM), written by qkvconv's own writer."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from qkvconv.formats.hf import hf_config_from_litgpt, plan_litgpt_to_hf
    from qkvconv.io.readers import TensorMeta
    from qkvconv.io.writers import SafetensorsWriter

    config_json = hf_config_from_litgpt(cfg, "LlamaForCausalLM")
    plan = plan_litgpt_to_hf(cfg, list(sd), config_json)
    outputs = {r.output: r.apply([sd[i] for i in r.inputs]) for r in plan.recipes}
    layout = {n: TensorMeta.of(t) for n, t in outputs.items()}
    with SafetensorsWriter(out, layout, max_shard_size=max_shard_size) as writer:
        for name, t in outputs.items():
            writer.write(name, t)
    (out / "config.json").write_text(json.dumps(config_json, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--order", choices=["legacy", "current"], default="legacy")
    parser.add_argument("--format", choices=["litgpt", "hf"], default="litgpt",
                        help="hf: safetensors shards + config.json, as save_pretrained writes them")
    parser.add_argument("--max-shard-size", type=int, default=800 * 10**6, help="bytes per shard (hf)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = config_for(args.shape)
    sd = random_state_dict(cfg, args.order, getattr(torch, args.dtype), device, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.format == "hf":
        write_hf(sd, cfg, args.out, args.max_shard_size)
    else:
        torch.save(sd, args.out / "lit_model.pth")
        (args.out / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.suffix in (".pth", ".safetensors"))
    print(f"wrote {args.out} ({size / 1e9:.2f} GB, {sum(t.numel() for t in sd.values()) / 1e9:.2f} B params) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
