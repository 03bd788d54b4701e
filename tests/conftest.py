"""Shared test helpers: copies of the committed legacy fixtures, and the real litgpt as an oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

FIXTURES = Path(__file__).parent.parent / "fixtures" / "legacy"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}
FULL_CASES = [n for n, c in CASES.items() if c["kind"] == "full"]
LORA_CASES = [n for n, c in CASES.items() if c["kind"] == "lora"]


@pytest.fixture
def legacy(tmp_path: Path):
    """Copy a legacy fixture (and, for a LoRA run, its base beside it) into tmp; return its path."""

    def copy(name: str) -> Path:
        dst = tmp_path / name
        if not dst.exists():
            shutil.copytree(FIXTURES / name, dst)
        base = CASES[name].get("base")
        if base and not (tmp_path / base).exists():
            shutil.copytree(FIXTURES / base, tmp_path / base)
        return dst

    return copy


def reference(directory: Path) -> dict:
    return torch.load(directory / "reference.pt", weights_only=True)


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return obj["model"] if "model" in obj and isinstance(obj["model"], dict) else obj


def litgpt_logits(model_dir: Path, tokens: torch.Tensor, lora_dir: Path | None = None) -> torch.Tensor:
    """Logits of current litgpt loading these files with strict=True (the way users load them)."""
    if lora_dir is None:
        from litgpt import Config
        from litgpt.model import GPT

        config = Config.from_file(model_dir / "model_config.yaml")
        model = GPT(config)
        model.load_state_dict(state_dict(model_dir / "lit_model.pth"), strict=True)
    else:
        from litgpt.lora import GPT as LoRAGPT
        from litgpt.lora import Config as LoRAConfig

        hp = yaml.safe_load((lora_dir / "hyperparameters.yaml").read_text())
        lora_fields = {k: hp[k] for k in hp if k.startswith("lora_")}
        config = LoRAConfig.from_file(lora_dir / "model_config.yaml", **lora_fields)
        model = LoRAGPT(config)
        merged = {**state_dict(model_dir / "lit_model.pth"), **state_dict(lora_dir / "lit_model.pth.lora")}
        model.load_state_dict(merged, strict=True)
    model.eval()
    with torch.no_grad():
        return model(tokens)


def populate_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "0" * 40) -> None:
    """Lay `source`'s files out as huggingface_hub's cache does (blobs, a snapshot of symlinks, refs/main)."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny random transformers models by case id (hf_models.CASES, REFUSED and NATIVE), built on first use in this module."""
    from hf_models import BY_ID, NATIVE_BY_ID, REFUSED_BY_ID, _build

    cache: dict = {}

    def get(case_id: str):
        if case_id not in cache:
            cache[case_id] = _build({**BY_ID, **REFUSED_BY_ID, **NATIVE_BY_ID}[case_id], tmp_path_factory.mktemp(case_id))
        return cache[case_id]

    return get


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random HF base models with their litgpt twins by kind (peft_models.BASES), built on first use."""
    from peft_models import _build_base

    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = _build_base(kind, tmp_path_factory.mktemp(f"base-{kind}"))
        return cache[kind]

    return get
