"""Feedback: sampled inputs that users labelled through `POST /feedback`, kept as shards of kind `feedback`
in `data.feedback` (data/feedback by default, a dependency of prepare; an `s3://` prefix that every replica
shares in team mode), for prepare to add as a new data version.

Each answer writes one small shard before the server says 201 (nothing is lost to a crash), and once there
are more than `COMPACT_AT` small ones they are merged into one: many small files are what DVC hashes
slowest. An input labelled again gets a newer row; readers take the newest row of each (request, item), so
concurrent relabels, retries and replicas never leave one input with two labels.
"""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np

from pipeline.data import shards

COMPACT_AT = 64  # small shards before they are merged
FULL_BYTES = 8 * 2**20  # a merged shard this large is left as it is
_seq = itertools.count(1)
_compacting = threading.Lock()  # one merge at a time in a process (replicas' merges only duplicate rows)


def save_feedback(folder: shards.Folder, label: str, request: str, item: int, x: np.ndarray) -> str:
    """Store the labelled input as a shard of its own (then merge small shards when there are many);
    returns the shard's name."""
    now = time.time()
    name = shards.shard_name(shards.FEEDBACK, now, next(_seq))
    row = {
        "x": np.clip(np.round(x), 0, 255).astype(np.uint8)[None],
        "label": np.array([label]),
        "request": np.array([request]),
        "item": np.array([item], dtype=np.int32),
        "time": np.array([now]),
    }
    shards.write_shard(folder, name, row)
    compact(folder)
    return name


def _newest_per_input(rows: dict) -> dict:
    """One row per (request, item): the newest (a relabel replaces the label)."""
    if not rows:
        return rows
    order = np.lexsort((rows["time"], rows["item"], rows["request"]))
    rows = {k: v[order] for k, v in rows.items()}
    last = np.ones(len(rows["time"]), dtype=bool)
    same = (rows["request"][1:] == rows["request"][:-1]) & (rows["item"][1:] == rows["item"][:-1])
    last[:-1] = ~same
    rows = {k: v[last] for k, v in rows.items()}
    return {k: v[np.argsort(rows["time"], kind="stable")] for k, v in rows.items()}


def compact(folder: shards.Folder, at: int = COMPACT_AT) -> int:
    """Merge the feedback shards smaller than FULL_BYTES into one when there are more than `at`; returns
    how many were merged. Rows already merged elsewhere (another replica, a kill between write and delete)
    only duplicate, and readers keep the newest of each input."""
    with _compacting:
        sizes = folder.names()
        small = [n for n in shards.shard_names(folder, shards.FEEDBACK, sizes) if sizes[n] < FULL_BYTES]
        if len(small) <= at:
            return 0
        groups: dict[tuple, list] = {}  # inputs of one shape together (a new champion may take others)
        merged_names = []
        for name in small:
            try:
                part = shards.read_shard(folder, name)
            except (FileNotFoundError, shards.DamagedShard):  # gone, or left for validation to name
                continue
            groups.setdefault(part["x"].shape[1:], []).append(part)
            merged_names.append(name)
        for parts in groups.values():
            merged = _newest_per_input(shards.concat(parts))
            first = float(merged["time"].min())
            shards.write_shard(folder, shards.shard_name(shards.FEEDBACK, first, next(_seq)), merged)
        for name in merged_names:
            folder.delete(name)
        return len(merged_names)


def feedback_rows(folder: shards.Folder, reading: shards.Reading | None = None) -> dict:
    """Every labelled input, the newest label of each, oldest first. A shard merged away while it was
    being read (its rows are in the merged one, written first) means reading the folder again."""
    for _ in range(5):
        attempt = shards.Reading()
        rows = shards.read_latest(folder, shards.FEEDBACK, reading=attempt)
        if not attempt.vanished:
            break
    if reading is not None:
        reading.damaged += attempt.damaged
    return _newest_per_input(rows)


def feedback_labels(folder: shards.Folder) -> dict[tuple[str, int], str]:
    """(request, item) -> label of every labelled input."""
    rows = feedback_rows(folder)
    if not rows:
        return {}
    return {
        (str(r), int(i)): str(lab)
        for r, i, lab in zip(rows["request"], rows["item"], rows["label"], strict=True)
    }


def folder_mb(folder: shards.Folder) -> float:
    """What the feedback shards hold, in MB (the server's bound, `monitor.feedback_max_mb`)."""
    sizes = folder.names()
    return sum(sizes[n] for n in shards.shard_names(folder, shards.FEEDBACK, sizes)) / 1e6
