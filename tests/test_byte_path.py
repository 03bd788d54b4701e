"""Conversions that only move bytes (HF <-> litgpt, re-sharding) run without torch (io/bytepath.py): the
same files as the torch path, NaN/inf still refused naming the tensor, and a default check that still
fails on one wrong row (it hands over to check.py, which names the layer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.errors import CheckFailed, QkvconvError
from qkvconv.io import engine
from qkvconv.io.engine import execute, output_layout
from qkvconv.io.safetensors_header import SafetensorsHeaders
from qkvconv.io.torch_pickle import TorchZipHeaders
from qkvconv.io.writers import SafetensorsWriter
from qkvconv.model.bits import Fingerprint
from qkvconv.ops import bitcheck
from qkvconv.ops.check import fingerprint
from qkvconv.ops.convert import convert
from qkvconv.plans.plan import Plan, copy
from test_startup import run_probe

runner = CliRunner()


def test_a_conversion_and_its_check_import_no_torch(built, tmp_path: Path) -> None:
    """HF -> litgpt and back, each with its default check, in a process that never imports torch; the
    files are the ones the torch path writes."""
    source = built("llama3-gqa").directory
    proc, imported = run_probe("convert", str(source), "--to", "litgpt", "--out", str(tmp_path / "lit"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "hold the source's bits" in json.loads(proc.stdout)["checks"][0] and not imported
    proc, imported = run_probe("convert", str(tmp_path / "lit"), "--to", "hf", "--out", str(tmp_path / "hf"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "hold the source's bits" in json.loads(proc.stdout)["checks"][0] and not imported
    # the torch path (a reader that holds tensors) writes the same bytes
    result = runner.invoke(app, ["convert", str(source), "--to", "litgpt", "--out", str(tmp_path / "torch"),
                                 "--no-verify", "--qkv", "fused"])  # --qkv: a change, so through the pivot
    assert result.exit_code == 0, result.output
    assert same_tensors(torch.load(tmp_path / "torch" / "lit_model.pth", weights_only=True),
                        torch.load(tmp_path / "lit" / "lit_model.pth", weights_only=True))
    assert same_tensors(load_file(source / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors"))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                      torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_one_wrong_row_of_the_result_fails_the_check(built, tmp_path: Path, monkeypatch) -> None:
    """One row of layer 1's Q, K or V changed in the result after it was written: the torch-free check
    does not pass it, and check.py then computes that layer and fails, naming it."""
    source = built("llama3-gqa").directory
    real = bitcheck.byte_check
    verdicts: list[str | None] = []

    def damaging(src, result, prints):
        reader = TorchZipHeaders(result[0] / "lit_model.pth")
        raw = reader.raw("transformer.h.1.attn.qkv.weight")
        row_bytes = raw.nbytes // reader.meta("transformer.h.1.attn.qkv.weight").shape[0]
        with open(raw.path, "r+b") as f:  # row 37 (a K row): its first element's bits flipped
            f.seek(raw.offset + 37 * row_bytes)
            first = f.read(4)
            f.seek(raw.offset + 37 * row_bytes)
            f.write(bytes(b ^ 0x55 for b in first))
        verdicts.append(real(src, result, prints))
        return verdicts[-1]

    monkeypatch.setattr(bitcheck, "byte_check", damaging)
    with pytest.raises(CheckFailed, match="first difference at layer 1"):
        convert(source, "litgpt", tmp_path / "out")
    assert verdicts == [None] and not (tmp_path / "out").exists()


FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_the_numpy_scan_finds_nonfinite_values(dtype: torch.dtype, where: str, value: float, tmp_path: Path,
                                              monkeypatch) -> None:
    """A tensor that straddles several of the scan's chunks, with one NaN/inf at its first, a middle or its
    last element, is refused naming it; without the bad value it converts to the same bytes."""
    monkeypatch.setattr(engine._Scanner, "CHUNK", 4096)  # the tensor spans about 10 chunks
    t = torch.randn(41, 97, generator=torch.Generator().manual_seed(0)).to(dtype)
    good = tmp_path / "good.safetensors"
    save_file({"w": t, "n": torch.ones(3)}, good)
    bad = t.clone().reshape(-1)
    bad[{"first": 0, "middle": bad.numel() // 2 + 1, "last": -1}[where]] = value
    damaged = tmp_path / "bad.safetensors"
    save_file({"w": bad.reshape(41, 97), "n": torch.ones(3)}, damaged)

    def run(path: Path, out: Path) -> None:
        reader = SafetensorsHeaders(path)
        plan = Plan([copy("w"), copy("n")])
        out.mkdir()
        with SafetensorsWriter(out, output_layout(plan, reader)) as writer:
            execute(plan, reader, writer)

    run(good, tmp_path / "ok")
    assert same_tensors(load_file(tmp_path / "ok" / "model.safetensors"), load_file(good))
    with pytest.raises(QkvconvError, match=r"^w holds 1 NaN/inf values"):
        run(damaged, tmp_path / "refused")


@pytest.mark.parametrize("shape, dtype", [((6, 4), torch.bfloat16), ((5, 3), torch.bfloat16), ((7,), torch.float32),
                                          ((9,), torch.bfloat16), ((3, 5), torch.float16), ((4, 3), torch.uint8)])
def test_numpy_checksums_are_check_py_s(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The byte path's checksums, fed a row at a time, are check.fingerprint's, bit for bit."""
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(shape, generator=g) * 1e3).to(dtype) if dtype.is_floating_point else \
        torch.randint(0, 255, shape, generator=g, dtype=dtype)
    data = t.contiguous().view(torch.uint8).numpy().reshape(-1)
    prints = Fingerprint(shape, t.element_size())
    step = prints.row_bytes if len(shape) > 1 else 8 * t.element_size()
    for start in range(0, data.size, step):
        prints.add(data[start:start + step])
    rows, columns = prints.result()
    _, _, want_rows, want_columns = fingerprint(t)
    assert np.array_equal(rows, want_rows.numpy()) and np.array_equal(columns, want_columns.numpy())


def test_the_unpickler_runs_nothing_it_does_not_know(tmp_path: Path) -> None:
    """A .pth whose pickle names any other global is refused by the torch-free reader (the conversion
    then goes through torch.load(weights_only=True), which refuses it too)."""
    import pickle
    import zipfile

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    records[name] = pickle.dumps({"w": shutil.rmtree}, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
        for n, data in records.items():
            z.writestr(n, data)
    with pytest.raises(QkvconvError, match="shutil.rmtree is not part of a state dict"):
        TorchZipHeaders(path)


@pytest.mark.parametrize("case", ["gqa_llama", "gqa_bias_oddhead", "wrapped_gqa"])
def test_an_upgrade_and_its_check_import_no_torch(case: str, legacy, tmp_path: Path) -> None:
    """A legacy full model upgraded (into --out, and in place) without torch: the rows re-ordered as the
    torch path re-orders them, and the check read back from the new file."""
    source = legacy(case)
    reference = tmp_path / "reference"
    result = runner.invoke(app, ["upgrade", str(source), "--out", str(reference), "--no-verify"])
    assert result.exit_code == 0, result.output
    proc, imported = run_probe("upgrade", str(source), "--out", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["changed"] and "hold the source's bits" in report["checks"][-1] and not imported
    want = torch.load(reference / "lit_model.pth", weights_only=True)
    assert same_tensors(want.get("model", want), (lambda got: got.get("model", got))(
        torch.load(tmp_path / "out" / "lit_model.pth", weights_only=True)))
    proc, imported = run_probe("upgrade", str(source), "--out", str(tmp_path / "unchecked"), "--no-verify", "--json")
    assert proc.returncode == 0 and not imported, proc.stderr  # --no-verify still reads back: the checksums
    assert json.loads(proc.stdout)["checks"][-1].startswith("read back in")
    proc, imported = run_probe("upgrade", str(source), "--json")  # in place
    assert proc.returncode == 0 and "hold the source's bits" in json.loads(proc.stdout)["checks"][-1], proc.stderr
    assert not imported
    got = torch.load(source / "lit_model.pth", weights_only=True)
    assert same_tensors(want.get("model", want), got.get("model", got))


def test_one_wrong_row_of_an_upgrade_fails_its_check(legacy, tmp_path: Path, monkeypatch) -> None:
    """One re-ordered row damaged in the staged file: the torch-free check does not pass it, check.py
    fails it, and nothing is replaced."""
    from qkvconv.ops.upgrade import upgrade

    source = legacy("gqa_llama")
    before = (source / "lit_model.pth").read_bytes()
    real = bitcheck.byte_check
    verdicts: list[str | None] = []

    def damaging(src, result, prints, overrides=None):
        path = overrides["lit_model.pth"]
        reader = TorchZipHeaders(path)
        name = "transformer.h.1.attn.qkv.weight"
        raw = reader.raw(name)
        with open(path, "r+b") as f:
            f.seek(raw.offset + 3 * raw.nbytes // reader.meta(name).shape[0])
            f.write(b"\x55\x55\x55\x55")
        verdicts.append(real(src, result, prints, overrides))
        return verdicts[-1]

    monkeypatch.setattr(bitcheck, "byte_check", damaging)
    with pytest.raises(CheckFailed, match="layer 1"):
        upgrade(source, forward_check=bitcheck.upgrade_check())
    assert verdicts == [None] and (source / "lit_model.pth").read_bytes() == before
    # --no-verify keeps upgrade's file-against-file check: in numpy, byte for byte, it fails the row too
    from qkvconv.ops import upgrade as upgrading

    real_files = upgrading.check_upgraded

    def damaged_files(old, new, *args):
        raw = new.raw("transformer.h.1.attn.qkv.weight")
        with open(new.path, "r+b") as f:
            f.seek(raw.offset + 40)
            f.write(b"\x55\x55")
        return real_files(old, new, *args)

    monkeypatch.setattr(upgrading, "check_upgraded", damaged_files)
    with pytest.raises(CheckFailed, match="transformer.h.1.attn.qkv.weight in the upgraded lit_model.pth does not"):
        upgrade(source, tmp_path / "out")
    assert (source / "lit_model.pth").read_bytes() == before and not (tmp_path / "out").exists()


def test_row_labels_say_what_apply_does() -> None:
    """Every step that only moves rows says, on row labels and without torch, exactly where `apply` takes
    each output row from (the byte path copies the rows its labels name)."""
    from qkvconv.formats.hf.steps import ConcatRows, TakeRows
    from qkvconv.model.layout import HeadLayout, QKVOrder
    from qkvconv.plans.plan import CheckRows, Fuse, Recipe, Reorder, TakePart
    from qkvconv.plans.transforms import Inline, RowIndex, kv_repeat_index

    heads = HeadLayout(6, 2, 3)
    orders = [o for o in QKVOrder if o not in (QKVOrder.PER_HEAD, QKVOrder.CODEGEN_MP4, QKVOrder.INTERLEAVED)]
    mha = HeadLayout(4, 4, 2)
    cases: list[tuple[object, list[int]]] = []
    for src in orders:
        for dst in orders:
            cases.append((Reorder(src, dst, heads), [heads.rows]))
        cases += [(TakePart(p, src, heads), [heads.rows]) for p in "qkv"]
        cases.append((Fuse(src, heads), [heads.q_rows, heads.kv_rows, heads.kv_rows]))
        cases.append((CheckRows(src, heads), [heads.rows]))
    for src in (QKVOrder.PER_HEAD, QKVOrder.CODEGEN_MP4, QKVOrder.INTERLEAVED):
        cases += [(Reorder(src, QKVOrder.SEQUENTIAL, mha), [mha.rows]), (TakePart("k", src, mha), [mha.rows])]
    cases += [(TakeRows(1, 3), [12]), (ConcatRows(), [4, 5, 2]), (RowIndex(kv_repeat_index(heads, 6), "kv"), [heads.rows])]
    cases.append((Inline((Recipe("a", ("x",), (TakeRows(0, 2),)), Recipe("b", ("y", "z"), (ConcatRows(),)))), [6, 3, 2]))
    for step, rows in cases:
        labels = [[(i << 20) + r for r in range(n)] for i, n in enumerate(rows)]
        tensors = [torch.tensor(t, dtype=torch.int64).reshape(-1, 1) for t in labels]
        want = [t.reshape(-1).tolist() for t in step.apply(tensors)]  # type: ignore[attr-defined]
        assert step.labels(labels) == want, step  # type: ignore[attr-defined]
