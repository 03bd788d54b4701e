"""The check convert, upgrade and merges run before publishing (qkvconv/ops/check.py): whatever path it
takes (checksums of tensors meant to be unchanged, or a computation where a transformation changed
the numbers), a single wrong row of one layer's Q, K or V, of a LoRA B, or of the embedding, in the
result makes it fail, naming the layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import FIXTURES
from qkvconv.cli import app
from qkvconv.errors import CheckFailed
from qkvconv.formats.weights import open_weights
from qkvconv.model.layout import HeadLayout
from qkvconv.ops.check import conversion_check, fingerprint

runner = CliRunner()
HEADS = HeadLayout(4, 2, 8)  # llama3-gqa: 4 query heads, 2 key/value heads, head size 8
ROWS = {"q": 5, "k": HEADS.q_rows + 3, "v": HEADS.q_rows + HEADS.kv_rows + 6}  # one row in each part


def cli(*args) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def check(source: Path, result: Path) -> str:
    return conversion_check(lambda: (open_weights(source), open_weights(result)), "cpu", "the result", "undone")


def damage(path: Path, name: str, row: int, how) -> None:
    state = torch.load(path, weights_only=True)
    inner = state.get("model", state)
    inner[name][row] = how(inner[name][row])
    torch.save(state, path)


def last_bit(row: torch.Tensor) -> torch.Tensor:
    """The smallest change there is: one element's lowest mantissa bit."""
    bits = row.clone().view(torch.int32)
    bits[3] ^= 1
    return bits.view(torch.float32)


@pytest.mark.parametrize("part", list(ROWS))
@pytest.mark.parametrize("rope", [None, "pairs"])  # checksums; a computation (the rows were permuted)
def test_one_wrong_qkv_row_fails(part: str, rope: str | None, built, tmp_path: Path) -> None:
    b = built("llama3-gqa")
    out = tmp_path / "out"
    cli("convert", b.directory, "--to", "litgpt", "--out", out, *(["--rope", rope] if rope else []))
    assert ("computed on random inputs" if rope else "hold the source's bits") in check(b.directory, out)
    if not rope:  # the checksums see the smallest change: that layer is computed instead (within tolerance)
        damage(out / "lit_model.pth", "transformer.h.1.attn.qkv.weight", ROWS[part], last_bit)
        said = check(b.directory, out)
        assert "10 of 17 tensors hold the source's bits; layer 1 computed on random inputs" in " ".join(said.split())
    damage(out / "lit_model.pth", "transformer.h.1.attn.qkv.weight", ROWS[part], lambda r: r * 1.5 + 0.1)
    with pytest.raises(CheckFailed, match="first difference at layer 1"):
        check(b.directory, out)


def test_a_row_no_token_reaches_fails(built, tmp_path: Path) -> None:
    """An embedding row: a forward pass over some tokens reads a few rows of it, the checksums all."""
    b = built("llama3-gqa")
    out = tmp_path / "out"
    cli("convert", b.directory, "--to", "litgpt", "--out", out)
    damage(out / "lit_model.pth", "transformer.wte.weight", 77, lambda r: r * 1.5 + 0.1)
    with pytest.raises(CheckFailed, match="first difference at embed rows 0"):
        check(b.directory, out)


def test_one_wrong_lora_row_fails(tmp_path: Path) -> None:
    """A LoRA run against a copy whose lora_B has one wrong row: the merged weight differs in that row."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "lora_qkv_gqa", run)
    shutil.copytree(FIXTURES / "gqa_llama", tmp_path / "gqa_llama")  # its base, where the run says
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert "hold the source's bits" in check(run, copy)
    lora_b = next(k for k in torch.load(copy / "lit_model.pth.lora", weights_only=True)["model"]
                  if k.endswith("attn.attn.lora_B") and ".h.0." in k)
    damage(copy / "lit_model.pth.lora", lora_b, 2, lambda r: r + 0.5)
    with pytest.raises(CheckFailed, match="first difference at layer 0"):
        check(run, copy)


def test_checksums_see_moves_and_swaps() -> None:
    w = torch.randn(6, 8).to(torch.bfloat16)
    same = fingerprint(w.clone())
    swapped = w.clone()
    swapped[2, 1], swapped[2, 5] = w[2, 5], w[2, 1]  # the same place in two 8-byte words of one row
    for changed in (w[[1, 0, 2, 3, 4, 5]], w[:, [1, 0, 2, 3, 4, 5, 6, 7]], swapped):
        other = fingerprint(changed.contiguous())
        assert not (torch.equal(same[2], other[2]) and torch.equal(same[3], other[3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run on the device machine)")
@pytest.mark.parametrize("rope", [None, "pairs"])
def test_the_check_runs_on_cuda(rope: str | None, legacy, tmp_path: Path) -> None:
    """--device cuda: the checksums and the computed layers run on the GPU, and still see one wrong row."""
    src = legacy("gqa_llama")
    out = tmp_path / "out"
    result = runner.invoke(app, [str(a) for a in ("convert", src, "--to", "litgpt", "--out", out, "--device", "cuda",
                                                  *(["--rope", rope] if rope else []))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("tokens, on cuda" if rope else "hold the source's bits") in text, text
    damage(out / "lit_model.pth", "transformer.h.0.attn.qkv.weight", 3, lambda r: r * 1.5 + 0.1)
    with pytest.raises(CheckFailed, match="first difference at layer 0"):
        conversion_check(lambda: (open_weights(src), open_weights(out)), "cuda", "the result", "undone")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("columns", [12, 6])  # whole 8-byte words per row, or not (bf16: 24 and 12 bytes)
def test_checksums_of_stacked_parts_are_the_whole_tensors(dtype, columns) -> None:
    """A reader that hands over q, k, v (or any stacked rows) gives the checksums the fused tensor has."""
    from qkvconv.ops.check import print_of

    parts = [torch.randn(rows, columns).to(dtype) for rows in (5, 3, 3)]

    class Stacked:
        def parts(self, name):
            return parts

        def __call__(self, name):
            raise AssertionError("the whole tensor is never built")

    got, want = print_of(Stacked(), "x"), fingerprint(torch.cat(parts))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
