"""Fault injection for the crash-safety tests: die exactly at a named point of a commit.

Random SIGKILLs land in the long phases (reading, writing, checking); a rename takes microseconds,
so the tests name the instants between renames explicitly with QKVCONV_CRASH_POINT. Unset (always,
outside tests) this does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "QKVCONV_CRASH_POINT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
