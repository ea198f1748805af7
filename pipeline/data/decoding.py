"""Reading a folder of image files on every core: checksums and headers first, then the full decode into
one memory-mapped array, each worker writing its own rows of the file (nothing large crosses processes).

Decoding a JPEG is most of the cost of preparing photos, and it is embarrassingly parallel; the workers
are fresh processes (spawned, not forked: the parent may hold threads), so a small folder stays in this
process, where starting them would cost more than it saves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
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


def run_chunks(fn: Callable, items: Sequence, workers: int, *args) -> list:
    """`fn(chunk, *args)` over chunks of `items`, in order, on `workers` processes; results concatenated."""
    if workers <= 1:
        return [r for chunk in _chunks(items) for r in fn(chunk, *args)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, chunk, *args) for chunk in _chunks(items)]
        return [r for f in futures for r in f.result()]


def decode_rows(jobs: Sequence[tuple[int, str]], root: str, array: str, offset: int,
                shape: tuple[int, int, int], interpolation: str) -> list:  # fmt: skip
    """Decode each (row, relative path) into row `row` of the .npy file `array` (rows from byte `offset`);
    the error of each job, or None. Runs in a worker: writes its rows itself."""
    from PIL import Image

    from pipeline.data.images import to_pixels

    h, w, c = shape
    errors = []
    for row, rel in jobs:
        try:
            with Image.open(Path(root) / rel) as img:
                # a truncated file fails here, in the full decode
                arrays.write_rows(array, offset, row, to_pixels(img, h, w, c, interpolation)[None])
            errors.append(None)
        except Exception as err:  # PIL raises many types for bad bytes; all mean "unreadable"
            errors.append(f"unreadable: {type(err).__name__}: {err}")
    return errors


def compact(array: Path, offset: int, shape: tuple[int, ...], rows: list[int]) -> np.ndarray:
    """Move the decoded `rows` (ascending) of the .npy file `array` to its front, in order; those rows as a
    read-only memory map. A row is only ever moved forward, so no row is overwritten before it is read."""
    x = np.load(array, mmap_mode="r")
    if rows != list(range(len(rows))):
        step = arrays.rows_per_chunk(x, 64)
        for i in range(0, len(rows), step):
            arrays.write_rows(array, offset, i, arrays.take(x, rows[i : i + step]))
    del x
    return np.memmap(array, dtype=np.uint8, mode="r", offset=offset, shape=(len(rows), *shape))
