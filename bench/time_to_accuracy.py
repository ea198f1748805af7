"""Time to accuracy of the train stage: wall time of `tollgate train` (its own process, imports, MLflow
logging and checkpoints included), epochs, test accuracy and images/s, for a params profile; for MNIST,
back to back with the anchor, one epoch of the canonical pytorch/examples MNIST script on the same files
(../shared/anchors, 98.3 % after one epoch), and the ratio of the two.

    .venv/bin/python bench/time_to_accuracy.py                        # MNIST on CPU (profiles/mnist-cpu.yaml)
    .venv/bin/python bench/time_to_accuracy.py --profile profiles/cifar10-gpu.yaml --files DIR

Targets (issue 15): MNIST >= 99.0 % in <= 0.20 x the anchor's time; (issue 4) CIFAR-10 on one H100/H200
>= 94 % in <= 10 s. `--files` holds the source's original files: the four MNIST .gz files, or
cifar-10-python.tar.gz (or its unpacked cifar-10-batches-py). On CUDA it also prints model FLOPs and MFU
against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.core.config import load_profile  # noqa: E402
from tests.support import (  # noqa: E402
    MNIST_FILES,
    ROOT,
    profile_project,
    run,
    tool_env,
)

# Dense bf16 tensor-core peak (FLOP/s) by device name, for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def test_accuracy_and_flops(project: Path) -> tuple[float, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.data.prepared import load_split
    from pipeline.training import model as model_io

    model, meta = model_io.load(project / "models")
    test = load_split(project / "data" / "prepared", "test")
    accuracy = float((model_io.predict_proba(model, test.x).argmax(1).numpy() == test.y).mean())
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *meta["input_shape"], dtype=torch.uint8))
    return accuracy, counter.get_total_flops()


ANCHOR = ROOT.parent / "shared" / "anchors" / "pytorch_examples_mnist.py"


def anchor_seconds(files: Path, tmp: Path) -> tuple[float, str]:
    """Wall time of one epoch of the anchor script, its process start to end, on the same MNIST files
    (unpacked where it reads them: ../data/MNIST/raw relative to its working directory)."""
    import gzip
    import shutil

    raw = tmp / "anchor" / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sorted(files.glob("*.gz")):
        with gzip.open(gz) as src, open(raw / gz.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    work = tmp / "anchor" / "work"
    work.mkdir()
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(ANCHOR), "--epochs", "1", "--log-interval", "100000"],
        cwd=work, env=tool_env(), check=True, capture_output=True, text=True,
    )  # fmt: skip
    accuracy = next(line for line in out.stdout.splitlines() if "Accuracy" in line).split("(")[-1].rstrip(")")
    return time.perf_counter() - start, accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=ROOT / "profiles" / "mnist-cpu.yaml")
    ap.add_argument("--files", type=Path, default=MNIST_FILES)
    ap.add_argument("--no-anchor", action="store_true", help="time tollgate alone")
    args = ap.parse_args()
    overrides = load_profile(args.profile, ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        project = profile_project(Path(tmp) / "project", overrides, args.files)
        run(["tollgate", "prepare"], cwd=project)
        run(["tollgate", "validate"], cwd=project)
        start = time.perf_counter()
        subprocess.run(["tollgate", "train"], cwd=project, env=tool_env(project), check=True)
        wall = time.perf_counter() - start
        report = json.loads((project / "reports" / "train.json").read_text())
        accuracy, flops = test_accuracy_and_flops(project)
        mnist = overrides["data.source"] == "mnist" and ANCHOR.exists() and not args.no_anchor
        anchor = anchor_seconds(args.files, Path(tmp)) if mnist else None
    print(f"profile        {args.profile.name}")
    print(f"device         {report['device']} (x{report['world_size']})")
    print(f"train stage    {wall:.1f} s wall (training loop {report['wall_s']:.1f} s)")
    print(f"epochs         {report['epochs']}")
    print(f"test accuracy  {accuracy:.4f}")
    print(f"images/s       {report['images_per_s']:.0f} (training, mean over epochs)")
    print(f"model          {flops / 1e6:.1f} MFLOP per image forward")
    if anchor is not None:
        seconds, anchor_accuracy = anchor
        print(f"anchor         {seconds:.1f} s wall (one epoch of pytorch/examples mnist, {anchor_accuracy})")
        print(f"ratio          {wall / seconds:.2f} x the anchor's time (target <= 0.20 x at >= 99.0 %)")
    if report["device"].startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        achieved = 3 * flops * report["images_per_s"]  # forward + backward ~ 3x forward
        mfu = f"{achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "unknown peak"
        print(f"MFU            {achieved / 1e12:.1f} TFLOP/s = {mfu} ({name})")


if __name__ == "__main__":
    main()
