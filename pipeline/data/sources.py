"""Where images come from: the embedded digits, torchvision's datasets, or the user's own folder.

Every loader returns a `Raw`: uint8 NHWC images, labels, classes, the split each image is pinned to by its
source ("" = free for prepare to split), and for folders one record per file, kept even for the files that
could not be used, so validation can name them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.config import DataConfig
from pipeline.core.files import file_sha256
from pipeline.data import arrays, decoding
from pipeline.data.images import channel_count, to_pixels

# What torchvision's ImageFolder accepts, minus formats that carry no pixels we could train on.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = ("train", "val", "test")
FILE_COLUMNS = ("path", "class", "split", "index", "kind", "error", "width", "height", "channels", "sha256")


class SourceError(RuntimeError):
    """The source cannot be read at all (missing files, no classes); the message says what to do."""


@dataclass
class Raw:
    x: np.ndarray  # (N, H, W, C) uint8, possibly a memory map
    y: np.ndarray  # (N,) int64 indexes into classes
    classes: list[str]
    fixed: np.ndarray  # (N,) split name the source pins an image to, "" when prepare may choose
    files: list[dict] = field(default_factory=list)  # FILE_COLUMNS; rows with index >= 0 are x[index]
    converted_channels: bool = False  # True when images were converted to data.channels on purpose


def load_digits() -> Raw:
    from sklearn.datasets import load_digits as sk_digits  # shipped inside scikit-learn: offline

    d = sk_digits()
    # Pixels are 0..16 intensities; scale to the 0..255 range every other source uses.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Raw(x, d.target.astype(np.int64), [str(c) for c in d.target_names], np.full(len(x), ""))


TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _unpack(cls, root: Path) -> None:
    """Unpack archives already on disk (a copied-in or half-finished download): local work, no network.
    torchvision only unpacks as part of a download, and checks the archive's checksum first, which a
    re-compressed copy of the same files fails."""
    if hasattr(cls, "resources"):  # MNIST family: one gzip per array in <root>/<Class>/raw
        pairs = [(root / cls.__name__ / "raw" / name, root / cls.__name__ / "raw" / name[:-3])
                 for name, _ in cls.resources]  # fmt: skip
    else:  # CIFAR: one tarball in root
        pairs = [(root / cls.filename, root / cls.base_folder)]
    for archive, target in pairs:
        if archive.is_file() and not target.exists():
            extract(archive, target.parent)


def extract(archive: Path, into: Path) -> None:
    """Unpack a .tar(.gz) or a single-file .gz into `into`. Tar members go through the standard library's
    "data" filter: an absolute path, a `..` escape, a link pointing outside or a device file is refused
    instead of being written outside the data folder."""
    import gzip
    import tarfile

    from pipeline.core.files import write_bytes

    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(into, filter="data")
            except tarfile.FilterError as err:
                raise SourceError(f"{archive} is unsafe to unpack; refused: {err}") from None
    elif archive.suffix == ".gz":
        with gzip.open(archive) as f:
            write_bytes(into / archive.name[:-3], f.read())
    else:
        raise SourceError(f"{archive}: cannot unpack (expected .tar, .tar.gz or .gz)")


def load_torchvision(cfg: DataConfig, root: Path) -> Raw:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[cfg.source])
    _unpack(cls, root)
    try:
        parts = [cls(str(root), train=t, download=cfg.download) for t in (True, False)]
    except RuntimeError as err:
        raise SourceError(
            f"{cfg.source} not found under {root}: {err}. Put the original files where torchvision "
            f"looks for them (e.g. {root}/{cls.__name__}/raw/ for the MNIST family) "
            "or set data.download: true"
        ) from None
    xs = [np.asarray(p.data, dtype=np.uint8) for p in parts]
    xs = [x[..., None] if x.ndim == 3 else x for x in xs]  # MNIST is (N, 28, 28): add the channel axis
    x = np.concatenate(xs)
    if cfg.image_size is not None or cfg.channels:
        x = _convert_array(x, cfg)
    y = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    # The official test set stays the test set, so figures compare with published ones.
    fixed = np.concatenate([np.full(len(xs[0]), ""), np.full(len(xs[1]), "test")])
    return Raw(x, y, list(parts[0].classes), fixed, converted_channels=bool(cfg.channels))


def _convert_array(x: np.ndarray, cfg: DataConfig) -> np.ndarray:
    from PIL import Image

    h, w = cfg.image_size or x.shape[1:3]
    c = cfg.channels or x.shape[3]
    out = np.empty((len(x), h, w, c), dtype=np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out[i] = to_pixels(pil, h, w, c, cfg.interpolation)
    return out


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_dirs(root: Path) -> tuple[list[str], list[tuple[str, Path]]]:
    """Classes and (split, folder) pairs: `root/<class>/` or, when present, `root/<split>/<class>/`.
    A layout that could mean either is refused: guessing would train on the wrong labels."""
    splits = [s for s in SPLIT_DIRS if (root / s).is_dir()]
    if splits:
        beside = [p.name for p in _visible(root) if p.is_dir() and p.name not in SPLIT_DIRS]
        if beside:
            raise SourceError(
                f"ambiguous layout in {root}: split folders ({', '.join(splits)}) and class folders "
                f"({', '.join(beside[:5])}) side by side. Put every class inside the split folders "
                f"({root}/train/<class>/...), or rename a class folder called {' or '.join(splits)}: "
                f"folders named {', '.join(SPLIT_DIRS)} are taken for splits"
            )
        for split in splits:
            loose = [p.name for p in _visible(root / split) if p.is_file()]
            if loose:
                raise SourceError(
                    f"ambiguous layout: {root / split} holds files directly ({', '.join(loose[:3])}). "
                    f"Folders named {', '.join(SPLIT_DIRS)} are taken for splits holding class folders; "
                    f"if {split} is a class, rename its folder"
                )
    folders = [(s, root / s) for s in splits] if splits else [("", root)]
    classes = sorted({d.name for _, f in folders for d in _visible(f) if d.is_dir()})
    return classes, [(s, f / c) for s, f in folders for c in classes]


def _walk(folder: Path) -> Iterator[Path]:
    if not folder.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):  # .DS_Store and friends are not data
                yield Path(dirpath, name)


def load_imagefolder(cfg: DataConfig, root: Path, scratch: Path) -> Raw:
    """Decode every image once, on every core, straight into an .npy file in `scratch` (returned as a
    memory map nothing has read yet), so memory stays flat however large the folder is."""
    if not root.is_dir():
        raise SourceError(f"data.root {root} is not a folder of class sub-folders")
    classes, folders = _class_dirs(root)
    if not classes:
        raise SourceError(f"no class sub-folders in {root} (expected {root}/<class>/<image files>)")
    paths = [(split, c_dir.name, str(p)) for split, c_dir in folders for p in _walk(c_dir)]
    found = [(i, *where) for i, where in enumerate(paths)]
    with decoding.chunk_runner(decoding.workers_for(cfg.decode_workers, len(found))) as run:
        if cfg.channels:
            files, target, rows = _decode_in_one_pass(run, cfg, found, root, scratch)
        else:
            files, target, rows = _decode_in_two_passes(run, cfg, found, root, scratch)
    for index, i in enumerate(rows):
        files[i]["index"] = index
    x = decoding.compact(target, list(rows.values()))
    ok = [r for r in files if r["index"] >= 0]
    y = np.array([classes.index(r["class"]) for r in ok], dtype=np.int64)
    # train/ is a pool prepare splits val from; val/ and test/ folders pin their images.
    fixed = np.array([r["split"] if r["split"] != "train" else "" for r in ok], dtype="<U5")
    return Raw(x, y, classes, fixed, files, converted_channels=bool(cfg.channels))


def _decode_in_one_pass(run, cfg: DataConfig, found: list, root: Path, scratch: Path):
    """data.channels fixes the output shape: each file is checksummed, described and decoded by one task.
    (file rows, target, {file row: target row} for the decoded files)."""
    target = decoding.Target.create(scratch / "decoded.npy", len(found), (*cfg.image_size, cfg.channels),
                                    cfg.interpolation)  # fmt: skip
    files = run(_describe_files, found, str(root), target)
    return files, target, {i: i for i, r in enumerate(files) if r["error"] is None}


def _decode_in_two_passes(run, cfg: DataConfig, found: list, root: Path, scratch: Path):
    """Channels as found: the files' headers decide them (the majority), then the readable files decode."""
    files = run(_describe_files, found, str(root))
    channels = _majority([r["channels"] for r in files if r["channels"]], default=3)
    readable = [i for i, r in enumerate(files) if r["error"] is None]
    target = decoding.Target.create(scratch / "decoded.npy", len(readable), (*cfg.image_size, channels),
                                    cfg.interpolation)  # fmt: skip
    jobs = [(row, files[i]["path"]) for row, i in enumerate(readable)]
    rows = {}
    for (row, _), i, error in zip(
        jobs, readable, run(decoding.decode_rows, jobs, str(root), target), strict=True
    ):
        if error is None:
            rows[i] = row
        else:
            files[i]["error"] = error
    return files, target, rows


def _describe_files(
    found: list[tuple[int, str, str, str]], root: str, target: decoding.Target | None = None
) -> list[dict]:
    """File rows of (row, split, class, path): a worker's share (see pipeline.data.decoding); with a
    `target`, each readable image is decoded into its row too."""
    return [_describe_file(Path(root), split, label, Path(path), target and (row, target))
            for row, split, label, path in found]  # fmt: skip


def _describe_file(root: Path, split: str, label: str, path: Path, decode_to: tuple | None) -> dict:
    """Checksum and header facts of one file, and with `decode_to` (row, target) its pixels."""
    from PIL import Image

    row = dict.fromkeys(FILE_COLUMNS)
    row.update({"path": path.relative_to(root).as_posix(), "class": label, "split": split, "index": -1})
    row["sha256"] = file_sha256(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        row.update(kind="other", error=f"not an image file ({path.suffix or 'no suffix'})")
        return row
    row["kind"] = "image"
    try:
        with Image.open(path) as img:
            row.update(width=img.width, height=img.height, channels=channel_count(img))
            if decode_to:
                decode_to[1].write(decode_to[0], img)  # a truncated file fails here, in the full decode
    except Exception as err:  # not an image at all, whatever its name says
        row["error"] = decoding.unreadable(err)
    return row


def _majority(values: list[int], default: int) -> int:
    return max(set(values), key=lambda v: (values.count(v), v)) if values else default


def load_raw(cfg: DataConfig, root: Path, scratch: Path) -> Raw:
    if cfg.source == "digits":
        return load_digits()
    if cfg.source == "imagefolder":
        return load_imagefolder(cfg, root, scratch)
    return load_torchvision(cfg, root)


def _feedback_files(folder, reading) -> list[dict]:
    """File rows for what is in the feedback folder but is no readable feedback shard: refused by
    validation by name (a damaged shard as unreadable, anything else as no image)."""
    from pipeline.data import shards

    rows = []
    for name in sorted(folder.names()):
        if name.startswith(".") or name == "README.md" or shards.NAME.match(name):
            continue
        rows.append({**dict.fromkeys(FILE_COLUMNS), "path": name, "class": "", "split": "feedback",
                     "index": -1, "kind": "other", "error": "not a feedback shard"})  # fmt: skip
    for damaged in reading.damaged:
        name = damaged.split(": ", 1)[0].rsplit("/", 1)[-1]
        rows.append({**dict.fromkeys(FILE_COLUMNS), "path": name, "class": "", "split": "feedback",
                     "index": -1, "kind": "image", "error": f"unreadable: {damaged}"})  # fmt: skip
    return rows


def _fit(x: np.ndarray, h: int, w: int, c: int, interpolation: str) -> np.ndarray:
    """Feedback inputs in the data's image shape (a champion of other inputs sampled them otherwise)."""
    from PIL import Image

    if x.shape[1:] == (h, w, c):
        return x
    images = (Image.fromarray(i[..., 0] if i.shape[-1] == 1 else i) for i in x)
    return np.stack([to_pixels(img, h, w, c, interpolation) for img in images])


def with_feedback(raw: Raw, cfg: DataConfig, folder, scratch: Path) -> Raw:
    """`raw` plus the labelled live inputs in the feedback folder (`pipeline.data.feedback`'s shards, the
    newest label of each input), converted to the data's image shape. The newest `data.feedback_holdout`
    of each class are pinned to the feedback slice, the rest to train; the frozen splits do not move.
    Every feedback image gets a file row (`<shard>#<row>`), and whatever else lies in the folder too, so
    validation judges feedback like any other file."""
    from pipeline.data import shards
    from pipeline.data.feedback import feedback_rows

    reading = shards.Reading()
    rows = feedback_rows(folder, reading)
    extra = _feedback_files(folder, reading)
    if not rows and not extra:
        return raw
    h, w, c = raw.x.shape[1:]
    labels = [str(v) for v in rows.get("label", [])]
    unknown = sorted(set(labels) - set(raw.classes))
    if unknown:
        raise SourceError(
            f"feedback in {folder.where} names classes the data does not have: {', '.join(unknown)} "
            f"(classes: {', '.join(raw.classes)})"
        )
    x = _fit(rows["x"], h, w, c, cfg.interpolation) if rows else np.empty((0, h, w, c), dtype=np.uint8)
    y = np.array([raw.classes.index(lab) for lab in labels], dtype=np.int64)
    fixed = np.full(len(y), "train", dtype="<U8")
    for label in np.unique(y):
        newest = np.flatnonzero(y == label)  # oldest first: feedback_rows orders by time
        fixed[newest[len(newest) - int(round(len(newest) * cfg.feedback_holdout)) :]] = "feedback"
    offset = len(raw.x)
    where = cfg.feedback.rstrip("/")
    files = list(raw.files)
    for i, (request, item, label) in enumerate(
        zip(rows.get("request", []), rows.get("item", []), labels, strict=True)
    ):
        files.append({**dict.fromkeys(FILE_COLUMNS), "path": f"{where}/{request}#{item}", "class": label,
                      "split": "feedback", "index": offset + i, "kind": "image", "error": None,
                      "height": h, "width": w, "channels": c})  # fmt: skip
    files += [{**row, "path": f"{where}/{row['path']}"} for row in extra]
    joined = scratch / "with_feedback.npy"
    parts = itertools.chain((part for _, part in arrays.blocks(raw.x)), [x])  # one block in memory at a time
    arrays.save(joined, (len(raw.x) + len(x), h, w, c), raw.x.dtype, parts)
    return Raw(
        np.load(joined, mmap_mode="r"),
        np.concatenate([raw.y, y]),
        raw.classes,
        np.concatenate([raw.fixed.astype("<U8"), fixed]),
        files,
        raw.converted_channels,
    )
