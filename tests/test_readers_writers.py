"""Streaming tensor I/O: readers and writers round-trip every dtype, load in safetensors, torch,
transformers and litgpt, refuse broken or unsafe files with one QkvconvError, and keep memory at
about one tensor."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from qkvconv.errors import QkvconvError
from qkvconv.io.readers import SafetensorsReader, ShardedReader, TensorMeta, TorchReader, open_reader
from qkvconv.io.writers import LayoutViolation, SafetensorsWriter, TorchWriter, plan_shards

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 10).to(dtype)
    return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(dtype)


def every_dtype() -> dict[str, torch.Tensor]:
    """Every dtype, in shapes that matter: matrix, odd vector (misaligns what follows), scalar, empty."""
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        tag = str(dtype).removeprefix("torch.")
        tensors[f"{tag}.matrix"] = sample(dtype, (3, 5), i)
        tensors[f"{tag}.odd"] = sample(dtype, (7,), i + 100)
        tensors[f"{tag}.scalar"] = sample(dtype, (), i + 200)
        tensors[f"{tag}.empty"] = sample(dtype, (2, 0, 3), i)
    return tensors


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, dtype and shape included (works for dtypes torch.equal lacks)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def assert_same_dict(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    bad = [k for k in want if not same(got[k], want[k])]
    assert not bad, bad


def layout_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta.of(v) for k, v in tensors.items()}


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], order: list[str] | None = None,
                      **kwargs) -> list[Path]:
    writer = SafetensorsWriter(directory, layout_of(tensors), **kwargs)
    for name in order or list(tensors):
        writer.write(name, tensors[name])
    return writer.close()


def write_torch(path: Path, tensors: dict[str, torch.Tensor], order: list[str] | None = None,
                wrapped: bool = False) -> Path:
    writer = TorchWriter(path, layout_of(tensors), wrapped=wrapped)
    for name in order or list(tensors):
        writer.write(name, tensors[name])
    return writer.close()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    reader = open_reader(path)
    return {name: reader.read(name) for name in reader.names()}


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = every_dtype()
    order = list(tensors)
    random.Random(0).shuffle(order)
    [path] = write_safetensors(tmp_path, tensors, order)
    assert path == tmp_path / "model.safetensors"
    loaded = safetensors.torch.load_file(path)
    assert all(same(loaded[k], tensors[k]) for k in tensors)
    reader = open_reader(path)
    assert sorted(reader.names()) == sorted(tensors)
    assert all(reader.meta(k) == TensorMeta.of(t) for k, t in tensors.items())
    assert all(same(reader.read(k), tensors[k]) for k in tensors)


def test_safetensors_output_is_byte_identical_to_the_library_for_one_dtype_in_name_order(tmp_path: Path) -> None:
    tensors = {f"w{i:02d}": sample(torch.float32, (i % 4, 3), i) for i in range(12)}
    [ours] = write_safetensors(tmp_path, tensors)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_safetensors_tensors_are_aligned_widest_first(tmp_path: Path) -> None:
    tensors = {"a": sample(torch.int8, (3,)), "b": sample(torch.float64, (2,)), "c": sample(torch.bfloat16, (3,)),
               "d": sample(torch.float32, (1,))}
    [path] = write_safetensors(tmp_path, tensors)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == ["b", "d", "c", "a"]
    assert all(spec["data_offsets"][0] % tensors[name].element_size() == 0 for name, spec in header.items())


def test_sharding_matches_huggingface_hub_and_writes_the_index(tmp_path: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {f"layer.{i}.w": sample(torch.float32, (size,), i) for i, size in enumerate([10, 30, 5, 60, 20, 20, 1])}
    limit = 40 * 4  # bytes: the 60-element tensor exceeds it and gets a shard of its own
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=limit)
    assert plan_shards(layout_of(tensors), limit) == split.filename_to_tensors
    order = list(reversed(tensors))
    files = write_safetensors(tmp_path, tensors, order, max_shard_size=limit)
    index_path = tmp_path / "model.safetensors.index.json"
    assert files[-1] == index_path
    assert sorted(p.name for p in files[:-1]) == sorted(split.filename_to_tensors)
    assert index_path.read_text().endswith("}\n")
    index = json.loads(index_path.read_text())
    assert index == {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
    for shard, names in split.filename_to_tensors.items():
        loaded = safetensors.torch.load_file(tmp_path / shard)
        assert sorted(loaded) == sorted(names) and all(same(loaded[n], tensors[n]) for n in names)
    reader = open_reader(tmp_path)
    assert isinstance(reader, ShardedReader) and sorted(reader.names()) == sorted(tensors)
    assert reader.files()[0] == index_path
    assert all(same(reader.read(n), tensors[n]) for n in tensors)


def test_one_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = {"a": sample(torch.float16, (4, 4))}
    files = write_safetensors(tmp_path, tensors, max_shard_size=10**9, prefix="adapter_model", metadata={"x": "y"})
    assert files == [tmp_path / "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["adapter_model.safetensors"]
    assert SafetensorsReader(files[0]).metadata == {"format": "pt", "x": "y"}


def test_transformers_loads_a_llama_rewritten_through_our_reader_and_writer(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "original")
    reader = open_reader(tmp_path / "original")
    layout = {n: reader.meta(n) for n in reader.names()}
    (tmp_path / "copy").mkdir()
    writer = SafetensorsWriter(tmp_path / "copy", layout, max_shard_size=8 * 1024)
    assert len(writer.shard_files) > 1
    for name in reversed(reader.names()):
        writer.write(name, reader.read(name))
    writer.close()
    shutil.copy(tmp_path / "original" / "config.json", tmp_path / "copy" / "config.json")
    copy, info = LlamaForCausalLM.from_pretrained(tmp_path / "copy", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, copy.eval()(tokens).logits)


# ---------------------------------------------------------------------------------------- torch zip


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_torch_writer_round_trips_every_dtype_in_any_order(tmp_path: Path, wrapped: bool, shuffle: bool) -> None:
    tensors = every_dtype()
    order = list(tensors)
    if shuffle:
        random.Random(1).shuffle(order)
    path = write_torch(tmp_path / "lit_model.pth", tensors, order, wrapped)
    for mmap in (False, True):
        obj = torch.load(path, weights_only=True, mmap=mmap)
        assert_same_dict(obj["model"] if wrapped else obj, tensors)
    reader = open_reader(path)
    assert isinstance(reader, TorchReader) and reader.wrapped == wrapped and reader.mmapped
    assert_same_dict({n: reader.read(n) for n in reader.names()}, tensors)


@pytest.mark.parametrize("wrapped", [False, True])
def test_torch_writer_pickle_is_byte_identical_to_torch_save(tmp_path: Path, wrapped: bool) -> None:
    tensors = every_dtype()
    torch.save({"model": tensors} if wrapped else tensors, tmp_path / "theirs.pth")
    write_torch(tmp_path / "ours.pth", tensors, list(reversed(tensors)), wrapped)
    theirs, ours = zipfile.ZipFile(tmp_path / "theirs.pth"), zipfile.ZipFile(tmp_path / "ours.pth")
    # written by name, like torch.save(path): the archive's folder is the file's stem. Records carry
    # no CRC-32 (as with torch.serialization.set_crc32_options(False)), so read them as torch does.
    ours_pkl = bytes(torch._C.PyTorchFileReader(str(tmp_path / "ours.pth")).get_record("data.pkl"))
    assert ours_pkl == theirs.read("theirs/data.pkl")
    records = lambda z: sorted(n.split("/", 1)[1] for n in z.namelist())  # noqa: E731
    assert records(ours) == sorted(set(records(theirs)) - {".format_version"})  # written out of order


def test_records_follow_key_order_without_format_version(tmp_path: Path) -> None:
    """The archive is laid out before writing: data/0, data/1, ... in key order, whatever order the
    tensors arrive in. `.format_version` is not written (it lets torch compute offsets from its own
    header sizes, which are not ours), and torch loads it with offset calculation switched on too."""
    from torch.utils.serialization import config

    tensors = every_dtype()
    paths = [write_torch(tmp_path / "ordered.pth", tensors),
             write_torch(tmp_path / "shuffled.pth", tensors, list(reversed(tensors)))]
    for path in paths:
        infos = zipfile.ZipFile(path).infolist()
        data = [i for i in infos if "/data/" in i.filename]
        assert [i.filename.rsplit("/", 1)[1] for i in data] == [str(k) for k in range(len(tensors))]
        assert [i.header_offset for i in data] == sorted(i.header_offset for i in data)
        assert not any(i.filename.endswith(".format_version") for i in infos)
        raw = path.read_bytes()
        for info in data:  # every record's data starts on the storage alignment
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
    # torch's config object keeps values behind __getattr__: restore it by hand (monkeypatch may delete
    # the attribute on undo, which breaks every later torch.load in the session)
    before = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        for path in paths:
            assert_same_dict(torch.load(path, weights_only=True), tensors)
            assert_same_dict(torch.load(path, weights_only=True, mmap=True), tensors)
    finally:
        config.load.calculate_storage_offsets = before


def test_zip64_records_load_in_torch_and_zipfile(tmp_path: Path, monkeypatch) -> None:
    """Records past 4 GiB carry zip64 fields; forced here for every record (a lowered limit), the file
    must load in torch (both readers), litgpt and Python's zipfile, tensor for tensor."""
    from litgpt.utils import lazy_load

    from qkvconv.io import torch_zip

    monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 1)
    tensors = every_dtype()
    path = write_torch(tmp_path / "lit_model.pth", tensors, list(reversed(tensors)), wrapped=True)
    raw = path.read_bytes()
    assert raw.count(b"PK\x03\x04") == len(zipfile.ZipFile(path).infolist())
    assert all(i.file_size == i.compress_size for i in zipfile.ZipFile(path).infolist())
    assert struct.unpack("<H", raw[4:6])[0] == 45  # version needed: zip64
    for mmap in (False, True):
        assert_same_dict(torch.load(path, weights_only=True, mmap=mmap)["model"], tensors)
    floats = {k: v for k, v in tensors.items() if v.dtype in (torch.float32, torch.bfloat16, torch.float16)}
    path = write_torch(tmp_path / "floats.pth", floats, wrapped=True)
    assert_same_dict({k: v.contiguous() for k, v in lazy_load(path)["model"].items()}, floats)
    # zipfile would check the CRC-32 fields, which are 0; torch's reader does not
    reader = torch._C.PyTorchFileReader(str(path))
    assert bytes(reader.get_record("byteorder")) == sys.byteorder.encode()


def test_torch_writer_output_loads_in_litgpt_and_from_views(tmp_path: Path) -> None:
    from litgpt.utils import lazy_load

    base = torch.randn(6, 8)
    tensors = {"transformer.wte.weight": base[1:4], "lm_head.weight": base[:, 2:5], "b": base[5]}
    path = write_torch(tmp_path / "lit_model.pth", tensors, wrapped=True)
    loaded = lazy_load(path)["model"]
    assert all(torch.equal(loaded[k].contiguous(), v) for k, v in tensors.items())


def test_torch_reader_on_torch_save_zip_and_legacy_pickle(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(4, 4), "b": torch.arange(6, dtype=torch.int64)[1:4], "c": torch.randn(3).half()}
    torch.save({"model": tensors, "step": 3}, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    reader = open_reader(tmp_path / "zip.pt")
    assert reader.wrapped and reader.mmapped and reader.extra == {"step": 3}
    copies = {n: reader.read(n) for n in reader.names()}
    reader.release()  # pages given back; the copies stay valid
    assert_same_dict(copies, tensors)
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes for t in copies.values())
    legacy = open_reader(tmp_path / "legacy.bin")
    assert not legacy.wrapped and not legacy.mmapped
    assert_same_dict({n: legacy.read(n) for n in legacy.names()}, tensors)
    # peek (for comparisons): the same values; from a zip, the mapped bytes themselves, no copy
    for r in (open_reader(tmp_path / "zip.pt"), legacy):
        assert_same_dict({n: r.peek(n) for n in r.names()}, tensors)
    zipped = open_reader(tmp_path / "zip.pt")
    assert zipped.peek("a").data_ptr() == zipped.peek("a").data_ptr() != zipped.read("a").data_ptr()


def test_hf_torch_shards_and_safetensors_winning(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3), "b": torch.randn(2, 2), "c": torch.randn(1)}
    torch.save({"a": tensors["a"], "c": tensors["c"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": tensors["b"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin",
                  "c": "pytorch_model-00001-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_dict(read_all(tmp_path), {k: tensors[k] for k in ("a", "c", "b")})
    sharded = open_reader(tmp_path)
    assert_same_dict({n: sharded.peek(n) for n in sharded.names()}, {k: tensors[k] for k in ("a", "c", "b")})
    write_safetensors(tmp_path, {"only": torch.ones(1)})
    assert_same_dict({n: open_reader(tmp_path).peek(n) for n in ["only"]}, {"only": torch.ones(1)})
    assert list(read_all(tmp_path)) == ["only"]


# ---------------------------------------------------------------------------------------- refusals


def small_safetensors(tmp_path: Path) -> Path:
    [path] = write_safetensors(tmp_path, {"w": sample(torch.float32, (4, 3)), "b": sample(torch.bfloat16, (5,))})
    return path


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_truncated_safetensors_at_every_length_is_refused(tmp_path: Path) -> None:
    data = small_safetensors(tmp_path).read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(QkvconvError) as excinfo:
            read_all(cut)
        assert_one_line_error(excinfo, str(cut))


def test_bit_flips_in_the_header_never_escape_as_tracebacks(tmp_path: Path) -> None:
    data = bytearray(small_safetensors(tmp_path).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    flipped = tmp_path / "flipped.safetensors"
    refused = 0
    for position in range(8 + n):
        for bit in range(8):
            data[position] ^= 1 << bit
            flipped.write_bytes(data)
            try:
                read_all(flipped)
            except QkvconvError as e:
                assert "\n" not in str(e) and str(flipped) in str(e)
                refused += 1
            data[position] ^= 1 << bit
    assert refused > 8 * 8  # every flip of the length field at least


@pytest.mark.parametrize("header, data, words", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, ["'w'", "truncated"]),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, ["'w'", "16 bytes"]),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, ["unknown dtype 'Q4'"]),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, ["invalid shape"]),
    ({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "v": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6, ["overlap"]),
    ({"w": {"dtype": "U8", "shape": [1]}}, b"\0", ["lacks"]),
    ([1, 2], b"", ["not a JSON object"]),
    ({"__metadata__": {"a": 1}}, b"", ["__metadata__"]),
])
def test_lying_safetensors_headers_are_refused(tmp_path: Path, header: object, data: bytes, words: list[str]) -> None:
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(QkvconvError) as excinfo:
        read_all(path)
    assert_one_line_error(excinfo, str(path), *words)


def test_bad_json_and_huge_header_length_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    text = b'{"w": {"dtype": "F32",'
    bad.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(QkvconvError) as excinfo:
        read_all(bad)
    assert_one_line_error(excinfo, str(bad), "not valid JSON")
    bad.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(QkvconvError) as excinfo:
        read_all(bad)
    assert_one_line_error(excinfo, str(bad), "truncated")
    text = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {}}'
    bad.write_bytes(struct.pack("<Q", len(text)) + text + b"\0")
    with pytest.raises(QkvconvError) as excinfo:
        read_all(bad)
    assert_one_line_error(excinfo, "appears twice")


def test_missing_shard_and_tensor_absent_from_its_shard_are_refused(tmp_path: Path) -> None:
    tensors = {f"t{i}": sample(torch.float32, (10,), i) for i in range(4)}
    write_safetensors(tmp_path, tensors, max_shard_size=80)
    index = tmp_path / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    wrong = {**original, "weight_map": {**original["weight_map"], "ghost": "model-00001-of-00002.safetensors"}}
    index.write_text(json.dumps(wrong))
    with pytest.raises(QkvconvError) as excinfo:
        open_reader(tmp_path)
    assert_one_line_error(excinfo, "'ghost'", "model-00001-of-00002.safetensors")
    escape = {**original, "weight_map": {"t0": "../elsewhere.safetensors"}}
    index.write_text(json.dumps(escape))
    with pytest.raises(QkvconvError, match="outside its directory"):
        open_reader(tmp_path)
    index.write_text(json.dumps(original))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(QkvconvError) as excinfo:
        open_reader(tmp_path)
    assert_one_line_error(excinfo, "model-00002-of-00002.safetensors", "missing")
    index.write_text("{not json")
    with pytest.raises(QkvconvError, match="not valid JSON"):
        open_reader(tmp_path)


def test_truncated_torch_files_are_refused(tmp_path: Path) -> None:
    path = write_torch(tmp_path / "whole.pth", {"a": torch.randn(64, 64), "b": torch.randn(64)})
    torch.save({"a": torch.randn(64, 64)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pth"
    for source in (path, tmp_path / "legacy.pt"):
        data = source.read_bytes()
        for length in (0, 3, 100, len(data) // 2, len(data) - 1):
            cut.write_bytes(data[:length])
            with pytest.raises(QkvconvError) as excinfo:
                read_all(cut)
            assert_one_line_error(excinfo, str(cut))


class RunsCode:
    """Unpickling this runs a shell command, which must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.ones(2), "boom": RunsCode(marker)}
    if kind == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(QkvconvError) as excinfo:
        open_reader(path)
    assert not marker.exists()
    assert_one_line_error(excinfo, str(path))
    if kind != "plain-pickle":
        assert "refused" in str(excinfo.value)


def test_not_a_state_dict_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(QkvconvError, match="not a state dict"):
        open_reader(tmp_path / "list.pt")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(QkvconvError, match="unknown weights format"):
        open_reader(tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QkvconvError, match="no weights in"):
        open_reader(tmp_path / "empty")
    with pytest.raises(QkvconvError, match="has no tensor 'nope'"):
        open_reader(small_safetensors(tmp_path)).read("nope")


# ---------------------------------------------------------------------------------------- writer contract


def writers(tmp_path: Path, layout: dict[str, TensorMeta]) -> list:
    return [SafetensorsWriter(tmp_path, layout, max_shard_size=32), TorchWriter(tmp_path / "out.pth", layout)]


def test_writers_reject_what_the_layout_does_not_promise(tmp_path: Path) -> None:
    layout = {"a": TensorMeta((2, 3), torch.float32), "b": TensorMeta((4,), torch.bfloat16)}
    for writer in writers(tmp_path, layout):
        with pytest.raises(LayoutViolation, match="not in the layout"):
            writer.write("c", torch.zeros(2, 3))
        with pytest.raises(LayoutViolation, match=r"\(3, 2\)"):
            writer.write("a", torch.zeros(3, 2))
        with pytest.raises(LayoutViolation, match="bfloat16"):
            writer.write("a", torch.zeros(2, 3, dtype=torch.bfloat16))
        writer.write("a", torch.zeros(2, 3))
        with pytest.raises(LayoutViolation, match="already written"):
            writer.write("a", torch.zeros(2, 3))
        with pytest.raises(LayoutViolation, match="never written, first 'b'"):
            writer.close()
        writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_abort_leaves_nothing_and_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    layout = {f"t{i}": TensorMeta((8,), torch.float32) for i in range(4)}
    for writer in writers(tmp_path, layout):
        writer.write("t1", torch.ones(8))
        writer.abort()
    assert list(tmp_path.iterdir()) == []
    done = SafetensorsWriter(tmp_path, layout, max_shard_size=32)
    for name in layout:
        done.write(name, torch.ones(8))
    files = done.close()
    done.abort()  # after close too: the caller decided against the result
    assert list(tmp_path.iterdir()) == [] and len(files) == 5
    (tmp_path / "out.pth").write_bytes(b"precious")
    with pytest.raises(QkvconvError, match="already exists"):
        TorchWriter(tmp_path / "out.pth", layout)
    (tmp_path / "model-00003-of-00004.safetensors").write_bytes(b"precious")
    with pytest.raises(QkvconvError, match="already exists"):
        SafetensorsWriter(tmp_path, layout, max_shard_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00003-of-00004.safetensors", "out.pth"]
    assert (tmp_path / "out.pth").read_bytes() == b"precious"


def test_context_manager_aborts_on_error(tmp_path: Path) -> None:
    layout = {"a": TensorMeta((2,), torch.float32)}
    with pytest.raises(RuntimeError):
        with TorchWriter(tmp_path / "x.pth", layout) as writer:
            writer.write("a", torch.ones(2))
            raise RuntimeError("conversion failed")
    with SafetensorsWriter(tmp_path, layout) as writer:
        writer.write("a", torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


DISK_FULL_SCRIPT = r"""
import os, resource, signal, sys
from pathlib import Path
import torch
from qkvconv.errors import QkvconvError
from qkvconv.io.readers import TensorMeta
from qkvconv.io.writers import SafetensorsWriter, TorchWriter

out = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
big = {f"t{i}": TensorMeta((2**16,), torch.float32) for i in range(8)}  # 2 MiB: fails mid-stream
edge = {"t0": TensorMeta(((2**20 - 200) // 4,), torch.float32)}       # data fits, the zip's headers and end do not
for make, layout in [(lambda l: TorchWriter(out / "x.pth", l), big), (lambda l: TorchWriter(out / "x.pth", l), edge),
                     (lambda l: SafetensorsWriter(out, l), big)]:
    try:
        writer = make(layout)
        for name, meta in layout.items():
            writer.write(name, torch.ones(meta.shape))
        writer.close()
    except QkvconvError as e:
        print(e)
    assert os.listdir(out) == [], os.listdir(out)
"""


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    """A size limit (or full disk) is one error naming the reason, and leaves no file behind. The .pth
    file has its final size from the start, so a limit is hit before any tensor is written."""
    result = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("cannot write") and "File too large" in line for line in lines)


# ---------------------------------------------------------------------------------------- memory

STREAM_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import torch
from qkvconv.io.readers import open_reader
from qkvconv.io.writers import SafetensorsWriter, TorchWriter

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def stream(reader, writer):
    start = time.perf_counter()
    for name in reader.names():
        writer.write(name, reader.read(name))
        reader.release()
    writer.close()
    return time.perf_counter() - start

src, work = Path(sys.argv[1]), Path(sys.argv[2])
baseline = status("VmRSS")
reader = open_reader(src)
layout = {n: reader.meta(n) for n in reader.names()}
to_torch = stream(reader, TorchWriter(work / "streamed.pth", layout))
after_torch = status("VmHWM")
reader = open_reader(work / "streamed.pth")
(work / "out").mkdir()
to_safetensors = stream(reader, SafetensorsWriter(work / "out", layout, max_shard_size=64 * 2**20))
print(json.dumps({"baseline": baseline, "after_torch": after_torch, "after_safetensors": status("VmHWM"),
                  "to_torch_s": to_torch, "to_safetensors_s": to_safetensors}))
"""


def test_streaming_a_200mb_checkpoint_keeps_memory_at_about_one_tensor(tmp_path: Path) -> None:
    """safetensors -> TorchWriter -> (mmapped .pth) -> sharded SafetensorsWriter, in a fresh process."""
    n, numel = 25, 2 * 2**20  # 25 float32 tensors of 8 MiB: 200 MiB
    layout = {f"layer.{i}.weight": TensorMeta((numel // 1024, 1024), torch.float32) for i in range(n)}
    source = tmp_path / "source.safetensors"
    with SafetensorsWriter(tmp_path, layout, prefix="source") as writer:
        for i, name in enumerate(layout):
            writer.write(name, torch.full(layout[name].shape, float(i)))
    size = sum(m.nbytes for m in layout.values())
    result = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(source), str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    m = json.loads(result.stdout)
    for stage in ("after_torch", "after_safetensors"):
        assert m[stage] - m["baseline"] < size / 5, (stage, m)
    reader = open_reader(tmp_path / "out")
    assert len(reader.files()) == 5 and reader.names() == list(layout)
    assert all(torch.equal(reader.read(name)[::97], torch.full((numel // 1024, 1024), float(i))[::97])
               for i, name in enumerate(layout))
