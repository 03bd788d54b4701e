"""`qkvconv --help` and `qkvconv inspect` of a safetensors Hugging Face directory import no torch
(benchmarks/startup.py measures what that saves), and the torch-free inspect says exactly what the
torch readers say: the same report, the same refusals."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qkvconv.cli import app
from qkvconv.errors import QkvconvError
from qkvconv.formats.hf.format import FORMAT
from qkvconv.io.config_files import read_json
from qkvconv.io.readers import SafetensorsReader, open_reader
from qkvconv.io.safetensors_header import SafetensorsHeaders

ROOT = Path(__file__).parent.parent

# Runs the CLI as `python -m qkvconv` does, then says on stderr's last line whether torch was imported.
PROBE = """
import runpy, sys
sys.argv = ["qkvconv", *sys.argv[1:]]
try:
    runpy.run_module("qkvconv", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write(f"\\ntorch imported: {'torch' in sys.modules}\\n")
"""

# fused (sequential, grouped, per-head) and split q/k/v; GQA, MQA, MHA; biases, a tied head, head_dim; a
# family litgpt has no equivalent of (checked on its q/k/v shapes only)
FAMILIES = ["llama3-gqa", "qwen2-bias-tied", "gemma-head-dim", "neox-parallel", "falcon-7b-mqa",
            "falcon-40b-grouped", "phi3-fused", "cohere-qk-norm"]


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("torch imported: "), proc.stderr
    return proc, last == "torch imported: True"


def torch_report(directory: Path) -> dict:
    """The report as it was made before inspect went torch-free: through the torch readers."""
    return FORMAT.report(directory, read_json(directory / "config.json"), open_reader(directory))


def mixed_dtypes(source: Path, directory: Path) -> Path:
    """A copy of `source` with some tensors in bfloat16 and float16: dtype names and per-dtype counts."""
    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    for i, name in enumerate(sorted(tensors)):
        tensors[name] = tensors[name].to((torch.bfloat16, torch.float16, torch.float32)[i % 3])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def sharded(source: Path, directory: Path) -> Path:
    """`source` re-written by qkvconv as small safetensors shards with an index."""
    result = CliRunner().invoke(app, ["convert", str(source), "--to", "hf", "--out", str(directory),
                                      "--max-shard-size", "4KB", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


@pytest.mark.parametrize("case_id", FAMILIES)
def test_torch_free_report_is_the_torch_readers_report(case_id: str, built) -> None:  # noqa: F811
    directory = built(case_id).directory
    report = FORMAT.inspect(directory)
    assert report == torch_report(directory)
    assert report["family"] is not None and report["dtype"] == "float32"


def test_torch_free_report_of_sharded_and_mixed_dtype_directories(built, tmp_path: Path) -> None:  # noqa: F811
    mixed = mixed_dtypes(built("qwen2-bias-tied").directory, tmp_path / "mixed")
    report = FORMAT.inspect(mixed)
    assert report == torch_report(mixed)
    assert set(report["dtype"]) == {"bfloat16", "float16", "float32"}
    assert sum(report["dtype"].values()) == report["parameters"]
    split = sharded(built("falcon-40b-grouped").directory, tmp_path / "sharded")
    assert FORMAT.inspect(split) == torch_report(split)
    assert len([f for f in FORMAT.inspect(split)["files"] if f["name"].endswith(".safetensors")]) > 1


LLAMA_HEADS = ({"num_key_value_heads": 4}, {"num_attention_heads": 8}, {"head_dim": 16})


def contradictions(directory: Path, tmp_path: Path, heads: tuple[dict, ...] = LLAMA_HEADS) -> list[Path]:
    """Copies whose config.json or tensors contradict each other (as test_convert's refusal test):
    head counts (`heads`: changes to config.json in the family's own keys), layers, an unknown tensor."""
    out = []
    for i, change in enumerate(({"num_hidden_layers": 3}, *heads)):
        broken = tmp_path / f"config-{i}"
        shutil.copytree(directory, broken)
        (broken / "config.json").write_text(json.dumps({**read_json(directory / "config.json"), **change}))
        out.append(broken)
    extra = tmp_path / "extra-tensor"
    shutil.copytree(directory, extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.experts.0.w1.weight"] = torch.zeros(2, 2)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    out.append(extra)
    return out


# Phi-3's fused qkv_proj is already in litgpt's sequential order: its plan copies it with no step, so no
# shape rule sees the head counts, and a config.json with other head counts was never refused (neither
# before inspect went torch-free nor since); only the structural contradictions are checked there.
@pytest.mark.parametrize("case_id, heads", [
    ("llama3-gqa", LLAMA_HEADS), ("qwen2-bias-tied", LLAMA_HEADS),
    ("falcon-40b-grouped", ({"num_kv_heads": 4}, {"num_attention_heads": 8})), ("phi3-fused", ()),
])
def test_torch_free_inspect_refuses_what_the_torch_readers_refuse(
        case_id: str, heads: tuple[dict, ...], built, tmp_path: Path) -> None:  # noqa: F811
    for broken in contradictions(built(case_id).directory, tmp_path, heads):
        with pytest.raises(QkvconvError) as torch_free:
            FORMAT.inspect(broken)
        with pytest.raises(QkvconvError) as with_torch:
            torch_report(broken)
        assert str(torch_free.value) == str(with_torch.value)
        assert (broken.name == "extra-tensor") == ("does not have" in str(torch_free.value))
        assert "config.json does not match the tensors" in str(torch_free.value), broken.name


def test_header_parser_refuses_exactly_as_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(4, 3), "b": torch.ones(5, dtype=torch.bfloat16)}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    lies = [{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
            {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}},
            {"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
             "v": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}},
            {"__metadata__": {"a": 1}}]
    cases = [data[:n] for n in range(len(data))]
    cases += [struct.pack("<Q", len(h)) + h + b"\0" * 16 for h in (json.dumps(x).encode() for x in lies)]
    for content in cases:
        cut.write_bytes(content)
        with pytest.raises(QkvconvError) as header:
            SafetensorsHeaders(cut)
        with pytest.raises(QkvconvError) as reader:
            SafetensorsReader(cut)
        assert str(header.value) == str(reader.value)
    cut.write_bytes(data)
    headers, reader = SafetensorsHeaders(cut), SafetensorsReader(cut)
    assert headers.names() == reader.names()
    assert [(headers.meta(n).shape, headers.meta(n).dtype) for n in headers.names()] == \
        [(reader.meta(n).shape, str(reader.meta(n).dtype).removeprefix("torch.")) for n in reader.names()]


def test_help_and_inspect_of_safetensors_do_not_import_torch(built, tmp_path: Path) -> None:  # noqa: F811
    proc, imported = run_probe("--help")
    assert proc.returncode == 0 and "inspect" in proc.stdout and not imported
    directory = sharded(built("llama3-gqa").directory, tmp_path / "sharded")
    for source in (built("phi3-fused").directory, directory, built("cohere-qk-norm").directory):
        proc, imported = run_probe("inspect", str(source), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == json.loads(CliRunner().invoke(app, ["inspect", str(source), "--json"]).output)
        assert not imported
        proc, imported = run_probe("inspect", str(source))  # the table too
        assert proc.returncode == 0 and "qkv_order" in proc.stdout and not imported
    [broken, *_] = contradictions(built("llama3-gqa").directory, tmp_path / "broken")
    proc, imported = run_probe("inspect", str(broken), "--json")
    assert proc.returncode == 2 and "config.json does not match" in json.loads(proc.stdout)["error"] and not imported


def test_the_probe_sees_torch_where_inspect_needs_it(built, tmp_path: Path) -> None:  # noqa: F811
    """pytorch_model.bin needs torch.load: the probe must say so (else it proves nothing above)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(built("llama3-gqa").directory / "config.json", directory)
    torch.save(load_file(built("llama3-gqa").directory / "model.safetensors"), directory / "pytorch_model.bin")
    proc, imported = run_probe("inspect", str(directory), "--json")
    assert proc.returncode == 0, proc.stderr
    assert imported
