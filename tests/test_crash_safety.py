"""Kill `qkvconv upgrade` at random moments and at every commit step: the directory is always either
the untouched original or the fully upgraded checkpoint, and a re-run finishes the job."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FIXTURES
from qkvconv.io.transaction import sibling
from qkvconv.ops.upgrade import upgrade

ROOT = Path(__file__).resolve().parent.parent


def make_legacy_checkpoint(directory: Path, n_layer: int = 6, n_embd: int = 512) -> None:
    """A legacy litgpt checkpoint big enough (about 70 MB) that reading, writing and checking take time."""
    cfg = yaml.safe_load((FIXTURES / "gqa_llama" / "model_config.yaml").read_text())
    cfg.update(n_layer=n_layer, n_embd=n_embd, n_head=8, n_query_groups=2, head_size=n_embd // 8,
               intermediate_size=2 * n_embd, padded_vocab_size=4096, vocab_size=4096, block_size=64)
    g = torch.Generator().manual_seed(0)
    E, I, V, rows = n_embd, 2 * n_embd, 4096, (8 + 4) * (n_embd // 8)
    sd = {"transformer.wte.weight": torch.randn(V, E, generator=g)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
        sd[p + "attn.attn.weight"] = 0.02 * torch.randn(rows, E, generator=g)
        sd[p + "attn.proj.weight"] = 0.02 * torch.randn(E, E, generator=g)
        sd[p + "norm_2.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
        for n in ("fc_1", "fc_2"):
            sd[p + f"mlp.{n}.weight"] = 0.02 * torch.randn(I, E, generator=g)
        sd[p + "mlp.proj.weight"] = 0.02 * torch.randn(E, I, generator=g)
    sd["transformer.ln_f.weight"] = 1 + 0.1 * torch.randn(E, generator=g)
    sd["lm_head.weight"] = 0.02 * torch.randn(V, E, generator=g)
    directory.mkdir(parents=True)
    torch.save(sd, directory / "lit_model.pth")
    (directory / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    (directory / "tokenizer.json").write_text("{}")


def snapshot(directory: Path) -> dict[str, object]:
    """What a loader sees: the visible files, the YAML contents and every tensor."""
    state: dict[str, object] = {}
    for p in sorted(directory.iterdir()):
        if p.name.endswith((".pth", ".lora")):
            obj = torch.load(p, weights_only=True)
            state[p.name] = {k: v.clone() for k, v in (obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj).items()}
        else:
            state[p.name] = p.read_bytes()
    return state


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or x.keys() != y.keys() or not all(torch.equal(x[n], y[n]) for n in x):
                return False
        elif x != y:
            return False
    return True


def spawn(directory: Path, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "QKVCONV_CRASH_POINT"}
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "qkvconv.cli", "upgrade", str(directory)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict, dict, float]]:
    """Per case: (pristine source, original snapshot, upgraded snapshot, seconds an uncut run takes)."""
    root = tmp_path_factory.mktemp("crash")
    full = root / "pristine" / "full"
    make_legacy_checkpoint(full)
    lora_parent = root / "pristine" / "lora"
    lora_parent.mkdir(parents=True)
    shutil.copytree(FIXTURES / "lora_qkv_proj_mlp_oddhead", lora_parent / "lora_qkv_proj_mlp_oddhead")
    shutil.copytree(FIXTURES / "gqa_bias_oddhead", lora_parent / "gqa_bias_oddhead")
    lora = lora_parent / "lora_qkv_proj_mlp_oddhead"
    out = {}
    for name, source in (("full", full), ("lora", lora)):
        work = root / f"reference-{name}"
        shutil.copytree(source.parent, work)
        target = work / source.name
        start = time.perf_counter()
        proc = spawn(target)
        assert proc.wait() == 0
        out[name] = (source, snapshot(source), snapshot(target), time.perf_counter() - start)
    return out


def fresh_copy(source: Path, tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source.parent, tmp)
    return tmp / source.name


def check_after_kill(target: Path, original: dict, upgraded: dict) -> str:
    now = snapshot(target)
    if same(now, original):
        verdict = "original"
    elif same(now, upgraded):
        verdict = "upgraded"
    else:
        raise AssertionError(f"{target} is neither the original nor the upgraded checkpoint: {sorted(now)}")
    # a re-run completes the job and leaves no temporary files anywhere
    upgrade(target)
    assert same(snapshot(target), upgraded)
    assert not sibling(target.resolve()).exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    return verdict


@pytest.mark.slow
@pytest.mark.parametrize("case,kills", [("full", 36), ("lora", 16)])
def test_random_sigkill_during_upgrade(cases, case: str, kills: int, tmp_path: Path) -> None:
    source, original, upgraded, seconds = cases[case]
    rng = random.Random(1234)
    verdicts = []
    for k in range(kills):
        target = fresh_copy(source, tmp_path / "work")
        proc = spawn(target)
        time.sleep(rng.uniform(0.35, 1.0) * seconds)  # past the imports, across reading/writing/checking
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        verdicts.append(check_after_kill(target, original, upgraded))
    # the kills must have landed on both sides of the commit, not only before work began
    assert verdicts.count("original") > 0
    print(f"\n{case}: {kills} kills survived: {verdicts.count('original')} left the original, "
          f"{verdicts.count('upgraded')} the upgraded checkpoint")


@pytest.mark.parametrize("point", ["before-exchange", "after-exchange"])
@pytest.mark.parametrize("case", ["full", "lora"])
def test_kill_at_each_commit_step(cases, case: str, point: str, tmp_path: Path) -> None:
    source, original, upgraded, _ = cases[case]
    target = fresh_copy(source, tmp_path / "work")
    proc = spawn(target, {"QKVCONV_CRASH_POINT": point})
    assert proc.wait() == -signal.SIGKILL
    expected = "original" if point == "before-exchange" else "upgraded"
    assert sibling(target.resolve()).exists()  # the leftover the next run removes
    assert check_after_kill(target, original, upgraded) == expected


JOURNAL_CHILD = """
import sys
from pathlib import Path
import qkvconv.io.transaction as t
t.exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: the journal fallback
from qkvconv.ops.upgrade import upgrade
upgrade(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("point", ["before-journal", "after-journal", "mid-rename", "before-journal-removal"])
def test_kill_at_each_step_of_the_journal_fallback(cases, point: str, tmp_path: Path) -> None:
    source, original, upgraded, _ = cases["lora"]  # two files change: the adapter and hyperparameters
    target = fresh_copy(source, tmp_path / "work")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QKVCONV_CRASH_POINT": point}
    proc = subprocess.run([sys.executable, "-c", JOURNAL_CHILD, str(target)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # the journal makes the next run roll forward; before it exists, the next run cleans up
    verdict = check_after_kill_journal(target, original, upgraded)
    assert verdict == ("original" if point == "before-journal" else "upgraded")


def check_after_kill_journal(target: Path, original: dict, upgraded: dict) -> str:
    visible = {p.name for p in target.iterdir() if not p.name.startswith(".")}
    assert visible == set(original)
    journal = (target / ".qkvconv-journal.json").exists()
    upgrade(target)
    assert same(snapshot(target), upgraded)
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    return "upgraded" if journal else "original"


@pytest.mark.slow
def test_random_sigkill_during_sharded_convert(cases, tmp_path: Path) -> None:
    """A conversion into sharded safetensors: after any kill, --out is absent or complete, never partial."""
    from qkvconv.io.readers import open_reader

    source = cases["full"][0]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "hf"
    command = [sys.executable, "-m", "qkvconv.cli", "convert", str(source), "--to", "hf", "--out", str(out),
               "--max-shard-size", "20MB"]
    start = time.perf_counter()
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    seconds = time.perf_counter() - start
    expected = {n: t.clone() for n, t in ((n, open_reader(out).read(n)) for n in open_reader(out).names())}
    assert len(list(out.glob("*.safetensors"))) > 1
    rng = random.Random(99)
    outcomes = []
    for _ in range(16):
        shutil.rmtree(out)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.35, 1.0) * seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # then it is complete: every shard of the index, every tensor as expected
            reader = open_reader(out)
            assert sorted(reader.names()) == sorted(expected)
            assert all(torch.equal(reader.read(n), expected[n]) for n in expected)
            outcomes.append("complete")
        else:
            outcomes.append("absent")
        if not out.exists():  # a re-run finishes the job and removes the interrupted build
            assert subprocess.run(command, env=env, capture_output=True).returncode == 0
        assert out.exists() and not sibling(out).exists()
    assert "absent" in outcomes
    print(f"\nsharded convert: 16 kills survived: {outcomes.count('absent')} left no output, "
          f"{outcomes.count('complete')} a complete one")
