"""What a long run shows while it works: a spinner while it plans, a bar while it writes, a bar of
layers while it checks. On stderr, only when stderr is a terminal (pipelines and --json see nothing).

The engine and the checks report through plain callbacks (`Progress.advance(bytes)`, `layer(i, n)`);
this module turns them into Rich displays. Every display it starts is registered, so that an error or a
Ctrl-C can `clear()` them before its message: a message never lands inside a half-drawn bar.
Only Rich is imported here (no torch), so the CLI can show a spinner before the heavy imports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

THRESHOLD_BYTES = 256 * 2**20  # smaller writes finish before a bar would be readable

_active: list[Any] = []  # Rich Progress / Status objects currently drawn


@dataclass
class Progress:
    """Callback for bytes written, so the CLI can show a bar; the engine itself prints nothing."""

    advance: Callable[[int], None] = lambda n: None


def interactive() -> bool:
    return sys.stderr.isatty()


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _start(display: Any) -> Any:
    clear()  # Rich draws one live display at a time: a new stage replaces whatever is still shown
    display.start()
    _active.append(display)
    return display


def _stop(display: Any) -> None:
    if display in _active:
        _active.remove(display)
        display.stop()


def clear() -> None:
    """Take every bar and spinner off the screen (before an error message, or on Ctrl-C)."""
    for display in list(_active):
        _stop(display)


@contextmanager
def status(description: str) -> Iterator[None]:
    """A spinner with `description` while the block runs (start-up, planning, loading)."""
    if not interactive():
        yield
        return
    spinner = _start(_console().status(description))
    try:
        yield
    finally:
        _stop(spinner)


def _bar(description: str, total: float, *columns: Any) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress as RichProgress, TimeRemainingColumn

    bar = RichProgress("[progress.description]{task.description}", BarColumn(), *columns, TimeRemainingColumn(),
                       console=_console(), transient=True, redirect_stdout=False)
    return _start(bar), bar.add_task(description, total=total)


def progress_for(total_bytes: int, description: str) -> Progress:
    """An engine callback that drives a byte bar (or does nothing for small jobs or non-terminals)."""
    if total_bytes < THRESHOLD_BYTES or not interactive():
        return Progress()
    from rich.progress import DownloadColumn, TransferSpeedColumn

    bar, task = _bar(description, total_bytes, DownloadColumn(), TransferSpeedColumn())
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(task, advance=n)
        if done[0] >= total_bytes:
            _stop(bar)

    return Progress(advance)


def layers(description: str) -> Callable[[int, int], None] | None:
    """A callback `(done, total)` for a check that runs layer by layer: a bar 'checking: layer 3 of 22'."""
    if not interactive():
        return None
    from rich.progress import MofNCompleteColumn

    state: dict[str, Any] = {}

    def layer(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"], state["task"] = _bar(f"{description} layer by layer", total, MofNCompleteColumn())
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            _stop(state["bar"])

    return layer
