"""`qkvconv verify` and the forward-pass check inside `upgrade`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import CASES, FULL_CASES, LORA_CASES, reference
from qkvconv.reference import forward
from qkvconv.cli import app
from qkvconv.model.layout import HeadLayout, QKVOrder, reorder
from qkvconv.ops.upgrade import upgrade
from qkvconv.formats.weights import open_weights

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", FULL_CASES + LORA_CASES)
def test_our_forward_pass_reproduces_litgpt_054_logits_on_legacy_files(name: str, legacy) -> None:
    """Reading legacy files directly (grouped rows, legacy LoRA semantics, adapter on top of its base),
    our forward pass gives the logits litgpt 0.5.4 computed."""
    directory = legacy(name)
    weights = open_weights(directory)
    ref = reference(directory)
    arch = forward.Architecture.from_litgpt_config(weights.config)
    logits = dict(forward.forward(arch, weights, ref["tokens"], dtype=torch.float32))["logits"]
    assert (logits - ref["logits"]).abs().max() < 1e-5


@pytest.mark.parametrize("name", FULL_CASES + LORA_CASES)
def test_verify_legacy_against_upgraded_passes(name: str, legacy, tmp_path: Path) -> None:
    directory = legacy(name)
    out = tmp_path / "upgraded"
    assert cli("upgrade", directory, "--out", out).exit_code == 0
    result = cli("verify", directory, out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert [s["name"] for s in report["stages"]] == ["embed", "layer 0", "layer 1", "logits"]
    # pure re-orderings (and exact LoRA rank expansion) are bitwise equal in float32 on CPU
    assert all(s["max_abs_diff"] == 0.0 for s in report["stages"])


@pytest.mark.parametrize("name", LORA_CASES)
def test_verify_lora_run_against_its_merge(name: str, legacy, tmp_path: Path) -> None:
    directory = legacy(name)
    merged = tmp_path / "merged"
    assert cli("upgrade", directory, "--lora-merge", "--out", merged).exit_code == 0
    result = cli("verify", directory, merged, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["logits_max_abs_diff"] < 1e-5


def _relabel_grouped_as_sequential(directory: Path) -> None:
    """The silent error this tool exists for: legacy rows under the current name."""
    sd = torch.load(directory / "lit_model.pth", weights_only=True)
    cfg = CASES[directory.name]
    heads = HeadLayout(cfg["n_head"], cfg["n_query_groups"], cfg["head_size"])
    for k in [k for k in sd if ".attn.qkv." in k]:
        sd[k] = reorder(sd[k], QKVOrder.SEQUENTIAL, QKVOrder.GROUPED, heads)
    torch.save(sd, directory / "lit_model.pth")


def test_verify_catches_mis_ordered_copy_at_the_first_layer(legacy, tmp_path: Path) -> None:
    original = legacy("gqa_bias_oddhead")
    wrong = tmp_path / "wrong" / "gqa_bias_oddhead"
    assert cli("upgrade", original, "--out", wrong).exit_code == 0
    _relabel_grouped_as_sequential(wrong)
    assert cli("inspect", wrong, "--expect", "current").exit_code == 0  # names alone cannot tell
    result = cli("verify", original, wrong, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert not report["passed"] and report["first_difference"] == "layer 0"
    assert report["stages"][0]["max_abs_diff"] == 0.0  # embeddings agree
    table = cli("verify", original, wrong)
    assert table.exit_code == 1
    assert "differs (first)" in table.output and "they part at layer 0" in table.output


def test_upgrade_refuses_to_replace_when_the_forward_pass_disagrees(legacy, monkeypatch) -> None:
    """A re-ordering bug shared by the writer and the tensor-level check is still caught by the
    forward pass, and the original stays in place."""
    import qkvconv.ops.upgrade as upgrading

    directory = legacy("gqa_llama")
    before = (directory / "lit_model.pth").read_bytes()
    # the naive rename (no re-ordering) in both the writer and the tensor-level check
    from qkvconv.plans.plan import Plan, Recipe

    monkeypatch.setattr(upgrading, "full_upgrade_plan",
                        lambda names, heads: Plan([Recipe(upgrading.current_name(n), (n,)) for n in names]))
    monkeypatch.setattr(upgrading, "permutation", lambda src, dst, heads: torch.arange(heads.rows))
    result = cli("upgrade", directory)
    assert result.exit_code == 1, result.output
    assert "computes something else" in result.output and "nothing was replaced" in result.output
    assert (directory / "lit_model.pth").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["lit_model.pth", "model_config.yaml", "reference.pt"]


def test_upgrade_reports_the_forward_check(legacy) -> None:
    result = cli("upgrade", legacy("mqa_falcon"))
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "all 16 tensors hold the source's bits" in text
    result = cli("upgrade", legacy("mha_neox"), "--no-verify")  # still read back before replacing, no check
    assert result.exit_code == 0 and "checked in" not in result.output and "read back in" in result.output


def test_verify_different_architectures_exit_1(legacy) -> None:
    result = cli("verify", legacy("gqa_llama"), legacy("mqa_falcon"))
    assert result.exit_code == 1 and "different architectures" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_verify_cuda_without_gpu_is_bad_environment(legacy) -> None:
    directory = legacy("gqa_llama")
    result = cli("verify", directory, directory, "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_verify_unsupported_family_names_the_feature(legacy) -> None:
    import yaml

    directory = legacy("gqa_llama")
    cfg = yaml.safe_load((directory / "model_config.yaml").read_text())
    cfg.update(n_expert=4, n_expert_per_token=2, mlp_class_name="LLaMAMoE", n_shared_expert=1)  # DeepSeek's
    (directory / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("verify", directory, directory)
    assert result.exit_code == 2
    assert "shared experts (n_shared_expert)" in result.output and "Traceback" not in result.output


def test_verify_streams_one_layer_at_a_time(legacy) -> None:
    """The forward pass asks for layer i's tensors only while running layer i."""
    directory = legacy("gqa_llama")
    weights = open_weights(directory)
    asked: list[str] = []

    def spy(name: str) -> torch.Tensor:
        asked.append(name)
        return weights(name)

    arch = forward.Architecture.from_litgpt_config(weights.config)
    layer_seen = []
    for stage, _ in forward.forward(arch, spy, torch.zeros(1, 4, dtype=torch.long)):
        layer_seen.append((stage, {n.split(".")[2] for n in asked if n.startswith("transformer.h.")}))
        asked.clear()
    assert layer_seen[1] == ("layer 0", {"0"}) and layer_seen[2] == ("layer 1", {"1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the device machine)")
@pytest.mark.parametrize("name", ["gqa_bias_oddhead", "lora_qkv_gqa", "mha_neox"])
def test_verify_on_cuda(name: str, legacy, tmp_path: Path) -> None:
    directory = legacy(name)
    out = tmp_path / "upgraded"
    assert cli("upgrade", directory, "--out", out, "--device", "cuda").exit_code == 0
    result = cli("verify", directory, out, "--device", "cuda", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["device"].startswith("cuda") and report["peak_gpu_bytes"] > 0
    weights = open_weights(directory)
    arch = forward.Architecture.from_litgpt_config(weights.config)
    ref = reference(directory)
    logits = dict(forward.forward(arch, weights, ref["tokens"].cuda(), dtype=torch.float32))["logits"]
    # TF32 may be on for GPU matmuls; litgpt 0.5.4's CPU logits agree to GPU float32 precision
    assert (logits.cpu() - ref["logits"]).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------
# determinism, and the limits of --tokens, --atol and --rtol


@pytest.mark.parametrize("args, message", [
    (["--tokens", "33"], "--tokens 33 is longer than the model's block_size (32)"),
    (["--tokens", "1000"], "pass --tokens 32 or less"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--atol", "-1"], "--atol must be a number >= 0"),
    (["--rtol", "-1e-5"], "--rtol must be a number >= 0"),
    (["--atol", "nan"], "--atol must be a number >= 0"),
])
def test_verify_refuses_tokens_past_block_size_and_negative_tolerances(args: list[str], message: str, legacy) -> None:
    """Bad input is exit 2 with the reason, never a verdict: past block_size (32 in the fixtures) the model
    is not defined, and a negative tolerance would fail identical checkpoints (exit 1)."""
    directory = legacy("gqa_llama")
    result = cli("verify", directory, directory, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_verify_library_refuses_tokens_past_block_size(legacy) -> None:
    """The limit lives in the library (convert and upgrade call it too); its default fits any block_size."""
    from qkvconv.errors import QkvconvError
    from qkvconv.ops.verify import verify

    weights = open_weights(legacy("gqa_llama"))
    with pytest.raises(QkvconvError, match=r"block_size \(32\)"):
        verify(weights, weights, tokens=33)
    assert verify(weights, weights, tokens=32).tokens == 32


def _busy_processes(n: int) -> list:
    """CPU load beside the test: n processes spinning until killed."""
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_verify_gives_the_same_numbers_every_time_under_load(legacy, tmp_path: Path) -> None:
    """A directory against itself at zero tolerance, and against its Meta conversion (pairs rotary:
    float rounding differences), several times at the longest allowed sequence, with one and with two
    threads, while busy processes load every core: every report is the same, bit for bit."""
    from qkvconv.ops.verify import verify

    directory = legacy("gqa_llama")
    meta = tmp_path / "meta"
    assert cli("convert", directory, "--to", "meta", "--out", meta).exit_code == 0
    pairs = {"itself": (directory, directory), "meta": (directory, meta)}
    seen: dict[str, set] = {name: set() for name in pairs}
    threads = torch.get_num_threads()
    load = _busy_processes(2 * threads)
    try:
        for n in [1, threads] * 2:
            torch.set_num_threads(n)
            for name, (a, b) in pairs.items():
                report = verify(open_weights(a), open_weights(b), tokens=32, atol=0.0, rtol=0.0)
                seen[name].add(tuple(s.max_abs_diff for s in report.stages))
    finally:
        torch.set_num_threads(threads)
        for p in load:
            p.kill()
            p.wait()
    assert seen["itself"] == {(0.0,) * 4}
    assert len(seen["meta"]) == 1 and max(next(iter(seen["meta"]))) > 0  # differs, by the same amount each time


def test_releasing_pages_leaves_other_owners_of_the_same_file_alone(legacy) -> None:
    """`verify DIR DIR` maps one file twice. Each side's release() between layers must drop only its own
    mapping: once the other owner is freed, the allocator may put live tensors at that address, and
    MADV_DONTNEED there zeroed them (numbers that change with where memory happens to land)."""
    import ctypes
    import gc
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("page release is Linux only")
    directory = legacy("gqa_llama")
    first, second = open_weights(directory), open_weights(directory)
    (start, end, _), = first.base.mapped.ranges
    del first
    gc.collect()
    # Live memory of our own where the first mapping was, as the allocator may place it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                             ctypes.c_int, ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace = 0x100000
    address = libc.mmap(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_fixed_noreplace, -1, 0)
    assert address == start, "the first mapping's address range should be free once it is dropped"
    try:
        ctypes.memset(start, 7, end - start)
        second.release()
        assert ctypes.string_at(start, end - start) == b"\x07" * (end - start)
    finally:
        libc.munmap(ctypes.c_void_p(start), ctypes.c_size_t(end - start))
