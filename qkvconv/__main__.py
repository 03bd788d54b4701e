"""`python -m qkvconv` and the `qkvconv` console script.

Kept apart from cli.py so that a Ctrl-C while Python loads the command line (typer, rich) ends with
one line and exit code 130, not a traceback: the import itself runs inside the guard.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from qkvconv.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted while starting; nothing was done\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
