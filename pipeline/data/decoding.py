"""Reading a folder of image files on every core: checksums, headers and the full decode into one .npy
file, each worker writing its own rows of it (nothing large crosses processes).

Decoding a JPEG is most of the cost of preparing photos, and it is embarrassingly parallel; the workers
are fresh processes (spawned, not forked: the parent may hold threads), so a small folder stays in this
process, where starting them would cost more than it saves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipeline.data import arrays

PARALLEL_FROM = 512  # files; below this, worker start-up (~1 s each) outweighs what they save
CHUNK = 64  # files per task: enough to amortise the round trip, small enough to balance the cores


def workers_for(setting: int, n_files: int) -> int:
    """Processes to decode with: `data.decode_workers`, 0 meaning one per core; 1 below PARALLEL_FROM."""
    if n_files < PARALLEL_FROM:
        return 1
    return setting or os.cpu_count() or 1


def _chunks(items: Sequence, size: int = CHUNK) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@contextmanager
def chunk_runner(workers: int) -> Iterator[Callable[..., list]]:
    """`run(fn, items, *args)`: `fn(chunk, *args)` over chunks of `items`, in order, results concatenated;
    on `workers` processes, started once for every call inside the block."""
    if workers <= 1:
        yield lambda fn, items, *args: [r for chunk in _chunks(items) for r in fn(chunk, *args)]
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:

        def run(fn: Callable, items: Sequence, *args) -> list:
            futures = [pool.submit(fn, chunk, *args) for chunk in _chunks(items)]
            return [r for f in futures for r in f.result()]

        yield run


@dataclass(frozen=True)
class Target:
    """Where decoded images go: rows of the .npy file `array` (from byte `offset`), each `shape`."""

    array: str
    offset: int
    shape: tuple[int, int, int]
    interpolation: str

    @classmethod
    def create(cls, array: Path, rows: int, shape: tuple[int, int, int], interpolation: str) -> Target:
        return cls(str(array), arrays.create(array, (max(rows, 1), *shape)), shape, interpolation)

    def write(self, row: int, img) -> None:
        """Decode the PIL image `img` into row `row` (any process may write its own rows)."""
        from pipeline.data.images import to_pixels

        arrays.write_rows(self.array, self.offset, row, to_pixels(img, *self.shape, self.interpolation)[None])


def unreadable(err: Exception) -> str:
    return f"unreadable: {type(err).__name__}: {err}"


def decode_rows(jobs: Sequence[tuple[int, str]], root: str, target: Target) -> list:
    """Decode each (row, relative path) into row `row` of `target`; the error of each job, or None."""
    from PIL import Image

    errors = []
    for row, rel in jobs:
        try:
            with Image.open(Path(root) / rel) as img:
                target.write(row, img)  # a truncated file fails here, in the full decode
            errors.append(None)
        except Exception as err:  # PIL raises many types for bad bytes; all mean "unreadable"
            errors.append(unreadable(err))
    return errors


def compact(target: Target, rows: list[int]) -> np.ndarray:
    """Move the decoded `rows` (ascending) of `target` to its front, in order; those rows as a read-only
    memory map. A row is only ever moved forward, so no row is overwritten before it is read."""
    x = np.load(target.array, mmap_mode="r")
    if rows != list(range(len(rows))):
        step = arrays.rows_per_chunk(x, 64)
        for i in range(0, len(rows), step):
            arrays.write_rows(target.array, target.offset, i, arrays.take(x, rows[i : i + step]))
    del x
    return np.memmap(
        target.array, dtype=np.uint8, mode="r", offset=target.offset, shape=(len(rows), *target.shape)
    )
