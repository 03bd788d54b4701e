"""Typed errors. The CLI turns them into one line and an exit code a pipeline can trust.

Exit codes: 0 done or nothing to do, 1 a check failed, 2 bad input or environment.
"""

from __future__ import annotations


class QkvconvError(Exception):
    """Bad input or environment: the message says what was wrong and what to do (exit 2)."""

    exit_code = 2


class CheckFailed(QkvconvError):
    """A check ran and the answer was 'no' (verify mismatch, inspect --expect mismatch): exit 1."""

    exit_code = 1


class UnsupportedFamily(QkvconvError):
    """The model family is outside what this operation covers."""
