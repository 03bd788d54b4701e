"""Megatron-LM and NeMo checkpoints: `inspect` names the fused QKV order, and conversion refuses them.

The Megatron-LM files are written by someone else's code: transformers' own megatron_gpt2 script
(`convert_checkpoint_from_transformers_to_megatron`) from a tiny GPT-2, at tensor parallelism 1 and 2. It
needs Megatron only for `_vocab_size_with_padding`, which a stub module supplies (Megatron's own rule:
pad to a multiple of make_vocab_size_divisible_by * tensor parallel size). The order inspect names is then
checked on the numbers: undoing it on the file's rows gives GPT-2's own (sequential) c_attn back.
Megatron-core (`linear_qkv`) and NeMo files, and the older checkpoint versions, are built here from the
layout facts in docs/layouts.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder

transformers = pytest.importorskip("transformers")
script = pytest.importorskip("transformers.models.megatron_gpt2.checkpoint_reshaping_and_interoperability")

H, D, LAYERS = 4, 32, 2
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=D, n_head=H, n_layer=LAYERS, n_positions=64, vocab_size=96, n_inner=64)
    model = transformers.GPT2LMHeadModel(config)
    config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")  # the script reads pytorch_model*.bin only
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


def _stub_megatron(monkeypatch) -> None:
    """`megatron.tokenizer.tokenizer._vocab_size_with_padding`, as Megatron-LM computes it."""
    def pad(orig: int, args) -> int:
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        return -(-orig // multiple) * multiple

    for name in ("megatron", "megatron.core", "megatron.tokenizer", "megatron.tokenizer.tokenizer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["megatron"].__spec__ = types.SimpleNamespace(name="megatron")  # find_spec sees it
    monkeypatch.setitem(sys.modules, "megatron.core.package_info", types.SimpleNamespace(__version__="0.5.0"))
    sys.modules["megatron.core"].package_info = sys.modules["megatron.core.package_info"]
    sys.modules["megatron.tokenizer.tokenizer"]._vocab_size_with_padding = pad


def _megatron_from_script(gpt2_dir, out, tp: int, monkeypatch):
    _stub_megatron(monkeypatch)
    monkeypatch.setattr(script.importlib.util, "find_spec", lambda name: object() if name == "megatron" else None)
    args = argparse.Namespace(load_path=str(gpt2_dir), save_path=str(out), megatron_path=None,
                              target_tensor_model_parallel_size=tp, target_pipeline_model_parallel_size=1,
                              target_data_parallel_size=1, make_vocab_size_divisible_by=16,
                              use_distributed_optimizer=False, target_params_dtype="fp32",
                              print_checkpoint_structure=False, tokenizer_name=None, max_shard_size="10GB")
    script.convert_checkpoint_from_transformers_to_megatron(args)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_script_output_is_per_head(gpt2, tmp_path, monkeypatch, tp: int) -> None:
    gpt2_dir, state = gpt2
    out = tmp_path / "megatron"
    _megatron_from_script(gpt2_dir, out, tp, monkeypatch)
    result = cli("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["format"], report["qkv_order"], report["n_head"], report["n_query_groups"], report["head_size"],
            report["n_layer"]) == ("megatron", "per-head", H, H, D // H, LAYERS)
    assert "checkpoint_version 3" in report["evidence"][0]
    assert ("tensor parallel over 2 ranks" in " ".join(report["evidence"])) == (tp == 2)
    # the numbers: per-head rows of rank 0 (its H / tp heads) back to sequential are GPT-2's c_attn rows
    heads = HeadLayout(H // tp, H // tp, D // H)
    for i in range(LAYERS):
        rank0 = torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
        fused = rank0["model"]["language_model"]["encoder"][f"layers.{i}.self_attention.query_key_value.weight"]
        sequential = reorder(fused, QKVOrder.PER_HEAD, QKVOrder.SEQUENTIAL, heads)
        c_attn = state[f"transformer.h.{i}.attn.c_attn.weight"].T  # Conv1D: stored [in, out]
        q, k, v = c_attn.split(D)
        share = heads.n_head * heads.head_size  # rank 0 holds the first H / tp heads of each of q, k, v
        assert torch.equal(sequential, torch.cat([q[:share], k[:share], v[:share]]))
        assert not torch.equal(reorder(fused, QKVOrder.SEQUENTIAL, QKVOrder.SEQUENTIAL, heads), sequential)
    refused = cli("convert", out, "--to", "hf", "--out", tmp_path / "hf")
    assert refused.exit_code == 2 and "inspect only" in refused.output and not (tmp_path / "hf").exists()
    assert cli("verify", out, out).exit_code == 2


def _write_megatron(directory, tensors: dict[str, torch.Tensor], args: argparse.Namespace, version) -> None:
    (directory / "iter_0000020" / "mp_rank_00").mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text("20")
    state = {"model": tensors, "args": args, "iteration": 20,
             "rng_state": [{"np_rng_state": __import__("numpy").random.get_state()}]}
    if version is not None:
        state["checkpoint_version"] = version
    torch.save(state, directory / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt")


@pytest.mark.parametrize("version,order", [(0.0, "sequential"), (1.0, "element-interleaved"), (2.0, "per-head")])
def test_legacy_versions(tmp_path, version: float, order: str) -> None:
    args = argparse.Namespace(num_layers=1, hidden_size=D, num_attention_heads=H, tensor_model_parallel_size=1,
                              position_embedding_type="learned_absolute")
    qkv = {"language_model": {"encoder": {"layers.0.self_attention.query_key_value.weight": torch.zeros(3 * D, D)}}}
    _write_megatron(tmp_path, qkv, args, version)
    report = json.loads(cli("inspect", tmp_path, "--json").output)
    assert report["qkv_order"] == order and report["rope"] is None
    assert f"checkpoint_version {version:g}" in report["evidence"][0]


def test_megatron_core_gqa_is_grouped(tmp_path) -> None:
    G, hs = 2, 8
    args = argparse.Namespace(num_layers=2, hidden_size=D, num_attention_heads=H, group_query_attention=True,
                              num_query_groups=G, kv_channels=hs, position_embedding_type="rope", rotary_percent=0.5,
                              tensor_model_parallel_size=1)
    rows = (H + 2 * G) * hs
    tensors = {f"decoder.layers.{i}.self_attention.linear_qkv.weight": torch.zeros(rows, D) for i in range(2)}
    tensors["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    _write_megatron(tmp_path, tensors, args, 3.0)
    result = cli("inspect", tmp_path / "iter_0000020", "--json")  # the iteration directory itself
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["qkv_order"], report["n_query_groups"], report["attention"]) == ("grouped", G, "GQA")
    assert report["rope"] == {"order": "half", "fraction": 0.5, "evidence": report["rope"]["evidence"]}
    args.num_query_groups = 3  # 4 heads cannot share 3 groups
    (tmp_path / "bad").mkdir()
    _write_megatron(tmp_path / "bad", tensors, args, 3.0)
    bad = cli("inspect", tmp_path / "bad", "--json")
    assert bad.exit_code == 2 and "not a multiple" in json.loads(bad.output)["error"]


def test_nemo_linear_qkv_and_wrong_shapes(tmp_path) -> None:
    import yaml

    G, hs = 1, 8
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(
        {"num_layers": 1, "hidden_size": D, "num_attention_heads": H, "num_query_groups": G, "kv_channels": hs,
         "position_embedding_type": "rope", "rotary_percentage": 1.0, "mcore_gpt": True}))
    torch.save({"model.decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros((H + 2 * G) * hs, D)},
               tmp_path / "model_weights.ckpt")
    report = json.loads(cli("inspect", tmp_path, "--json").output)
    assert (report["format"], report["qkv_order"], report["attention"]) == ("nemo", "grouped", "MQA")
    torch.save({"model.decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(3 * H * hs, D)},
               tmp_path / "model_weights.ckpt")  # MHA rows, config says MQA
    wrong = cli("inspect", tmp_path)
    assert wrong.exit_code == 2 and "has shape" in wrong.output


def test_checkpoint_code_is_not_run(tmp_path) -> None:
    """A pickle that names any other global is refused, not executed."""
    args = argparse.Namespace(num_layers=1, hidden_size=D, num_attention_heads=H)
    _write_megatron(tmp_path, {"x": torch.zeros(1)}, args, 3.0)
    path = tmp_path / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"
    torch.save({"model": {}, "args": args, "payload": types.SimpleNamespace(f=print), "hook": json.loads}, path)
    result = cli("inspect", tmp_path, "--json")
    assert result.exit_code == 2 and "weights_only" in json.loads(result.output)["error"]
