"""prepare: load a source, split it deterministically, write compact uint8 arrays plus a manifest.

Images are kept as uint8 NHWC arrays end to end; normalisation statistics come from the training split
only and travel with the model, so serving preprocesses exactly like training.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import BACKBONE, DataConfig
from pipeline.core.files import atomic_dir, file_sha256, load_json, write_json
from pipeline.data import arrays, shards
from pipeline.data.sources import FILE_COLUMNS, load_raw, with_feedback

SPLITS = ("train", "val", "test")
# Labelled live inputs held out from training (data.use_feedback): the newest of each class, which evaluate
# scores next to the frozen test split. Present only when feedback was used.
FEEDBACK = "feedback"
MANIFEST = "manifest.json"
FILES = "files.csv"  # imagefolder only: every file found, its checksum, and where it went


@dataclass(frozen=True)
class Dataset:
    """Images (N, H, W, C) uint8 and integer labels (N,) indexing `classes`."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]


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
    return {s: np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *parts[s]])) for s in SPLITS}


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixels scaled to [0, 1], summed in float64 a chunk at a time so the
    figures are reproducible and memory stays flat (a float64 chunk is 8x its 16 MB of pixels)."""
    c = x.shape[-1]
    n, total, squares = 0, np.zeros(c), np.zeros(c)
    for _, part in arrays.blocks(x, 16):
        flat = part.reshape(-1, c).astype(np.float64) / 255.0
        n += len(flat)
        total += flat.sum(axis=0)
        squares += (flat * flat).sum(axis=0)
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - mean * mean, 0.0))
    return mean.round(6).tolist(), np.where(std > 0, std, 1.0).round(6).tolist()


def image_hashes(x: np.ndarray) -> list[str]:
    return [hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for _, part in arrays.blocks(x)
            for img in part]  # fmt: skip


def splits_of(manifest: dict) -> tuple[str, ...]:
    """The splits a prepared folder holds: the three, and the feedback slice when prepare used feedback."""
    return (*SPLITS, FEEDBACK) if FEEDBACK in manifest["counts"] else SPLITS


def content_hash(prepared: Path, classes: list[str], splits: tuple[str, ...] = SPLITS) -> str:
    """The data version: a digest of every array and the class list, in a fixed order. Arrays are read a
    block at a time, so hashing a large dataset does not load it."""
    h = hashlib.sha256()
    for name in splits:
        for arr in (np.load(prepared / f"{name}_x.npy", mmap_mode="r"), np.load(prepared / f"{name}_y.npy")):
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            for _, part in arrays.blocks(arr):
                h.update(part.reshape(-1).view(np.uint8))
    h.update("\n".join(classes).encode())
    return h.hexdigest()


def assign_splits(
    y: np.ndarray, fixed: np.ndarray, cfg: DataConfig, seed: int, keys: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Images a source pins to a split (official test sets, val/ and test/ folders) stay there; the rest
    is split stratified, cutting only the splits the source did not provide. Images with equal `keys`
    (content hashes) all follow the first of them, so copies in a folder never leak across splits."""
    pool = np.flatnonzero(fixed == "")
    cut = stratified_split(
        y[pool],
        0.0 if (fixed == "val").any() else cfg.val_fraction,
        0.0 if (fixed == "test").any() else cfg.test_fraction,
        seed,
    )
    where = np.empty(len(pool), dtype="<U8")
    for name, i in cut.items():
        where[i] = name
    if keys is not None:
        first: dict[str, str] = {}
        for i, row in enumerate(pool):
            where[i] = first.setdefault(keys[row], where[i])
    split_of = fixed.astype("<U8")
    split_of[pool] = where
    named = SPLITS + ((FEEDBACK,) if (fixed == FEEDBACK).any() else ())
    return {s: np.flatnonzero(split_of == s) for s in named}


def _save_rows(path: Path, x: np.ndarray, idx: np.ndarray) -> None:
    """x[idx] to a .npy file, a chunk at a time: a memory-mapped source is never loaded whole."""
    step = arrays.rows_per_chunk(x, 64)
    parts = (arrays.take(x, idx[i : i + step]) for i in range(0, len(idx), step))
    arrays.save(path, (len(idx), *x.shape[1:]), x.dtype, parts)


def _write_files_table(path: Path, files: list[dict], where: dict[int, tuple[str, int]]) -> None:
    """One row per file found, with the split and row it ended up in (index -1: not used, see error)."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FILE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in files:
            split, index = where.get(row["index"], (row["split"], -1))
            writer.writerow({**row, "split": split, "index": index})


def prepare(
    cfg: DataConfig,
    seed: int,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    feedback_root: str | Path | None = None,
) -> dict:
    """Load `cfg.source` (files under `data_root`, default `cfg.root`), with `data.use_feedback` the
    feedback shards in `feedback_root` (default `cfg.feedback`: a folder, or an s3:// prefix), split it, and
    write the arrays, the file table and the manifest into `out_dir` in one atomic step. `backbone` sizes
    are resolved first (pipeline.stages.prepare.fitted_to_backbone)."""
    if BACKBONE in (cfg.image_size, cfg.interpolation):
        raise ValueError("data.image_size / data.interpolation 'backbone' reached prepare() unresolved")
    with atomic_dir(out_dir) as tmp:
        scratch = Path(tempfile.mkdtemp(dir=tmp))
        raw = load_raw(cfg, Path(data_root or cfg.root), scratch)
        if cfg.use_feedback:
            folder = shards.open_folder(str(feedback_root or cfg.feedback), Path.cwd())
            raw = with_feedback(raw, cfg, folder, scratch)
        idx = assign_splits(raw.y, raw.fixed, cfg, seed, image_hashes(raw.x))
        for name, i in idx.items():
            _save_rows(tmp / f"{name}_x.npy", raw.x, i)
            np.save(tmp / f"{name}_y.npy", raw.y[i])
        train_x = np.load(tmp / "train_x.npy", mmap_mode="r")
        mean, std = channel_stats(train_x)
        manifest = {
            "source": cfg.source,
            "classes": raw.classes,
            "image_shape": list(raw.x.shape[1:]),
            "dtype": str(raw.x.dtype),
            "counts": {
                s: {c: int((raw.y[i] == k).sum()) for k, c in enumerate(raw.classes)} for s, i in idx.items()
            },
            "normalization": {"mean": mean, "std": std},
            "interpolation": cfg.interpolation,
            "converted_channels": raw.converted_channels,
        }
        files = raw.files
        del raw, train_x  # release the memory maps before their files go
        shutil.rmtree(scratch)
        if files:
            where = {int(row): (s, pos) for s, i in idx.items() for pos, row in enumerate(i)}
            _write_files_table(tmp / FILES, files, where)
            manifest["files"] = {"table": FILES, "sha256": file_sha256(tmp / FILES), "count": len(files)}
        manifest["data_version"] = content_hash(tmp, manifest["classes"], splits_of(manifest))
        write_json(tmp / MANIFEST, manifest)
    return manifest


def read_manifest(prepared_dir: str | Path) -> dict:
    return load_json(Path(prepared_dir) / MANIFEST)


def load_split(prepared_dir: str | Path, split: str) -> Dataset:
    d = Path(prepared_dir)
    classes = read_manifest(d)["classes"]
    # mmap: validation and evaluation read every image once; no need to copy them into memory first.
    return Dataset(np.load(d / f"{split}_x.npy", mmap_mode="r"), np.load(d / f"{split}_y.npy"), classes)
