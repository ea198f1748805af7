"""prepare: load a source, split it deterministically, write compact uint8 arrays plus a manifest.

Images are kept as uint8 NHWC arrays end to end; normalisation statistics come from the training split
only and travel with the model, so serving preprocesses exactly like training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.io import atomic_dir, read_json, write_json

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Dataset:
    """Images (N, H, W, C) uint8 and integer labels (N,) indexing `classes`."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]


def load_digits() -> Dataset:
    from sklearn.datasets import load_digits as sk_digits  # shipped inside scikit-learn: offline

    d = sk_digits()
    # Pixels are 0..16 intensities; scale to the 0..255 range every other source uses.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Dataset(x=x, y=d.target.astype(np.int64), classes=[str(c) for c in d.target_names])


def load_source(cfg: DataConfig) -> Dataset:
    loaders = {"digits": load_digits}
    return loaders[cfg.source]()


def stratified_split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Per class, shuffle with `seed` and cut test, then val, off the front. Indices come back sorted so the
    output order depends only on the data, not on hash or dict order."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(parts[s])) for s in SPLITS}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels scaled to [0, 1], in float64 so the figures are reproducible."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = flat.std(axis=0)
    return flat.mean(axis=0).round(6).tolist(), np.where(std > 0, std, 1.0).round(6).tolist()


def image_hashes(x: np.ndarray) -> list[str]:
    return [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in x]


def content_hash(splits: dict[str, Dataset]) -> str:
    """The data version: a digest of every array and the class list, in a fixed order."""
    h = hashlib.sha256()
    for name in SPLITS:
        part = splits[name]
        for arr in (part.x, part.y):
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(splits["train"].classes).encode())
    return h.hexdigest()


def prepare(cfg: DataConfig, seed: int, out_dir: str | Path) -> dict:
    ds = load_source(cfg)
    idx = stratified_split(ds.y, cfg.val_fraction, cfg.test_fraction, seed)
    splits = {s: Dataset(ds.x[i], ds.y[i], ds.classes) for s, i in idx.items()}
    mean, std = channel_stats(splits["train"].x)
    manifest = {
        "source": cfg.source,
        "classes": ds.classes,
        "image_shape": list(ds.x.shape[1:]),
        "dtype": str(ds.x.dtype),
        "counts": {
            s: {c: int((p.y == i).sum()) for i, c in enumerate(ds.classes)} for s, p in splits.items()
        },
        "normalization": {"mean": mean, "std": std},
        "data_version": content_hash(splits),
    }
    with atomic_dir(out_dir) as tmp:
        for name, part in splits.items():
            np.save(tmp / f"{name}_x.npy", part.x)
            np.save(tmp / f"{name}_y.npy", part.y)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(prepared_dir: str | Path) -> dict:
    return read_json(Path(prepared_dir) / MANIFEST)


def load_split(prepared_dir: str | Path, split: str) -> Dataset:
    d = Path(prepared_dir)
    classes = read_manifest(d)["classes"]
    # mmap: validation and evaluation read every image once; no need to copy them into memory first.
    return Dataset(np.load(d / f"{split}_x.npy", mmap_mode="r"), np.load(d / f"{split}_y.npy"), classes)
