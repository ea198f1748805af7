"""Live traffic on disk: what a server sampled (`monitor.folder`, default data/live) and the feedback
images users labelled (`data.feedback`, default data/feedback).

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

from pipeline.files import write_arrays, write_bytes

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


def feedback_name(request: str, item: int) -> str:
    """`<ms now>-<request>-<item>.png`: the time first, so prepare can take the newest for its slice."""
    return f"{int(time.time() * 1000):013d}-{request}-{item}.png"


def save_feedback(folder: Path, label: str, request: str, item: int, x: np.ndarray) -> Path:
    """The sampled input as a PNG under `<folder>/<label>/`; an earlier label of the same input is
    replaced, so correcting a label leaves one file."""
    import io

    from PIL import Image

    own = f"{request}-{item}.png"
    for old in folder.glob(f"*/*-{own}"):
        if old.name.partition("-")[2] == own:  # not request "x-<request>"'s
            old.unlink(missing_ok=True)
    pixels = np.clip(np.round(x), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = folder / label / feedback_name(request, item)
    write_bytes(path, buf.getvalue())
    return path


def feedback_labels(folder: Path) -> dict[tuple[str, int], str]:
    """(request, item) -> label of every feedback image under `folder`."""
    out = {}
    for path in folder.glob("*/*.png") if folder.is_dir() else []:
        _, _, rest = path.stem.partition("-")
        request, _, item = rest.rpartition("-")
        if request and item.isdigit():
            out[(request, int(item))] = path.parent.name
    return out


def shadow_summary(folder: Path, feedback: Path, challenger: str | None = None) -> dict:
    """How the challenger (the newest one in shadow, or version `challenger`) did beside the champion on
    live traffic: images, errors, agreement, confidences, its latency, and accuracy of both on the images
    users labelled through POST /feedback."""
    rows = read_latest(folder, SHADOW)
    if not rows:
        return {"challenger": challenger, "images": 0}
    challenger = challenger or str(rows["challenger"][-1])
    keep = rows["challenger"] == challenger
    rows = {k: v[keep] for k, v in rows.items()}
    n = len(rows["time"])
    if n == 0:
        return {"challenger": challenger, "images": 0}
    ok = ~rows["error"]
    agree = rows["pred"][ok] == rows["challenger_pred"][ok]
    labels = feedback_labels(feedback)
    truth = np.array(
        [labels.get((r, int(i)), "") for r, i in zip(rows["request"], rows["item"], strict=True)]
    )
    labelled = (truth != "") & ok
    latency = rows["latency_ms"]
    return {
        "challenger": challenger,
        "champions": sorted(set(rows["version"].tolist())),
        "images": n,
        "errors": int((~ok).sum()),
        "agreement": float(agree.mean()) if agree.size else None,
        "disagreement": float(1 - agree.mean()) if agree.size else None,
        "confidence": {
            "champion": float(rows["confidence"][ok].mean()) if ok.any() else None,
            "challenger": float(rows["challenger_confidence"][ok].mean()) if ok.any() else None,
        },
        "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
        "labelled": int(labelled.sum()),
        "accuracy": {
            "champion": float((rows["pred"][labelled] == truth[labelled]).mean()) if labelled.any() else None,
            "challenger": float((rows["challenger_pred"][labelled] == truth[labelled]).mean())
            if labelled.any()
            else None,
        },
    }
