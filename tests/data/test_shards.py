"""Live-traffic shards on real files: the size and age bounds hold whatever else lies in the folder, a
damaged shard is skipped and named, and a champion with other inputs never breaks the readers."""

from __future__ import annotations

import time

import numpy as np

from pipeline.data import shards


def _samples(n: int, side: int, version: str, t: float) -> dict:
    return {
        "x": np.zeros((n, side, side, 1), dtype=np.uint8),
        "pred": np.zeros(n, dtype=np.int16),
        "confidence": np.ones(n, dtype=np.float32),
        "embedding": np.zeros((n, 4), dtype=np.float16),
        "version": np.full(n, version),
        "request": np.array([f"r{i}" for i in range(n)]),
        "item": np.zeros(n, dtype=np.int32),
        "time": np.full(n, t),
    }


def test_retention_bounds_the_shards_and_leaves_other_files_alone(tmp_path):
    folder = shards.LocalFolder(tmp_path)
    (tmp_path / "reference.npz").write_bytes(b"x" * 50_000)  # a stray copy: not a shard
    (tmp_path / "samples-notes.npz").write_bytes(b"y")  # named almost like one
    now = time.time()
    for seq in range(10):
        shards.write_shard(
            folder, shards.shard_name(shards.SAMPLES, now - 10 + seq, seq), _samples(200, 8, "1", now)
        )
    size = sum(folder.names()[n] for n in shards.shard_names(folder, shards.SAMPLES))
    gone = shards.enforce_retention(folder, size / 2, 3600, now)
    left = shards.shard_names(folder, shards.SAMPLES)
    assert (
        gone == 5
        and len(left) == 5
        and left[0].split("-")[1] == shards.shard_names(folder, shards.SAMPLES)[0].split("-")[1]
    )
    assert (tmp_path / "reference.npz").is_file() and (tmp_path / "samples-notes.npz").is_file()
    assert shards.enforce_retention(folder, 1e12, 1.0, now + 100) == 5  # all older than a second by then


def test_a_damaged_shard_is_skipped_and_named(tmp_path):
    folder = shards.LocalFolder(tmp_path)
    now = time.time()
    good = shards.shard_name(shards.SAMPLES, now, 1)
    shards.write_shard(folder, good, _samples(3, 8, "1", now))
    truncated, empty = (
        shards.shard_name(shards.SAMPLES, now + 1, 2),
        shards.shard_name(shards.SAMPLES, now + 2, 3),
    )
    (tmp_path / truncated).write_bytes((tmp_path / good).read_bytes()[:60])
    (tmp_path / empty).write_bytes(b"")
    reading = shards.Reading()
    rows = shards.read_latest(folder, shards.SAMPLES, reading=reading)
    assert len(rows["time"]) == 3
    assert {d.split(": ")[0].rsplit("/", 1)[1] for d in reading.damaged} == {truncated, empty}


def test_a_champion_with_other_inputs_reads_its_own_rows(tmp_path):
    folder = shards.LocalFolder(tmp_path)
    now = time.time()
    shards.write_shard(folder, shards.shard_name(shards.SAMPLES, now, 1), _samples(5, 8, "1", now))
    shards.write_shard(folder, shards.shard_name(shards.SAMPLES, now + 1, 2), _samples(4, 16, "2", now + 1))
    newest = shards.read_latest(folder, shards.SAMPLES, 500, version="2")
    assert newest["x"].shape == (4, 16, 16, 1)
    older = shards.read_latest(folder, shards.SAMPLES, 500, version="1")
    assert older["x"].shape == (5, 8, 8, 1)
    assert shards.read_latest(folder, shards.SAMPLES)["x"].shape[1:] == (16, 16, 1)  # the newest shapes
