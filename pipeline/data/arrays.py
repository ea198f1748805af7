"""Rows of large .npy files read and written with file calls, not through memory maps.

Every page of a memory map a process touches counts as its resident memory until the map is closed: a
pass over 20,000 photos at 224x224x3 through `np.load(mmap_mode="r")` grows the process by 3 GB, and
writing through a map holds the dirty pages too (prepare peaked at 5.7 GB that way). Pages read or written
with read()/pwrite() live in the page cache only, which the kernel reclaims as it needs, so a pass costs
the block in hand. Arrays that are not whole memory maps (digits, in-memory splits) are indexed as usual.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


def rows_per_chunk(x: np.ndarray, megabytes: int = 16) -> int:
    """Images per chunk so that one chunk of `x` is about `megabytes`: counted in images, a chunk of
    224x224x3 photos would be 40 times one of MNIST digits (and 8 times more again as float64)."""
    row = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
    return max(1, (megabytes << 20) // row)


def _mapped_file(x: np.ndarray) -> bool:
    # Only the map np.load returned knows where its rows start in the file; a slice of it keeps the
    # parent's offset, so it is indexed as an array.
    return isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.flags.c_contiguous


def take(x: np.ndarray, rows: np.ndarray | range) -> np.ndarray:
    """`x[rows]` as a new array; from a whole memory map, each run of consecutive rows is one read."""
    if not _mapped_file(x):
        return np.asarray(x[np.asarray(rows)])
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *x.shape[1:]), dtype=x.dtype)
    row_bytes = out[:1].nbytes
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    if not len(rows):
        return out
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # where each run of consecutive rows begins
    with open(x.filename, "rb", buffering=0) as f:
        for first, end in zip(starts, [*starts[1:], len(rows)], strict=True):
            part = buffer[first * row_bytes : end * row_bytes]
            f.seek(x.offset + int(rows[first]) * row_bytes)
            if f.readinto(part) != len(part):
                raise OSError(f"{x.filename}: short read at row {rows[first]} (file changed while read?)")
    return out


def blocks(x: np.ndarray, megabytes: int = 64) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of `x`, about `megabytes` at a time, in order."""
    step = rows_per_chunk(x, megabytes)
    for start in range(0, len(x), step):
        yield start, take(x, range(start, min(start + step, len(x))))


def create(path: Path, shape: tuple[int, ...], dtype=np.uint8) -> int:
    """An .npy file of `shape` (sparse until written); the byte offset of its first row."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = header.offset
    del header  # nothing was written through the map: no page of it is resident
    return offset


def write_rows(path: Path | str, offset: int, first: int, rows: np.ndarray) -> None:
    """Write `rows` from row `first` on into the .npy file `create` made (any process may write its own
    rows: each write is one pwrite at its own place)."""
    data = np.ascontiguousarray(rows)
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data.reshape(-1).view(np.uint8))
        at = offset + first * data[:1].nbytes
        while view:
            written = os.pwrite(fd, view, at)
            view, at = view[written:], at + written
    finally:
        os.close(fd)


def save(path: Path, shape: tuple[int, ...], dtype, parts: Iterable[np.ndarray]) -> None:
    """An .npy file of `shape` from `parts`, rows in order, each written as it comes."""
    if shape[0] == 0:  # an empty file cannot be mapped; validation reports the empty split
        np.save(path, np.empty(shape, dtype=dtype))
        return
    offset, first = create(path, shape, dtype), 0
    for part in parts:
        write_rows(path, offset, first, part)
        first += len(part)
    if first != shape[0]:
        raise ValueError(f"{path}: {first} rows written, {shape[0]} declared")
