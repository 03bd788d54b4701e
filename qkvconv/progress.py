"""A Rich progress bar with bytes per second for long writes, on stderr and only where it helps.

The engine reports bytes written through a callback; this module turns that into a bar when the
work is big enough to take more than a moment and stderr is a terminal (pipelines see nothing).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from qkvconv.engine import Progress as EngineProgress

THRESHOLD_BYTES = 256 * 2**20  # smaller jobs finish before a bar would be readable


def progress_for(total_bytes: int, description: str) -> EngineProgress:
    """An engine callback that drives a bar (or does nothing for small jobs or non-terminals)."""
    if total_bytes < THRESHOLD_BYTES or not sys.stderr.isatty():
        return EngineProgress()
    bar = Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=Console(stderr=True), transient=True, redirect_stdout=False,
    )
    task = bar.add_task(description, total=total_bytes)
    bar.start()
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(task, advance=n)
        if done[0] >= total_bytes:
            bar.stop()

    return EngineProgress(advance)
