"""Conversion speed and memory at real model sizes, measured in one run on the same files.

    python benchmarks/bench.py                       # TinyLlama-1.1B shape, bf16, cold page cache
    python benchmarks/bench.py --size 7b --warm      # Llama-2-7B shape (needs ~60 GB of disk)

Makes checkpoints with random weights (make_checkpoint.py): a Hugging Face directory (3 safetensors
shards) and a legacy litgpt checkpoint of the same model. Then each step runs as its own process:
- a plain copy of the same bytes (including the flush to disk): the floor;
- qkvconv: HF -> litgpt, litgpt legacy -> current, litgpt -> HF, each with --no-verify (the
  conversion alone) and with its default forward-pass check;
- litgpt's own convert_hf_checkpoint on the same HF input (the peer tool).
It prints wall time, ratio to the plain copy, ratio to litgpt, and peak resident memory (wait4) as
a table. By default the page cache is dropped before every step (root only), so each one reads from
disk as a fresh run would; --warm keeps files cached instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"1b": "tinyllama", "7b": "llama2-7b"}


def drop_caches(enabled: bool) -> None:
    if not enabled:
        return
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run(cmd: list[str], env_extra: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process, from its own rusage."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env_extra or {})}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{log.read()[-4000:]}")
    return seconds, usage.ru_maxrss * 1024


COPY = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, dst / f.name)
    with open(dst / f.name, "rb+") as fh:
        os.fsync(fh.fileno())
"""

LITGPT = """
import sys
from pathlib import Path
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
convert_hf_checkpoint(checkpoint_dir=Path(sys.argv[1]), model_name=sys.argv[2])
"""


def clean(outputs: Path, hf: Path) -> None:
    """Remove the last step's output and let the filesystem finish freeing it (a large unlink slows
    the next writer on ext4 otherwise, which would be charged to the wrong step)."""
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    (hf / "lit_model.pth").unlink(missing_ok=True)  # litgpt's converter writes into its input directory
    (hf / "model_config.yaml").unlink(missing_ok=True)
    os.sync()
    time.sleep(2)


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".safetensors", ".pth"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qkvconv-bench"))
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it before each step)")
    parser.add_argument("--no-litgpt", action="store_true", help="skip litgpt's converter (if litgpt is not installed)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all steps; the median is reported")
    parser.add_argument("--device", default="cpu", help="where the checks run (cpu, cuda, auto)")
    parser.add_argument("--only", default="", help="comma-separated words: run the steps whose name holds one "
                        "(the plain copy always runs: the ratios need it)")
    args = parser.parse_args()
    shape, py, cold = SHAPES[args.size], sys.executable, not args.warm
    hf, legacy = args.work / f"{shape}-hf", args.work / f"{shape}-legacy"
    for directory, extra in ((hf, ["--format", "hf"]), (legacy, ["--order", "legacy"])):
        if not directory.exists():
            subprocess.run([py, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", shape, "--out", str(directory), *extra],
                           check=True)
    outputs = args.work / "outputs"
    qkvconv = [py, "-m", "qkvconv.cli"]
    steps: list[tuple[str, list[str], int]] = [
        ("plain copy of the HF files (+fsync)", [py, "-c", COPY, str(hf), str(outputs / "copy")], size_of(hf)),
        ("qkvconv convert HF -> litgpt --no-verify", [*qkvconv, "convert", str(hf), "--to", "litgpt", "--out", str(outputs / "a"), "--no-verify"], size_of(hf)),
        ("qkvconv convert HF -> litgpt (verified)", [*qkvconv, "convert", str(hf), "--to", "litgpt", "--out", str(outputs / "b")], size_of(hf)),
        ("qkvconv upgrade legacy -> current --no-verify", [*qkvconv, "upgrade", str(legacy), "--out", str(outputs / "c"), "--no-verify"], size_of(legacy)),
        ("qkvconv upgrade legacy -> current (verified)", [*qkvconv, "upgrade", str(legacy), "--out", str(outputs / "d")], size_of(legacy)),
        ("qkvconv convert litgpt -> HF --no-verify", [*qkvconv, "convert", str(legacy), "--to", "hf", "--out", str(outputs / "e"), "--no-verify"], size_of(legacy)),
        ("qkvconv convert litgpt -> HF (verified)", [*qkvconv, "convert", str(legacy), "--to", "hf", "--out", str(outputs / "f")], size_of(legacy)),
    ]
    if args.device != "cpu":  # the checked steps run their check there
        steps = [(n if "verify" in n else n.replace("(verified)", f"(checked on {args.device})"),
                 c if "--no-verify" in c or "qkvconv" not in " ".join(c) else [*c, "--device", args.device], b)
                 for n, c, b in steps]
    if not args.no_litgpt:
        steps.append(("litgpt convert_hf_checkpoint (peer)", [py, "-c", LITGPT, str(hf), "tiny-llama-1.1b" if args.size == "1b" else "Llama-2-7b-hf"], size_of(hf)))
    if args.only:
        words = [w.strip() for w in args.only.split(",") if w.strip()]
        steps = [s for i, s in enumerate(steps) if i == 0 or any(w in s[0] for w in words)]
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in steps}
    for round_ in range(args.repeat):
        for name, cmd, nbytes in steps:
            clean(outputs, hf)
            drop_caches(cold)
            seconds, rss = run(cmd)
            samples[name].append((seconds, rss))
            print(f"  round {round_ + 1}: {name}: {seconds:.1f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
    clean(outputs, hf)
    shutil.rmtree(outputs, ignore_errors=True)
    results = []
    for name, _, nbytes in steps:
        times = sorted(s for s, _ in samples[name])
        results.append((name, times[len(times) // 2], max(r for _, r in samples[name]), nbytes))
    copy_s = results[0][1]
    peer_s = next((s for n, s, _, _ in results if "peer" in n), None)
    print(f"\n{shape}: {size_of(hf) / 1e9:.2f} GB checkpoint (bf16), {'cold' if cold else 'warm'} page cache, "
          f"{os.cpu_count()} CPUs, median of {args.repeat} runs (peak RSS: the largest)")
    print(f"{'step':48} {'wall s':>7} {'x copy':>7} {'litgpt/x':>9} {'peak RSS GiB':>13} {'RSS/ckpt':>9}")
    for name, seconds, rss, nbytes in results:
        speedup = f"{peer_s / seconds:9.2f}" if peer_s else f"{'-':>9}"
        print(f"{name:48} {seconds:7.1f} {seconds / copy_s:7.2f} {speedup} {rss / 2**30:13.2f} {rss / nbytes:9.0%}")


if __name__ == "__main__":
    main()
