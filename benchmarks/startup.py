"""Start-up time of the commands that touch no tensors, against `python -c "import torch"`.

    python benchmarks/startup.py                              # makes a TinyLlama-shaped HF dir if missing
    python benchmarks/startup.py --checkpoint /tmp/bench/tl-hf --repeat 5

`qkvconv --help` and `qkvconv inspect HF_DIR` (a 2.2 GB TinyLlama-shaped checkpoint in 3 safetensors
shards) read only options, configs and safetensors headers, so they should not pay for torch's import
(seconds, cold). Each command runs as its own process: one warm-up each, then `--repeat` rounds that
take the commands in turn (so a slower moment of a shared machine hits them all alike); the table
gives the median and the ratio to the median of `import torch` (target: at most 0.25). A last run of
each qkvconv command says whether torch was imported at all.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.25

# runs the CLI as `python -m qkvconv` does, then reports whether torch was imported
PROBE = """
import runpy, sys
sys.argv = ["qkvconv", *sys.argv[1:]]
try:
    runpy.run_module("qkvconv", run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write(f"\\ntorch imported: {'torch' in sys.modules}\\n")
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def timed(cmd: list[str]) -> float:
    """Wall seconds of one child process; its output is discarded, a failure ends the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


def imports_torch(args: list[str]) -> bool:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env())
    return proc.stderr.strip().splitlines()[-1] == "torch imported: True"


def checkpoint(path: Path | None) -> Path:
    """The given HF directory, or a TinyLlama-shaped one made once in the temp directory."""
    if path is not None:
        if not (path / "config.json").is_file():
            sys.exit(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    path = Path(tempfile.gettempdir()) / "qkvconv-startup" / "tl-hf"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", "tinyllama",
                        "--format", "hf", "--out", str(path)], check=True, env=env())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="an HF safetensors directory (default: make a TinyLlama one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    args = parser.parse_args()
    directory = checkpoint(args.checkpoint)
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())

    qkvconv = [sys.executable, "-m", "qkvconv"]
    steps = {
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], None),
        "qkvconv --help": ([*qkvconv, "--help"], ["--help"]),
        "qkvconv inspect HF_DIR": ([*qkvconv, "inspect", str(directory)], ["inspect", str(directory)]),
        "qkvconv inspect HF_DIR --json": ([*qkvconv, "inspect", str(directory), "--json"],
                                          ["inspect", str(directory), "--json"]),
    }
    for cmd, _ in steps.values():  # warm-up: page cache, .pyc files
        timed(cmd)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(1, args.repeat + 1):
        for name, (cmd, _) in steps.items():
            times[name].append(timed(cmd))
            print(f"  round {r}: {name}: {times[name][-1]:.3f} s", flush=True)

    torch_median = statistics.median(times['python -c "import torch"'])
    print(f"\n{directory}: {size / 1e9:.2f} GB HF checkpoint; python {platform.python_version()}, "
          f"torch {version('torch')}, typer {version('typer')}, rich {version('rich')}; {os.cpu_count()} CPUs; "
          f"median of {args.repeat} runs after one warm-up, each its own process")
    print(f"{'command':<32}{'median s':>9}{'min s':>8}{'max s':>8}{'x import torch':>16}  {'<= 0.25':<8} imports torch")
    for name, (_, probe) in steps.items():
        t = times[name]
        median = statistics.median(t)
        ratio = median / torch_median
        met = "-" if probe is None else ("met" if ratio <= TARGET else "NOT met")
        torch_used = "-" if probe is None else ("yes" if imports_torch(probe) else "no")
        print(f"{name:<32}{median:>9.3f}{min(t):>8.3f}{max(t):>8.3f}{ratio:>16.3f}  {met:<8} {torch_used}")


if __name__ == "__main__":
    main()
