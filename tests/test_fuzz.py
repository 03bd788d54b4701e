"""Fuzz the readers with mutated fixture files: the only failure allowed is qkvconv's own error.

Every reader entry point a user reaches (inspect of a litgpt directory, a LoRA run, a safetensors
Hugging Face directory) gets files with random bit flips, overwritten byte runs, truncations and
insertions. A crash other than QkvconvError (a raw exception, a traceback) is a bug.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES
from qkvconv.errors import QkvconvError
from qkvconv.ops.inspect import inspect_path
from qkvconv.io.readers import open_reader
from qkvconv.formats.weights import open_weights

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def mutations(draw, size: int):
    """A list of edits to a file of `size` bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "zero"]))
        pos = draw(st.integers(0, max(size - 1, 0)))
        if kind == "flip":
            edits.append((kind, pos, draw(st.integers(0, 7))))
        elif kind in ("overwrite", "insert"):
            edits.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        else:
            edits.append((kind, pos, draw(st.integers(1, 64))))
    return edits


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= 1 << arg
        elif kind == "overwrite":
            b[pos:pos + len(arg)] = arg
        elif kind == "insert":
            b[pos:pos] = arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "zero":
            b[pos:pos + arg] = bytes(min(arg, len(b) - pos))
    return bytes(b)


def exercise(directory: Path) -> None:
    """What a user's command does with a directory: inspect it, read every tensor, build the weights view."""
    try:
        inspect_path(directory)
        for path in directory.iterdir():
            if path.suffix in (".pth", ".lora", ".safetensors"):
                reader = open_reader(path)
                for name in reader.names():
                    reader.read(name)
        open_weights(directory)
    except QkvconvError:
        pass  # a clear, one-line error: allowed


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny safetensors checkpoint written by transformers, for the safetensors reader."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                 num_hidden_layers=1, vocab_size=32)).save_pretrained(directory)
    return directory


TARGETS = [("gqa_llama", "lit_model.pth"), ("gqa_llama", "model_config.yaml"),
           ("lora_qkv_gqa", "lit_model.pth.lora"), ("lora_qkv_gqa", "hyperparameters.yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("case,victim", TARGETS)
def test_fuzz_litgpt_files(case: str, victim: str, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    for name in (case, "gqa_llama"):
        if not (root / name).exists():
            shutil.copytree(FIXTURES / name, root / name)
    original = (FIXTURES / case / victim).read_bytes()

    @SETTINGS
    @given(edits=mutations(len(original)))
    def run(edits) -> None:
        (root / case / victim).write_bytes(mutate(original, edits))
        exercise(root / case)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_fuzz_hf_files(victim: str, hf_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "hf"
    shutil.copytree(hf_dir, work)
    original = (hf_dir / victim).read_bytes()

    @SETTINGS
    @given(edits=mutations(len(original)))
    def run(edits) -> None:
        (work / victim).write_bytes(mutate(original, edits))
        exercise(work)

    run()
