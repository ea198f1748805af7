"""Rows of .npy files by file calls: the same values as indexing, without the mapped pages' memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import arrays


def _mapped_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_take_and_blocks_give_what_indexing_gives(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    for rows in (range(50), [3, 4, 5, 9, 0, 1, 49], [7], []):
        assert np.array_equal(arrays.take(mapped, rows), x[list(rows)])
    assert np.array_equal(arrays.take(mapped[10:], [0, 1, 5]), x[10:][[0, 1, 5]])  # a slice is indexed
    assert np.array_equal(np.concatenate([p for _, p in arrays.blocks(mapped, megabytes=0)]), x)
    arrays.save(tmp_path / "y.npy", x.shape, x.dtype, (p for _, p in arrays.blocks(mapped, 0)))
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)
    with pytest.raises(ValueError, match="49 rows written, 50 declared"):
        arrays.save(tmp_path / "z.npy", x.shape, x.dtype, [x[:49]])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
def test_a_pass_over_a_file_does_not_keep_its_pages_resident(tmp_path):
    path = tmp_path / "big.npy"
    shape = (64, 512, 512, 4)  # 64 MB
    offset = arrays.create(path, shape)
    for i in range(shape[0]):
        arrays.write_rows(path, offset, i, np.full((1, *shape[1:]), i, dtype=np.uint8))
    mapped = np.load(path, mmap_mode="r")
    total = sum(int(part[:, 0, 0, 0].sum()) for _, part in arrays.blocks(mapped, 8))
    assert total == sum(range(64)) and _mapped_kb(path) < 1024  # read, not faulted in
    assert int(np.asarray(mapped).sum(dtype=np.int64)) == sum(range(64)) * 512 * 512 * 4
    assert _mapped_kb(path) > 60_000  # the same pass through the map keeps all 64 MB resident
