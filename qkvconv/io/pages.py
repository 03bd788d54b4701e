"""Give the pages of an mmapped checkpoint back to the OS once they have been used.

torch.load(mmap=True) maps a whole checkpoint file privately; every tensor read stays resident
until the mapping goes away, so walking a 13 GB model would end with 13 GB resident. Dropping the
mapping's pages (MADV_DONTNEED) after each layer keeps the resident set at about one layer: the
pages are clean copies of the file (qkvconv never writes into loaded tensors), so a later access
simply reads them again. Linux only; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _mappings_of(path: Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset of start) of every private mapping of `path` in this process
    (from /proc/self/maps)."""
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
    """The private, read-only mappings of one checkpoint file in this process."""

    def __init__(self, path: Path) -> None:
        self.ranges = _mappings_of(path) if _libc is not None else []

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
