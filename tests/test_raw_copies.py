"""Tensors copied unchanged into safetensors go file to file inside the kernel (copy_file_range).

The engine hands the writer the source file's byte range of each tensor that a recipe copies as it
is (and no other recipe needs), after checking it for NaN/inf through a read-only mapping. The
result must be byte for byte what the in-memory path writes, from safetensors and from torch.save
zips, with the kernel's copy and with the fallback where the kernel refuses; a torch file whose
bytes are not the tensor as this machine reads it (a view into a larger storage, a big-endian file)
is never copied raw.
"""

from __future__ import annotations

import errno
import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qkvconv.io.engine import execute, output_layout
from qkvconv.errors import QkvconvError
from qkvconv.model.layout import HeadLayout, QKVOrder
from qkvconv.plans.plan import Plan, Recipe, Reorder, copy
from qkvconv.io.readers import open_reader
from qkvconv.io.writers import SafetensorsWriter

HEADS = HeadLayout(4, 2, 3)


def source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.randn(50, 12, generator=g).to(torch.bfloat16),
        "qkv": torch.randn(HEADS.rows, 12, generator=g),
        "norm": torch.randn(12, generator=g),
        "tied": torch.randn(7, 12, generator=g),
        "ids": torch.arange(10, dtype=torch.int64),
    }


def plan() -> Plan:
    return Plan([
        copy("emb", "out.emb"),
        Recipe("out.qkv", ("qkv",), (Reorder(QKVOrder.GROUPED, QKVOrder.SEQUENTIAL, HEADS),)),  # through memory
        copy("norm", "out.norm"),
        copy("tied", "out.head"), copy("tied", "out.head2"),  # one input, two consumers
        copy("ids", "out.ids"),
    ])


class NoRaw:
    """The same writer without copy_raw: the in-memory path."""

    def __init__(self, writer: SafetensorsWriter) -> None:
        self.writer = writer

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(name, tensor)


def convert(source: Path, out: Path, *, raw: bool, allow_nonfinite: bool = False) -> dict[str, int]:
    reader = open_reader(source)
    p = plan()
    layout = output_layout(p, reader)
    out.mkdir()
    with SafetensorsWriter(out, layout, max_shard_size=2000) as writer:
        execute(p, reader, writer if raw else NoRaw(writer), allow_nonfinite=allow_nonfinite)
        return {"files": len(writer.shard_files)}


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(params=["safetensors", "torch"])
def source(request, tmp_path: Path) -> Path:
    tensors = source_tensors()
    if request.param == "safetensors":
        save_file(tensors, tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    torch.save(tensors, tmp_path / "lit_model.pth")
    return tmp_path / "lit_model.pth"


def test_raw_copies_write_the_same_bytes(source: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = os.copy_file_range

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    convert(source, tmp_path / "raw", raw=True)
    convert(source, tmp_path / "memory", raw=False)
    assert files(tmp_path / "raw") == files(tmp_path / "memory")
    assert len(files(tmp_path / "raw")) > 1  # sharded: copies land in several files
    t = source_tensors()
    # "tied" has two consumers, both plain copies: checked once, copied twice
    assert sorted(calls) == sorted(t[n].numel() * t[n].element_size() for n in ("emb", "norm", "ids", "tied", "tied"))


def test_rows_moved_by_steps_are_copied_in_pieces(source: Path, tmp_path: Path, monkeypatch) -> None:
    """A re-order of grouped QKV rows is a list of row ranges of the source: copied piece by piece
    (here every piece is small, so the size floor is lifted), the same bytes as through memory."""
    from qkvconv.io import engine

    pieces = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *args: pieces.append(args[2]) or real(*args))
    monkeypatch.setattr(engine, "MIN_PIECE_BYTES", 0)
    convert(source, tmp_path / "raw", raw=True)
    convert(source, tmp_path / "memory", raw=False)
    assert files(tmp_path / "raw") == files(tmp_path / "memory")
    # grouped -> sequential with 2 groups of (2 q heads, k, v): q rows come in 2 runs, k in 2, v in 2
    row = 12 * 4
    assert sorted(pieces) == sorted([50 * 12 * 2, 12 * 4, 10 * 8, 7 * row, 7 * row] + [2 * 3 * row] * 2 + [3 * row] * 4)


def test_fallback_where_the_kernel_cannot_copy(source: Path, tmp_path: Path, monkeypatch) -> None:
    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    convert(source, tmp_path / "fallback", raw=True)
    convert(source, tmp_path / "memory", raw=False)
    assert files(tmp_path / "fallback") == files(tmp_path / "memory")


def test_nonfinite_values_are_found_in_raw_copies(tmp_path: Path) -> None:
    tensors = source_tensors()
    tensors["norm"][3] = float("nan")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QkvconvError, match="norm holds 1 NaN/inf"):
        convert(tmp_path / "model.safetensors", tmp_path / "out", raw=True)
    convert(tmp_path / "model.safetensors", tmp_path / "allowed", raw=True, allow_nonfinite=True)
    got = open_reader(tmp_path / "allowed").read("out.norm")
    assert torch.equal(got.isnan(), tensors["norm"].isnan())


def test_torch_bytes_are_raw_only_when_they_are_the_tensor(tmp_path: Path) -> None:
    base = torch.randn(10)
    torch.save({"whole": base.clone(), "view": base[2:5]}, tmp_path / "views.pth")
    reader = open_reader(tmp_path / "views.pth")
    assert reader.raw("whole") is not None and reader.raw("view") is None
    data = (tmp_path / "views.pth").read_bytes()
    r = reader.raw("whole")
    assert data[r.offset:r.offset + r.nbytes] == reader.read("whole").numpy().tobytes()
    # a file that says its bytes are big-endian: torch swaps them on load, a raw copy would not
    with zipfile.ZipFile(tmp_path / "views.pth") as src, zipfile.ZipFile(tmp_path / "big.pth", "w") as dst:
        for info in src.infolist():
            body = b"big" if info.filename.endswith("/byteorder") else src.read(info)
            dst.writestr(info, body)
    assert open_reader(tmp_path / "big.pth").raw("whole") is None
    # qkvconv's own .pth (CRC-32 fields 0, which zipfile would reject) is a raw source too: chains of
    # conversions keep the kernel copies
    from qkvconv.io.readers import TensorMeta
    from qkvconv.io.writers import TorchWriter

    with TorchWriter(tmp_path / "ours.pth", {"whole": TensorMeta((10,), torch.float32)}) as writer:
        writer.write("whole", base)
    assert open_reader(tmp_path / "ours.pth").raw("whole") is not None


@pytest.mark.parametrize("case_id, to", [("llama3-gqa", "litgpt"), ("falcon-40b-grouped", "litgpt-legacy"),
                                         ("neox-parallel", "litgpt"), ("phi3-fused", "litgpt")])
def test_real_plans_write_the_same_bytes_both_ways(case_id, to, built, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    """Every family's HF -> litgpt plan (fused q/k/v, grouped and per-head orders, Phi-3's gate_up
    rows), through the kernel copies and through memory, gives one file, byte for byte."""
    from qkvconv.io import engine
    from qkvconv.ops.convert import Transformations, transformed_plan
    from qkvconv.io.writers import TorchWriter

    monkeypatch.setattr(engine, "MIN_PIECE_BYTES", 0)  # tiny models: let every row move go raw
    outputs = []
    for raw in (True, False):
        plan, reader, _ = transformed_plan(built(case_id).directory, "hf", to, Transformations())
        layout = output_layout(plan, reader)
        path = tmp_path / f"{raw}.pth"
        with TorchWriter(path, layout) as writer:
            engine.execute(plan, reader, writer if raw else NoRaw(writer))
        outputs.append(torch.load(path, weights_only=True))
    assert sorted(outputs[0]) == sorted(outputs[1])
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    # the kernel path was taken for the Q/K/V rows too (in pieces where the order changes)
    raws = engine._raw_copies(plan, reader, Takes(), Counter(i for r in plan.recipes for i in r.inputs))
    qkv = [name for name in layout if name.endswith((".attn.qkv.weight", ".attn.attn.weight"))]
    assert qkv and all(name in raws for name in qkv)
    if case_id in ("llama3-gqa", "neox-parallel"):  # separate q/k/v, per-head rows: several pieces
        assert all(len(raws[name][1]) > 1 for name in qkv)


class Takes:
    """Any writer with copy_raw."""

    def copy_raw(self, *args) -> None: ...
