"""A folder of photos as users have them: decode speed, peak memory and `dvc repro` times on 224x224x3.

Generates `--images` mixed-size JPEGs (300-800 px, smooth colour fields with texture and noise, 10
classes) once into `--folder`, then measures, back to back in this run:
- decode: prepare's reader (every core, `pipeline.data.sources.load_imagefolder`: checksum, header and
  pixels of every file) against a single-process Pillow loop (open, RGB, bilinear resize) and
  torchvision's `ImageFolder` + `DataLoader(num_workers=2)` over the same files, each right after a read
  of every file (images/s, and the ratios the issue's goals name);
- `tollgate prepare`, `tollgate validate` and `tollgate train` as `dvc repro` runs them: wall time and peak
  resident memory (the largest single process: decode and loader workers are counted apart from their
  parent). train streams (train.in_memory_mb 256, below the 3 GB of pixels) one epoch of a narrow small_cnn:
  the figure is the data path's, a wider backbone adds its own weights and activations;
- `dvc repro validate` cold, then again with nothing changed (the no-op: DVC re-checks every file).

    .venv/bin/python bench/photo_folder.py [--images 20000] [--folder /tmp/tollgate-photos]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.data_timing import timed  # noqa: E402
from tests.support import make_project, run, set_param  # noqa: E402

SIDE = 224


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    if len(list(folder.glob("*/*.jpg"))) >= n:
        return
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 10
        w, h = (int(v) for v in rng.integers(300, 800, 2))
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3)) + 40 * np.sin(np.arange(w) / (3 + label))[None, :, None]
        pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        out = folder / f"class{label}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(out, quality=88)


def warm(files: list[Path]) -> list[Path]:
    """Read every file once, so that the next contender measures decoding, not this disk: the page cache
    here holds about 5 GB, and a pass that writes 3 GB of pixels evicts the folder read before it."""
    for f in files:
        f.read_bytes()
    return files


def pillow_loop(files: list[Path]) -> float:
    from PIL import Image

    start = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            np.asarray(img.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR))
    return len(files) / (time.perf_counter() - start)


def torchvision_loader(folder: Path) -> float:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((SIDE, SIDE)), transforms.PILToTensor()])
    data = datasets.ImageFolder(str(folder), transform=tf)
    start = time.perf_counter()
    for _ in torch.utils.data.DataLoader(data, batch_size=64, num_workers=2):
        pass
    return len(data) / (time.perf_counter() - start)


def reader_rate(folder: Path) -> float:
    from pipeline.data.sources import load_imagefolder
    from tests.support import config

    cfg = config("data", source="imagefolder", root=str(folder), image_size=[SIDE, SIDE], channels=3)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        raw = load_imagefolder(cfg, folder, Path(scratch))
        return len(raw.y) / (time.perf_counter() - start)


def prepare_reader(folder: Path) -> float:
    """prepare's reader (checksums, headers, decode) in a fresh process, as the stage runs it: its workers
    are spawned, and a spawned worker re-imports the parent's main module (this script's imports)."""
    code = (
        "from pathlib import Path; from bench.photo_folder import reader_rate; "
        f"print(reader_rate(Path({str(folder)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "tollgate-photos")
    ap.add_argument("--skip-decode", action="store_true", help="only the stage and dvc figures")
    args = ap.parse_args()
    make_photos(args.folder, args.images)
    files = sorted(args.folder.glob("*/*.jpg"))[: args.images]
    print(f"{len(files)} JPEGs in {args.folder}, {sum(f.stat().st_size for f in files) / 1e9:.2f} GB")
    if not args.skip_decode:
        ours = prepare_reader(warm(files) and args.folder)
        single = pillow_loop(warm(files))
        tv = torchvision_loader(warm(files) and args.folder)
        print(
            f"decode  prepare {ours:.0f} img/s | single-process Pillow {single:.0f} img/s "
            f"({ours / single:.2f}x) | ImageFolder+DataLoader(2) {tv:.0f} img/s ({ours / tv:.2f}x)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        for key, value in {
            "data.source": "imagefolder",
            "data.root": str(args.folder),
            "data.image_size": [SIDE, SIDE],
            "data.channels": 3,
        }.items():
            set_param(project, key, value)
        for key, value in {"train.width": 8, "train.epochs": 1, "train.in_memory_mb": 256}.items():
            set_param(project, key, value)
        for stage in ("prepare", "validate", "train"):
            wall, peak = timed(["tollgate", stage], project)
            print(f"{stage:8s} {wall:6.1f} s, peak {peak:,.0f} MB (one process)")
        run(["git", "add", "-A"], cwd=project)
        run(["rm", "-rf", "data/prepared", "reports/validation.json"], cwd=project)  # train is not re-run
        start = time.perf_counter()
        run(["dvc", "repro", "validate"], cwd=project)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        out = run(["dvc", "repro", "validate"], cwd=project).stdout
        noop = time.perf_counter() - start
        assert "Running stage" not in out, out
        print(f"dvc repro validate: cold {cold:.1f} s, no-op {noop:.1f} s")


if __name__ == "__main__":
    main()
