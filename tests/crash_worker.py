"""A pre-forked qkvconv for the crash-safety tests: torch and qkvconv are imported once, then every run
is a fork of this warmed-up process that runs the CLI entrypoint (`qkvconv.cli.main`) in-process.

A fresh interpreter spends about 2-4 s importing torch before it does any work; a fork starts working at
once, so a kill delay lands where it was aimed (in the write, in the checks) instead of in the imports.

This process itself never runs a torch operation: torch's thread pools do not survive a fork (a child of a
process that used them can hang on a futex), so only the children compute.

Protocol: one JSON request per line on stdin, one JSON answer per line on stdout.
  request: {"argv": [...], "env": {NAME: value or null}, "setup": python source run in the child first,
            "kill_after": seconds after the fork to SIGKILL the child, or null to let it finish,
            "timeout": seconds after which an unfinished child counts as hung and is killed,
            "log": a file for the child's stdout and stderr, or null}
  answer:  {"killed": the child died of SIGKILL, "exit": its exit code (negative: the signal),
            "hung": it ran past the timeout, "started": time.perf_counter() at the fork (the clock is
            the system's monotonic clock, shared with the child), "seconds": from the fork until the
            child ended or was killed}
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import traceback

import torch  # noqa: F401  (the import is the expensive part; no torch operation runs here)

import qkvconv.cli
import qkvconv.ops.convert  # noqa: F401
import qkvconv.ops.upgrade  # noqa: F401
import qkvconv.ops.verify  # noqa: F401


def child(request: dict) -> None:
    """Runs in the forked child: never returns."""
    code = 70
    try:
        null = os.open(os.devnull, os.O_RDWR)
        out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if request.get("log") else null
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        for name, value in (request.get("env") or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if request.get("setup"):
            exec(compile(request["setup"], "<setup>", "exec"), {"__name__": "__setup__"})
        sys.argv = ["qkvconv", *request["argv"]]
        try:
            qkvconv.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run(request: dict) -> dict:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        child(request)
    pidfd = os.pidfd_open(pid)  # readable once the child has ended
    try:
        kill_after = request.get("kill_after")
        hung = False
        wait = kill_after if kill_after is not None else request.get("timeout", 600)
        ended, _, _ = select.select([pidfd], [], [], max(0.0, wait - (time.perf_counter() - start)))
        seconds = time.perf_counter() - start
        if not ended:
            hung = kill_after is None
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    code = os.waitstatus_to_exitcode(status)
    return {"killed": code == -signal.SIGKILL, "exit": code, "hung": hung, "started": start, "seconds": seconds}


def warm_up() -> None:
    """Parse a command line of each kind once, so the children skip the imports that the CLI's argument
    parsing does on first use (typer -> pydantic, ~0.1 s). Both fail at once on a missing source, before
    any torch operation."""
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        missing = "/nonexistent/qkvconv-warm-up/source"
        for argv in (["upgrade", missing], ["convert", missing, "--to", "hf", "--out", "/nonexistent/qkvconv-warm-up/out"]):
            sys.argv = ["qkvconv", *argv]
            try:
                qkvconv.cli.main()
            except SystemExit:
                pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def main() -> None:
    warm_up()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
