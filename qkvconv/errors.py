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
    """The model family is outside what this operation covers.

    `reason` is the refusal alone (what the model has that the operation cannot express), without the
    list of what is covered that the message may append: code that combines refusals reads `reason`,
    never the message.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def nonfinite_error(name: str, count: int) -> QkvconvError:
    """NaN or inf in a checkpoint is reported, never silently carried into a converted one: the one message,
    whether torch (model/nonfinite.py) or the byte path's numpy scan (io/engine.py) found them."""
    return QkvconvError(
        f"{name} holds {count:,} NaN/inf values; the checkpoint is damaged or was saved mid-divergence "
        "(pass --allow-nonfinite to convert it anyway)"
    )
