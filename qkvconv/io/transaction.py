"""Replace files in a checkpoint directory so that a crash leaves the old checkpoint or the new one.

`Replacement` builds the new version of the directory beside it (`.NAME.qkvconv-tmp`): the new
files are written there, checked, and the unchanged files are hard-linked in; then one
renameat2(RENAME_EXCHANGE) swaps the two directories atomically and the old version is deleted.
At every instant the directory is either entirely old or entirely new; a run that finds a leftover
sibling (a build that died, or an old version not yet deleted) removes it.

Where the filesystem cannot exchange directories, `Transaction` is the fallback: new files are
moved beside their targets under hidden temporary names, a journal lists the renames, the renames
run, the journal goes. A run that finds a journal finishes the renames (the staged files were
complete and checked before the journal existed); staged files without a journal are deleted.
A lock on the directory keeps two qkvconv runs off it.

Modes: a replaced directory or file keeps the mode bits (and, where this process may set them, the
owner and group) of the one it replaces, so an upgrade never widens who may read a private checkpoint
nor makes a read-only one writable. A new directory (`new_directory`) and the files in it are new
files of this user: the umask decides.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from contextlib import contextmanager
import fcntl
import json
import os
import shutil
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from qkvconv.errors import QkvconvError
from qkvconv.io.faults import crash_point

TMP_SUFFIX = ".qkvconv-tmp"
JOURNAL_NAME = ".qkvconv-journal.json"


def fsync_path(path: Path) -> None:
    """Make a file's content and mode, or a directory's renames and new entries, durable. Opened
    read-only: a new version of a file may already be 0444."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path  # the names the callers read best with


def _keep_owner(path: Path, original: os.stat_result) -> None:
    """Give `path` the owner and group of `original` where this process may.

    Root keeps a user's checkpoint theirs; an ordinary user cannot give a file away but may still
    keep its group when they belong to it; otherwise (EPERM) the new file stays this user's.
    """
    now = os.lstat(path)
    if (now.st_uid, now.st_gid) == (original.st_uid, original.st_gid):
        return
    for uid in (original.st_uid, -1):
        try:
            os.chown(path, uid, original.st_gid, follow_symlinks=False)
            return
        except PermissionError:
            continue


def keep_mode(path: Path, original: os.stat_result) -> None:
    """Give a new version (file or directory) the owner, group and mode bits of the one it replaces.

    The owner first: chown clears set-user/group-ID bits, which the chmod then restores.
    """
    _keep_owner(path, original)
    os.chmod(path, stat.S_IMODE(original.st_mode))


def take_modes(staged: Mapping[Path, Path]) -> None:
    """Each staged file (target -> new version) takes the mode and owner of the file it will replace,
    so rewriting `lit_model.pth` does not turn a 0600 file into a 0644 one. A file with no
    predecessor stays as created (the umask's mode), like any new file of this user."""
    for target, path in staged.items():
        try:
            original = os.stat(target)
        except FileNotFoundError:
            continue
        keep_mode(path, original)


def remove_tree(path: Path, *, ignore_errors: bool = False) -> None:
    """Delete a directory tree, read-only directories included.

    The old version of a 0555 checkpoint (after the swap) or a build that already took that mode
    cannot be emptied by its owner as it is: deleting an entry needs write permission on its
    directory. The owner may grant it, so each directory gets u+rwx first (the tree is going away).
    """
    if not path.is_dir() or path.is_symlink():
        return
    for root, _, _ in os.walk(path):  # top-down: each directory is writable before rmtree empties it
        try:
            os.chmod(root, stat.S_IMODE(os.lstat(root).st_mode) | stat.S_IRWXU)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=ignore_errors)


def require_writable(directory: Path, why: str) -> None:
    """Refuse, before anything is written, to stage files inside a directory this process cannot
    write (a 0555 checkpoint on the journal path): say how to get the upgrade anyway."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise QkvconvError(
            f"{directory} is read-only and {why}, so the new files would have to be written inside it; "
            f"make it writable (chmod u+w) and run again, or upgrade into a new directory with --out DIR"
        )


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


def sibling(directory: Path) -> Path:
    """Where the new version of `directory` is built (and where the old one waits for deletion)."""
    return directory.parent / f".{directory.name}{TMP_SUFFIX}"


def recover(directory: Path) -> list[str]:
    """Finish an interrupted commit, or clean up an interrupted write. Returns what it did."""
    done: list[str] = []
    leftover_build = sibling(directory.resolve())
    if leftover_build.exists():
        remove_tree(leftover_build, ignore_errors=True)
        done.append(f"removed an interrupted run's leftover {leftover_build.name}")
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
                remove_tree(leftover)
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
        take_modes(self.staged)  # before the journal: a roll-forward renames files that have their modes
        for path in self.staged.values():
            fsync_file(path)
        crash_point("before-journal")
        journal = self.directory / JOURNAL_NAME
        tmp_journal = staged_name(journal)
        renames = [[s.name, t.name] for t, s in self.staged.items()]
        with open(tmp_journal, "w") as f:
            json.dump({"renames": renames}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_journal, journal)
        fsync_dir(self.directory)
        crash_point("after-journal")
        for target, path in self.staged.items():
            os.replace(path, target)
            crash_point("mid-rename")
        fsync_dir(self.directory)
        crash_point("before-journal-removal")
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


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories. False where the OS or filesystem cannot (then nothing moved)."""
    if _libc is None or not hasattr(_libc, "renameat2"):
        return False
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put an unchanged entry into the build: a hard link where possible (same inode, so same mode and
    owner); a copy, a new symlink or a new subdirectory takes the original's mode and owner."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        _keep_owner(dst, src.lstat())
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_or_copy(child, dst / child.name)
        keep_mode(dst, src.stat())  # after its entries: a read-only subdirectory can still be filled
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
            keep_mode(dst, src.stat())


class Replacement:
    """New versions of some files of `directory`, all made visible in one atomic step.

    Builds beside the directory and swaps; where the parent is not writable, or the filesystem cannot
    exchange directories, it stages inside the directory and commits through the journal instead.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.build: Path | None = sibling(self.directory)
        self.staged: dict[Path, Path] = {}  # target in directory -> its new version

    def __enter__(self) -> "Replacement":
        assert self.build is not None
        if self.build.exists():
            remove_tree(self.build)
        try:
            self.build.mkdir()  # writable whatever the original's mode: it takes that mode just before the swap
        except OSError:
            self.build = None  # parent not writable: stage inside the directory (journal mode)
            require_writable(self.directory, "its parent directory is not writable")
        return self

    def stage(self, target_name: str) -> Path:
        target = self.directory / target_name
        path = self.build / target_name if self.build is not None else staged_name(target)
        self.staged[target] = path
        return path

    def commit(self) -> None:
        if self.build is None:
            self._commit_by_journal()
            return
        names = {t.name for t in self.staged}
        for item in self.directory.iterdir():
            if item.name not in names and not is_temporary(item):
                _link_or_copy(item, self.build / item.name)
        take_modes(self.staged)
        for path in self.staged.values():
            fsync_file(path)
        keep_mode(self.build, self.directory.stat())  # last: a 0555 original makes the build read-only
        fsync_dir(self.build)
        crash_point("before-exchange")
        if exchange(self.directory, self.build):
            fsync_dir(self.directory.parent)
            crash_point("after-exchange")
            remove_tree(self.build, ignore_errors=True)  # the old version now lives there
        else:
            os.chmod(self.build, stat.S_IRWXU)  # the staged files move out of it again
            self._commit_by_journal()
        self.staged.clear()

    def _commit_by_journal(self) -> None:
        require_writable(self.directory, "this filesystem cannot exchange two directories")
        tx = Transaction(self.directory)
        for target, path in self.staged.items():
            staged = tx.stage(target.name)
            if path != staged:
                os.replace(path, staged)
        tx.commit()
        if self.build is not None:
            remove_tree(self.build, ignore_errors=True)
        self.staged.clear()

    def abort(self) -> None:
        if self.build is not None:
            remove_tree(self.build, ignore_errors=True)
        for path in self.staged.values():
            path.unlink(missing_ok=True)
        self.staged.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()


def fresh_output(out: Path) -> Path:
    """A new, empty build directory beside `out` (which must not exist or be empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QkvconvError(f"{out} already exists and is not empty; choose a new --out directory")
    tmp = staged_name(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise QkvconvError(f"cannot write {out}: {e.strerror}") from None
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Make a finished build directory appear at `out`, in one rename.

    The build was made by mkdir, so it has the umask's mode; an empty directory the user made for
    `out` beforehand is replaced, and the build takes its mode and owner instead.
    """
    fsync_dir(tmp)
    if out.exists():
        keep_mode(tmp, out.stat())
        out.rmdir()  # empty, checked by fresh_output
    os.rename(tmp, out)
    fsync_dir(out.parent)


def copy_new(src: Path, dst: Path) -> None:
    """Copy a file's content into a new output directory as a new file of this user: the umask sets
    its mode, as for the files qkvconv writes there (shutil.copy2 would carry the source's mode over,
    so a 0444 source made a read-only copy and a 0644 one ignored a private umask)."""
    shutil.copyfile(src, dst)


def copy_other_files(src: Path, dst: Path, skip: set[str], skip_suffixes: tuple[str, ...] = ()) -> None:
    """Copy a checkpoint's other files (configs, tokenizer, generation config) from `src` into a new
    output directory `dst`: every file but those named in `skip` or ending in `skip_suffixes`, and
    qkvconv's own temporaries. Symlinks are followed only where they stay inside the checkpoint."""
    from qkvconv.io.sources import check_inside

    for item in src.iterdir():
        if item.name in skip or is_temporary(item) or item.name.endswith(skip_suffixes):
            continue
        check_inside(item, src)
        if item.is_file():
            copy_new(item, dst / item.name)  # follows a (checked) symlink: copies the content


@contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """Build a new directory beside `out`; it appears at `out` in one rename when the block succeeds,
    and nothing appears (the build is removed) when it fails or is interrupted."""
    tmp = fresh_output(out)
    try:
        yield tmp
        publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise QkvconvError(f"cannot write {out}: {e.strerror or e}{where}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
