"""Replace files in a checkpoint directory so that a crash leaves the old checkpoint or the new one.

Protocol: every new file is written and fsynced under a hidden temporary name beside its target
(`stage`). `commit` then writes a journal that lists the renames, performs them, and removes the
journal. A run that finds a journal finishes the renames (the staged files were complete and checked
before the journal existed); a run that finds staged files without a journal deletes them. A lock
on the directory keeps two qkvconv runs off it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from types import TracebackType

from qkvconv.errors import QkvconvError

TMP_SUFFIX = ".qkvconv-tmp"
JOURNAL_NAME = ".qkvconv-journal.json"


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def staged_name(target: Path) -> Path:
    """The hidden temporary name a new version of `target` is written under."""
    return target.with_name(f".{target.name}{TMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    return path.name.endswith(TMP_SUFFIX) or path.name == JOURNAL_NAME


class DirectoryLock:
    """An exclusive, non-blocking flock on the directory itself: a second run refuses clearly.

    Locking the directory (not a lock file in it) leaves nothing behind in the user's checkpoint.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        try:
            self._fd = os.open(self.directory, os.O_RDONLY)
        except OSError as e:
            raise QkvconvError(f"cannot open {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise QkvconvError(
                f"another qkvconv run is working on {self.directory}; wait for it to finish and run again"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def recover(directory: Path) -> list[str]:
    """Finish an interrupted commit, or clean up an interrupted write. Returns what it did."""
    done: list[str] = []
    journal = directory / JOURNAL_NAME
    if journal.exists():
        try:
            renames = json.loads(journal.read_text())["renames"]
        except (OSError, ValueError, KeyError, TypeError):
            renames = None
        if renames is not None:
            for staged, target in renames:
                staged_path, target_path = directory / staged, directory / target
                if staged_path.exists():
                    os.replace(staged_path, target_path)
                    done.append(f"finished an interrupted upgrade: {target}")
            fsync_dir(directory)
        # A journal that cannot be read was never completely written: nothing was renamed yet.
        journal.unlink()
        fsync_dir(directory)
    for leftover in directory.iterdir():
        if leftover.name.endswith(TMP_SUFFIX):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            done.append(f"removed a leftover temporary file: {leftover.name}")
    return done


class Transaction:
    """Stage new versions of files in one directory, then replace them all or none."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.staged: dict[Path, Path] = {}  # target -> staged file

    def stage(self, target_name: str) -> Path:
        """A path to write the new version of `target_name` to."""
        target = self.directory / target_name
        path = staged_name(target)
        self.staged[target] = path
        return path

    def commit(self) -> None:
        for path in self.staged.values():
            fsync_file(path)
        journal = self.directory / JOURNAL_NAME
        tmp_journal = staged_name(journal)
        renames = [[s.name, t.name] for t, s in self.staged.items()]
        with open(tmp_journal, "w") as f:
            json.dump({"renames": renames}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_journal, journal)
        fsync_dir(self.directory)
        for target, path in self.staged.items():
            os.replace(path, target)
        fsync_dir(self.directory)
        journal.unlink()
        fsync_dir(self.directory)
        self.staged.clear()

    def abort(self) -> None:
        for path in self.staged.values():
            path.unlink(missing_ok=True)
        self.staged.clear()

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
