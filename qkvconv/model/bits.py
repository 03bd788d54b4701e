"""A tensor's bits in numpy, without torch: NaN/inf and the row and column checksums of the check.

Conversions that only move bytes (io/bytepath.py) read every source byte once, in chunks, for the NaN/inf
check; the same chunks give the checksums the default check compares (ops/bitcheck.py), so neither
needs torch (whose import alone costs more than half of copying a 1B checkpoint).

- Finite: a float is NaN or inf iff its exponent bits are all ones; on an unsigned view of the same size,
  iff (bits & ~sign) >= the exponent mask. Checked in slices small enough to stay in the CPU's cache.
- Checksums (`Fingerprint`): exactly check.fingerprint's, from the bytes: the tensor as (rows, rest),
  each row's bits read as 8-byte integers where a row holds a whole number of them, else as integers of
  the element's size, widened to int64; the sums of each row and of each column (int64, wrapping as
  torch's sums wrap). A 1-D tensor is one row.
"""

from __future__ import annotations

from math import prod

import numpy as np

# float dtype (torch's name) -> (unsigned view, exponent mask, every bit but the sign)
FLOAT_BITS: dict[str, tuple[type, int, int]] = {
    "bfloat16": (np.uint16, 0x7F80, 0x7FFF),
    "float16": (np.uint16, 0x7C00, 0x7FFF),
    "float32": (np.uint32, 0x7F800000, 0x7FFFFFFF),
    "float64": (np.uint64, 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
}
_SLICE = 256 * 1024  # elements per step: the masked copy stays in cache
_INTEGER = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # check.py's _INTEGER, in numpy


def scannable(dtype: str, is_floating_point: bool) -> bool:
    """Whether nonfinite_count can tell this dtype's NaN/inf (every non-float has none)."""
    return not is_floating_point or dtype in FLOAT_BITS


def nonfinite_count(data: np.ndarray, dtype: str) -> int:
    """How many NaN/inf the bytes `data` (uint8, a whole number of elements) hold as `dtype` values; 0
    for a dtype that is not a float of FLOAT_BITS (the caller checks scannable first)."""
    if dtype not in FLOAT_BITS:
        return 0
    view, exponent, magnitude = FLOAT_BITS[dtype]
    values = data.view(view)
    scratch = np.empty(min(_SLICE, values.size), dtype=view)
    bad = 0
    for start in range(0, values.size, _SLICE):
        part = values[start:start + _SLICE]
        masked = scratch[:part.size]
        np.bitwise_and(part, view(magnitude), out=masked)
        if masked.max() >= exponent:
            bad += int(np.count_nonzero(masked >= exponent))
    return bad


class Fingerprint:
    """check.fingerprint of a tensor of `shape` whose bytes arrive in order, in chunks (`add`) that end on
    a row boundary, or, for a tensor that is one row (1-D), on a multiple of 8 bytes."""

    def __init__(self, shape: tuple[int, ...], itemsize: int) -> None:
        self.shape = tuple(shape)
        self.rows = shape[0] if len(shape) > 1 else 1
        self.row_bytes = prod(shape[1:]) * itemsize if len(shape) > 1 else prod(shape) * itemsize
        self.itemsize = itemsize
        self.words = self.row_bytes % 8 == 0 and self.row_bytes > 0
        self._row_sums: list[np.ndarray] = []
        self._columns: np.ndarray | None = None
        self._one_row = len(shape) <= 1

    def _ints(self, data: np.ndarray) -> np.ndarray:
        return data.view(np.int64) if self.words else data.view(_INTEGER[self.itemsize]).astype(np.int64)

    def add(self, data: np.ndarray) -> None:
        """The next bytes (uint8) of the tensor."""
        if self._one_row:  # the columns are the elements, kept in order (a 1-D tensor is small)
            self._row_sums.append(self._ints(data).copy())
            return
        ints = self._ints(data).reshape(-1, (self.row_bytes // 8) if self.words else self.row_bytes // self.itemsize)
        self._row_sums.append(ints.sum(axis=1, dtype=np.int64))
        columns = ints.sum(axis=0, dtype=np.int64)
        if self._columns is None:
            self._columns = columns
        else:
            self._columns += columns

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(row sums, column sums) as check.fingerprint gives them."""
        if self._one_row:
            columns = np.concatenate(self._row_sums) if self._row_sums else np.zeros(0, dtype=np.int64)
            return np.array([columns.sum(dtype=np.int64)], dtype=np.int64), columns
        rows = np.concatenate(self._row_sums) if self._row_sums else np.zeros(0, dtype=np.int64)
        width = (self.row_bytes // 8) if self.words else self.row_bytes // max(self.itemsize, 1)
        columns = self._columns if self._columns is not None else np.zeros(width, dtype=np.int64)
        return rows, columns
