"""Kill qkvconv at random moments of its work and at every commit step: an upgraded directory is always
either the untouched original or the fully upgraded checkpoint, a converted --out is absent or complete,
and a re-run finishes the job.

Every run is a fork of one warmed-up process (crash_worker.py) that has imported torch and qkvconv once,
so a run starts working at once and a kill lands where it was aimed, not in the imports. Where to aim
comes from uncut runs timed by phase (build, write, commit), and what each kill left says where it
landed; each random test asserts its kills reached the write and the checks after it, and both sides of
the commit (the commit itself takes microseconds: named crash points kill right before and after it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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


class Worker:
    """The pre-forked qkvconv of crash_worker.py: `run` forks it and runs the CLI in the child."""

    def __init__(self, logs: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "QKVCONV_CRASH_POINT"}
        env["PYTHONPATH"] = str(ROOT)
        self.logs = logs
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crash_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert "ready" in json.loads(self.proc.stdout.readline() or "{}"), "the crash worker did not start"
        self.runs = 0

    def run(self, *argv: object, kill_after: float | None = None, crash_point: str | None = None,
            setup: str | None = None) -> dict:
        self.runs += 1
        log = self.logs / f"run-{self.runs}.log"
        request = {"argv": [str(a) for a in argv], "kill_after": kill_after, "setup": setup, "log": str(log),
                   "env": {"QKVCONV_CRASH_POINT": crash_point}, "timeout": 300}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the crash worker died"
        result = json.loads(line)
        result["log"] = log.read_text() if log.exists() else ""
        assert not result["hung"], f"qkvconv {' '.join(request['argv'])} hung: {result['log']}"
        # a run the kill did not reach must have succeeded
        assert result["killed"] or result["exit"] == 0, f"qkvconv {' '.join(request['argv'])}: {result['log']}"
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # no need to wait for its interpreter's teardown
        self.proc.wait()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    w = Worker(tmp_path_factory.mktemp("crash-logs"))
    yield w
    w.close()


# Calibration: when a run builds beside its target, writes the weight files (a writer's lifetime) and
# starts the commit, on the clock the worker reports (time.perf_counter: the system's monotonic clock,
# shared by parent and child). Test code, run in the child before the CLI.
TIMING = """
import time
import qkvconv.io.transaction as t
from qkvconv.io import writers

def _stamp(what):
    with open({stamps!r}, "a") as f:
        f.write(f"{{what}} {{time.perf_counter()!r}}\\n")

def _after(what, f):
    def g(*a, **k):
        r = f(*a, **k)
        _stamp(what)
        return r
    return g

def _before(what, f):
    def g(*a, **k):
        _stamp(what)
        return f(*a, **k)
    return g

t.Replacement.__enter__ = _after("build", t.Replacement.__enter__)
t.Replacement.commit = _before("commit", t.Replacement.commit)
t.fresh_output = _after("build", t.fresh_output)
t.publish = _before("commit", t.publish)
for _cls in (writers.TorchWriter, writers.SafetensorsWriter):
    _cls.__init__ = _before("write", _cls.__init__)
    _cls.__exit__ = _after("written", _cls.__exit__)
"""

# Where a kill can land, as read from what it left behind
BEFORE_BUILD = "before the build"
IN_WRITE = "in the write"  # a new weight file is missing or incomplete in the build
WRITTEN = "written, before the commit"  # checking, the forward pass, the other files, linking, fsync
AFTER_COMMIT = "after the commit"
AFTER_RUN = "after the run"  # the kill came after the run ended by itself
PHASES = [BEFORE_BUILD, IN_WRITE, WRITTEN, AFTER_COMMIT, AFTER_RUN]


@dataclass
class Timing:
    """An uncut run, in seconds after the fork."""

    seconds: float  # its end
    build: float  # the build beside the target exists from here
    write: tuple[float, float] | None  # the weight files are written (None: too small for a writer)
    commit: float  # the commit begins

    def window(self, phase: str) -> tuple[float, float]:
        if phase == IN_WRITE:
            assert self.write is not None
            return self.write
        assert phase == WRITTEN
        return (self.write[1] if self.write else self.build), self.commit

    @property
    def wanted(self) -> set[str]:
        """Where the random kills must have landed."""
        return {IN_WRITE, WRITTEN} if self.write else {WRITTEN}


def calibrate(worker: Worker, argv_for: Callable[[int], tuple], stamps: Path, rounds: int = 2) -> Timing:
    """Time `rounds` uncut runs (argv_for(i) gives each one's arguments) and keep the fastest: the one the
    machine's other work disturbed least (a slower run under a kill then takes it earlier in its work,
    rather than after its end)."""
    timings = []
    for i in range(rounds):
        stamps.unlink(missing_ok=True)
        result = worker.run(*argv_for(i), setup=TIMING.format(stamps=str(stamps)))
        marks: dict[str, list[float]] = {}
        for line in stamps.read_text().splitlines():
            what, when = line.split()
            marks.setdefault(what, []).append(float(when) - result["started"])
        write = (min(marks["write"]), max(marks["written"])) if "write" in marks else None
        timings.append(Timing(result["seconds"], min(marks["build"]), write, max(marks["commit"])))
    return min(timings, key=lambda t: t.seconds)


EXTRA_KILLS = 8  # at most this many more, aimed at a phase no planned kill reached (the load moves phases)


def campaign(rng: random.Random, timing: Timing, points: list[str],
             kill: Callable[[float | None, str | None], tuple[str, str]],
             whole: int = 4, work: int = 4, write: int = 4) -> tuple[Counter, Counter]:
    """Kill runs, in random order: at one random moment in each of `whole` equal slices of the run and of
    `work` slices of the time its build exists before the commit, at `write` random moments in the write
    of the weights, and once at each named crash point. Then, while a wanted phase has no random kill
    yet, more aimed at it, moved later or earlier by where each one landed. `kill(delay, point)` returns
    (the state it left, where it landed); returns the count of states (all kills) and of landings (the
    random kills)."""
    delays = [(i + rng.random()) * timing.seconds / whole for i in range(whole)]
    span = timing.commit - timing.build
    delays += [timing.build + (i + rng.random()) * span / work for i in range(work)]
    if timing.write:
        delays += [rng.uniform(*timing.write) for _ in range(write)]
    planned: list[tuple[float | None, str | None]] = [(d, None) for d in delays] + [(None, p) for p in points]
    rng.shuffle(planned)
    states: Counter = Counter()
    where: Counter = Counter()
    for delay, point in planned:
        state, landed = kill(delay, point)
        states[state] += 1
        if point is None:
            where[landed] += 1
    # The machine may run slower or faster now than when it was timed: search the factor on the timing by
    # bisection (in log scale) between factors seen to land too early and too late.
    scale, early, late, target = 1.0, None, None, None
    for _ in range(EXTRA_KILLS):
        missing = sorted(timing.wanted - set(where), key=PHASES.index)
        if not missing:
            break
        if missing[0] != target:
            target, early, late = missing[0], None, None
        state, landed = kill(scale * rng.uniform(*timing.window(target)), None)
        states[state] += 1
        where[landed] += 1
        if landed == target:
            continue
        if PHASES.index(landed) < PHASES.index(target):
            early = scale
            late = late if late is not None and late > early else None
        else:
            late = scale
            early = early if early is not None and early < late else None
        scale = (early * late) ** 0.5 if early and late else early * 2 if early else late / 2
    return states, where


def landed(build: Path, prior: tuple[int, int] | None, result: dict, committed: bool,
           weights_complete: Callable[[Path], bool]) -> str:
    """Where in the run a kill landed, read from what it left. `build`: where the run builds the new
    version; `prior`: identity(build) before the run (what an earlier killed run left there)."""
    if not result["killed"]:
        return AFTER_RUN
    if committed:
        return AFTER_COMMIT
    if identity(build) in (None, prior):
        return BEFORE_BUILD
    try:
        return WRITTEN if weights_complete(build) else IN_WRITE
    except Exception:  # missing, or a .pth whose zip directory is not written yet
        return IN_WRITE


def identity(path: Path) -> tuple[int, int] | None:
    """Tells a directory from one made later under the same name (an inode number can be reused)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def snapshot(directory: Path, mmap: bool = False) -> dict[str, object]:
    """What a loader sees: every entry (hidden ones too), the text files' contents and every tensor.
    `mmap`: map the tensors instead of reading them (faster; only for files nothing writes to while
    the snapshot is in use)."""
    return {p.name: load_tensors(p, mmap) if p.name.endswith((".pth", ".lora")) else p.read_bytes()
            for p in sorted(directory.iterdir())}


def load_tensors(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True, mmap=mmap)
    return obj["model"] if isinstance(obj.get("model"), dict) else obj


def same(a: dict[str, object], b: dict[str, object]) -> bool:
    return a.keys() == b.keys() and all(same_entry(a[k], b[k]) for k in a)


def same_entry(x: object, y: object) -> bool:
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    return x == y


@dataclass
class Case:
    source: Path  # the pristine legacy checkpoint (its parent is copied: a LoRA run's base lies beside it)
    original: dict[str, bytes]  # its files, byte for byte
    upgraded: dict[str, object]  # snapshot of the upgraded checkpoint
    timing: Timing

    def weights_complete(self, build: Path) -> bool:
        """Are the new weight files complete in `build`? (An upgrade rewrites every weight file of a
        legacy checkpoint.)"""
        return all(same_entry(load_tensors(build / n, mmap=True), self.upgraded[n]) for n in self.upgraded
                   if n.endswith((".pth", ".lora")))


@pytest.fixture(scope="module")
def cases(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
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
        targets = [fresh_copy(source, root / f"reference-{name}-{i}") for i in range(2)]
        timing = calibrate(worker, lambda i: ("upgrade", targets[i]), root / "stamps")
        out[name] = Case(source, file_bytes(source), snapshot(targets[-1], mmap=True), timing)
    return out


def fresh_copy(source: Path, tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source.parent, tmp)
    return tmp / source.name


def verdict(target: Path, case: Case, after: str = "a kill") -> str:
    """'original' (byte for byte) or 'upgraded' (what a loader sees); anything else fails."""
    now = file_bytes(target)
    if now == case.original:
        return "original"
    if same(snapshot(target, mmap=True), case.upgraded):
        return "upgraded"
    raise AssertionError(f"after {after}, {target} is neither the original nor the upgraded checkpoint: {sorted(now)}")


def finish_and_check(target: Path, case: Case) -> None:
    """A re-run completes the job and leaves no temporary files anywhere."""
    upgrade(target)
    assert same(snapshot(target, mmap=True), case.upgraded)
    assert not sibling(target.resolve()).exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def check_after_kill(target: Path, case: Case) -> str:
    state = verdict(target, case)
    finish_and_check(target, case)
    return state


def describe(delay: float | None, point: str | None) -> str:
    return f"a kill at {point}" if point else f"a kill {delay:.3f} s after the start"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "lora"])
def test_random_sigkill_during_upgrade(worker, cases, case: str, tmp_path: Path) -> None:
    """SIGKILL at random moments across the run (reading, writing, checking, the forward pass), more inside
    the write, and right before and after the exchange: the directory is entirely original or entirely
    upgraded. Kills that leave the original are chained: the next run starts from what the killed one
    left (its build beside the directory), so recovery is exercised under kills too; the last state,
    and every upgraded one, is finished by a re-run and checked."""
    c = cases[case]
    target = fresh_copy(c.source, tmp_path / "work")

    def kill(delay: float | None, point: str | None) -> tuple[str, str]:
        nonlocal target
        build = sibling(target.resolve())
        prior = identity(build)
        result = worker.run("upgrade", target, kill_after=delay, crash_point=point)
        state = verdict(target, c, describe(delay, point))
        where = point or landed(build, prior, result, state == "upgraded", c.weights_complete)
        if point is not None:
            assert result["killed"], f"the run did not die at {point}: {result['log']}"
            assert state == ("original" if point == "before-exchange" else "upgraded")
            assert build.exists()  # the new build, or the old version: the next run removes it
        if state == "upgraded":  # a re-run removes what is left and changes nothing; start again
            finish_and_check(target, c)
            target = fresh_copy(c.source, tmp_path / "work")
        return state, where

    states, where = campaign(random.Random(1234), c.timing, ["before-exchange", "after-exchange"], kill)
    finish_and_check(target, c)
    print(f"\n{case} upgrade, {c.timing}: {sum(states.values())} kills: {dict(states)}; "
          f"the random ones landed {dict(where)}")
    assert states["original"] > 0 and states["upgraded"] > 0  # both sides of the commit
    assert c.timing.wanted <= set(where), f"no random kill landed {c.timing.wanted - set(where)}"


@pytest.mark.parametrize("point", ["before-exchange", "after-exchange"])
@pytest.mark.parametrize("case", ["full", "lora"])
def test_kill_at_each_commit_step(worker, cases, case: str, point: str, tmp_path: Path) -> None:
    c = cases[case]
    target = fresh_copy(c.source, tmp_path / "work")
    result = worker.run("upgrade", target, crash_point=point)
    assert result["exit"] == -9, result["log"]
    expected = "original" if point == "before-exchange" else "upgraded"
    assert sibling(target.resolve()).exists()  # the leftover the next run removes
    assert check_after_kill(target, c) == expected


NO_EXCHANGE = """
import qkvconv.io.transaction as t
t.exchange = lambda a, b: False  # a filesystem without RENAME_EXCHANGE: the journal fallback
"""


@pytest.mark.parametrize("point", ["before-journal", "after-journal", "mid-rename", "before-journal-removal"])
def test_kill_at_each_step_of_the_journal_fallback(worker, cases, point: str, tmp_path: Path) -> None:
    c = cases["lora"]  # two files change: the adapter and hyperparameters
    target = fresh_copy(c.source, tmp_path / "work")
    result = worker.run("upgrade", target, crash_point=point, setup=NO_EXCHANGE)
    assert result["exit"] == -9, result["log"]
    # the journal makes the next run roll forward; before it exists, the next run cleans up
    verdict = check_after_kill_journal(target, c)
    assert verdict == ("original" if point == "before-journal" else "upgraded")


def check_after_kill_journal(target: Path, case: Case) -> str:
    visible = {p.name for p in target.iterdir() if not p.name.startswith(".")}
    assert visible == set(case.original)
    journal = (target / ".qkvconv-journal.json").exists()
    finish_and_check(target, case)
    return "upgraded" if journal else "original"


# Kill a conversion right before or right after the rename that publishes --out (qkvconv has no crash
# point there; test code, run in the child before the CLI).
PUBLISH_KILL = """
import os, signal
import qkvconv.io.transaction as t
_publish = t.publish
def publish(tmp, out):
    if {point!r} == "before-publish":
        os.kill(os.getpid(), signal.SIGKILL)
    _publish(tmp, out)
    if {point!r} == "after-publish":
        os.kill(os.getpid(), signal.SIGKILL)
t.publish = publish
"""


@pytest.mark.slow
def test_random_sigkill_during_sharded_convert(worker, cases, tmp_path: Path) -> None:
    """A conversion into sharded safetensors: after any kill, --out is absent or complete, never partial.
    As for upgrades: kills across the run, more inside the write, right before and after the rename that
    publishes --out, chained (a run after a kill starts from the build the killed one left)."""
    from qkvconv.io.readers import open_reader

    source = cases["full"].source
    out = tmp_path / "hf"
    build = sibling(out)
    argv = ("convert", source, "--to", "hf", "--out", out, "--max-shard-size", "20MB")

    def uncut(i: int) -> tuple:
        shutil.rmtree(out, ignore_errors=True)
        return argv

    timing = calibrate(worker, uncut, tmp_path / "stamps")
    expected_bytes = file_bytes(out)
    reader = open_reader(out)
    expected = {n: reader.read(n).clone() for n in reader.names()}
    shards = [n for n in expected_bytes if n.endswith(".safetensors")]
    assert len(shards) > 1
    shutil.rmtree(out)

    def complete(directory: Path) -> bool:
        if file_bytes(directory) == expected_bytes:
            return True
        try:  # the same tensors written differently would do too
            r = open_reader(directory)
            return sorted(r.names()) == sorted(expected) and all(torch.equal(r.read(n), expected[n]) for n in expected)
        except Exception:  # no index, a shard missing or truncated: incomplete
            return False

    def kill(delay: float | None, point: str | None) -> tuple[str, str]:
        prior = identity(build)
        result = worker.run(*argv, kill_after=delay, setup=PUBLISH_KILL.format(point=point) if point else None)
        if out.exists():  # then it is complete: every shard of the index, every tensor as expected
            assert complete(out), f"--out is incomplete after {describe(delay, point)}"
            assert not build.exists()
            state = "complete"
        else:
            assert result["killed"], f"the conversion finished without creating {out}: {result['log']}"
            state = "absent"
        where = point or landed(build, prior, result, state == "complete",
                                lambda b: all((b / n).read_bytes() == expected_bytes[n] for n in shards))
        if point is not None:
            assert result["killed"], f"the run did not die at {point}: {result['log']}"
            assert state == ("absent" if point == "before-publish" else "complete")
        if state == "complete":
            shutil.rmtree(out)
        return state, where

    states, where = campaign(random.Random(99), timing, ["before-publish", "after-publish"], kill)
    # a re-run finishes the job and removes the interrupted build
    worker.run(*argv)
    assert complete(out) and not build.exists()
    print(f"\nsharded convert, {timing}: {sum(states.values())} kills: {dict(states)}; "
          f"the random ones landed {dict(where)}")
    assert states["absent"] > 0 and states["complete"] > 0  # both sides of the rename
    assert timing.wanted <= set(where), f"no random kill landed {timing.wanted - set(where)}"
