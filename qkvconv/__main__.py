"""`python -m qkvconv` and the `qkvconv` console script.

A Ctrl-C while Python loads the command line and its libraries (typer, rich, torch) must end with one
line and exit code 130, not a traceback; and some libraries' imports swallow a KeyboardInterrupt
(bare `except:`), so the run would go on as if nothing was pressed. Until a command starts working,
SIGINT therefore exits at once (nothing has been written yet); `cli.working()` then gives Python's own
handler back, so the commands clean up after themselves on Ctrl-C; once the command's work is over,
SIGINT is ignored (`cli.after_work`): the result stands, whatever arrives during output or exit.
"""

from __future__ import annotations

import os
import signal
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"error: interrupted while starting; nothing was done\n")
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from qkvconv import cli

    cli.after_work = signal.SIG_IGN
    cli.main()


if __name__ == "__main__":
    main()
