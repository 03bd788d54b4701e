"""Give the pages of an mmapped checkpoint back to the OS once they have been used.

torch.load(mmap=True) maps a whole checkpoint file privately; every tensor read stays resident
until the mapping goes away, so walking a 13 GB model would end with 13 GB resident. Dropping the
mapping's pages (MADV_DONTNEED) after each layer keeps the resident set at about one layer: the
pages are clean copies of the file (qkvconv never writes into loaded tensors), so a later access
simply reads them again. Linux only; elsewhere this is a no-op.

Only the mapping that holds the owner's own tensors is ever dropped. /proc/self/maps lists every
mapping of a file, including those of other objects that loaded the same file (`verify DIR DIR` maps
it twice); once such an object is freed, its address range goes back to the allocator, and
MADV_DONTNEED there would zero whatever lives in it next: a tensor allocated into that range read
back 85% zeros after another owner's release(), and glibc then aborted in free(). Numbers that depend
on where the allocator happened to put them differ from run to run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Iterable
from pathlib import Path

MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _mappings_of(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset of start) of every private mapping of `path` in this process
    (from /proc/self/maps): this owner's, and those of anyone else who mapped the same file."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target and parts[1].startswith("r") and parts[1][3] == "p":
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end, int(parts[2], 16)))
    except OSError:
        return []
    return ranges


class MappedFile:
    """The private, read-only mapping of one checkpoint file that holds one owner's tensors."""

    def __init__(self, path: Path, addresses: Iterable[int]) -> None:
        """`addresses`: where the owner's tensors lie (their data_ptr()); mappings of the same file
        made by others are left out, as they may be unmapped and their addresses reused before this
        owner's release()."""
        found = _mappings_of(path) if _libc is not None else []
        owned = set(addresses)
        self.ranges = [(start, end, offset) for start, end, offset in found
                       if any(start <= address < end for address in owned)]

    def file_offset(self, address: int, length: int) -> int | None:
        """Where the `length` bytes mapped at `address` lie in the file, or None if not mapped here."""
        for start, end, offset in self.ranges:
            if start <= address and address + length <= end:
                return offset + address - start
        return None

    def release(self) -> None:
        """Drop every resident page of the file's mappings (they are re-read on the next access)."""
        assert mmap.PAGESIZE > 0
        for start, end, _ in self.ranges:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)  # type: ignore[union-attr]

    def release_range(self, address: int, length: int) -> None:
        """Drop the resident pages of one tensor's bytes (page-aligned outward, within the mapping)."""
        page = mmap.PAGESIZE
        for start, end, _ in self.ranges:
            lo, hi = max(start, address - address % page), min(end, address + length)
            if lo < hi:
                _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)  # type: ignore[union-attr]
