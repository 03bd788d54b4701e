"""The progress bar of long writes: shown on a terminal for big jobs, silent otherwise."""

from __future__ import annotations

import sys

import pytest

from qkvconv.progress import THRESHOLD_BYTES, progress_for


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_runs_to_completion(tty: bool, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    total = THRESHOLD_BYTES * 2
    progress = progress_for(total, "writing test")
    for _ in range(4):
        progress.advance(total // 4)
    out, _ = capsys.readouterr()
    assert out == ""  # stdout stays clean for --json pipelines


def test_small_jobs_get_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress = progress_for(1024, "tiny")
    progress.advance(1024)  # the do-nothing callback
