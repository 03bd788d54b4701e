"""`upgrade` and `verify` at real model sizes: wall time and peak memory, measured in one run.

    python benchmarks/verify_scale.py --shape tinyllama --device cpu --work /tmp/bench
    python benchmarks/verify_scale.py --shape llama2-7b --device cuda --work /tmp/bench

Makes a legacy litgpt checkpoint with random bf16 weights (benchmarks/make_checkpoint.py), upgrades
it into a new directory (with the forward-pass check on --device), then runs `qkvconv verify` of the
legacy against the upgraded one on --device. Each step runs as its own process, so peak resident
memory is per step (from wait4); verify also reports its peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process, its own rusage from wait4."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr}{stdout}")
    return seconds, usage.ru_maxrss * 1024, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tinyllama")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qkvconv-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()
    legacy, upgraded = args.work / f"{args.shape}-legacy", args.work / f"{args.shape}-upgraded"
    shutil.rmtree(upgraded, ignore_errors=True)
    py = sys.executable
    rows = []
    if not (legacy / "lit_model.pth").exists():
        t, _, out = run([py, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", args.shape, "--out", str(legacy)])
        print(out.strip())
    size = (legacy / "lit_model.pth").stat().st_size
    t, rss, _ = run([py, "-m", "qkvconv.cli", "upgrade", str(legacy), "--out", str(upgraded), "--device", args.device])
    rows.append(("upgrade --out (incl. forward check)", t, rss, None))
    t, rss, out = run([py, "-m", "qkvconv.cli", "verify", str(legacy), str(upgraded), "--device", args.device, "--json"])
    report = json.loads(out)
    rows.append((f"verify ({report['device']}, {report['dtype']})", t, rss, report["peak_gpu_bytes"]))
    print(f"\n{args.shape}: {size / 1e9:.2f} GB checkpoint, two of them compared; device {args.device}")
    print(f"{'step':40} {'wall s':>8} {'peak RSS GiB':>13} {'RSS/ckpt':>9} {'peak GPU GiB':>13}")
    for name, t, rss, gpu in rows:
        gpu_s = f"{gpu / 2**30:13.2f}" if gpu is not None else f"{'-':>13}"
        print(f"{name:40} {t:8.1f} {rss / 2**30:13.2f} {rss / size:9.0%} {gpu_s}")
    print(f"verify in-process: {report['seconds']:.1f} s; passed={report['passed']}; "
          f"logits max |diff| {report['logits_max_abs_diff']:.3g}; top-1 {report['top1_agreement']:.1%}")
    if not args.keep:
        shutil.rmtree(upgraded, ignore_errors=True)


if __name__ == "__main__":
    main()
