"""Live traffic on disk: what a server sampled, as shards in `monitor.folder` (default data/live).

A shard is one .npz (numpy arrays, no pickles) named `<kind>-<ms of its first sample>-<pid>-<seq>.npz`,
so sorting by name sorts by time across servers. Kinds and their columns, one row per image:
- samples: x (the model input exactly as the model saw it: uint8 when every value is a whole 0..255 number,
  else float32), pred (class index), confidence, embedding (penultimate layer, float16), version,
  request (id), item (position in the request), time (Unix seconds);
- shadow: request, item, time, version, challenger (its version), pred and challenger_pred (class names),
  confidence, challenger_confidence, latency_ms (challenger's forward pass), error (it raised).
Nothing else of a request is kept: no headers, no client address, no raw body.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from pipeline.core.files import write_arrays

SAMPLES = "samples"
SHADOW = "shadow"
# Request ids name files: a client-chosen X-Request-ID must be safe as a file name part.
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def shard_path(folder: Path, kind: str, first: float, seq: int) -> Path:
    return folder / f"{kind}-{int(first * 1000):013d}-{os.getpid()}-{seq:06d}.npz"


def write_shard(path: Path, columns: dict[str, np.ndarray]) -> None:
    write_arrays(path, columns)


def shards(folder: Path, kind: str) -> list[Path]:
    return sorted(folder.glob(f"{kind}-*.npz")) if folder.is_dir() else []


def read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_latest(folder: Path, kind: str, n: int | None = None, version: str | None = None) -> dict:
    """The newest `n` rows of a kind (all when None), of one served version when given, oldest first.
    Reads shards from the newest back, so a long history costs only what the window needs."""
    parts, have = [], 0
    for path in reversed(shards(folder, kind)):
        try:
            part = read_shard(path)
        except (OSError, ValueError):  # deleted by retention meanwhile, or foreign
            continue
        if version is not None:
            keep = part["version"] == version
            part = {k: v[keep] for k, v in part.items()}
        parts.append(part)
        have += len(part["time"])
        if n is not None and have >= n:
            break
    rows = _concat(parts[::-1])
    if rows:
        order = np.argsort(rows["time"], kind="stable")
        rows = {k: v[order][-n:] if n is not None else v[order] for k, v in rows.items()}
    return rows


def enforce_retention(folder: Path, max_bytes: float, max_age_s: float, now: float | None = None) -> int:
    """Delete shards older than `max_age_s`, then the oldest until the folder holds at most `max_bytes`;
    returns how many went."""
    now = time.time() if now is None else now
    files = sorted(folder.glob("*.npz"), key=lambda p: p.name.split("-")[1])
    sizes = {p: p.stat().st_size for p in files if p.exists()}
    total, gone = sum(sizes.values()), 0
    for path in files:
        too_old = now - int(path.name.split("-")[1]) / 1000 > max_age_s
        if not (too_old or total > max_bytes):
            continue
        path.unlink(missing_ok=True)
        total -= sizes.get(path, 0)
        gone += 1
    return gone


def model_input(x: np.ndarray) -> np.ndarray:
    """The input compactly and exactly: uint8 when that loses nothing, else float32."""
    if x.dtype == np.uint8:
        return x
    if np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
        return x.astype(np.uint8)
    return x.astype(np.float32)
