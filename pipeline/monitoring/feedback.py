"""Feedback images: sampled inputs that users labelled through `POST /feedback`, stored under
`data.feedback` (default data/feedback) in ImageFolder layout, `<label>/<ms>-<request>-<item>.png`, for
prepare to add as a new data version.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.files import write_bytes


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
