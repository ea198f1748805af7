"""Serving runtimes side by side on a compute-bound model: eager torch vs the ONNX export vs its int8
quantisation (pipeline/training/runtimes.py, what `serve.runtime` serves), ResNet-18 at CIFAR-10 size
(32x32x3, the small-image stem `train.backbone: resnet18`) and at 224x224x3 (timm's `resnet18.tv_in1k`),
in one process, back to back, on `serve.threads` threads. Prints batch-1 p50/p99 and batched throughput,
and the top-1 agreement with eager on random images (untrained weights: a speed bench; the gate measures
agreement on the test split). The models are untrained: latency does not depend on the weights' values.

    .venv/bin/python bench/runtimes.py [--runs 50] [--batch 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.evaluation.metrics import batch1_latencies_ms  # noqa: E402
from pipeline.training import model as model_io  # noqa: E402
from pipeline.training import runtimes  # noqa: E402
from pipeline.training.onnx_export import export_onnx  # noqa: E402

CASES = [("resnet18", [32, 32, 3]), ("resnet18.tv_in1k", [224, 224, 3])]


def _meta(backbone: str, shape: list[int]) -> dict:
    manifest = {
        "image_shape": shape,
        "classes": [str(i) for i in range(10)],
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "data_version": "bench",
        "interpolation": "bilinear",
    }
    return model_io.make_meta(backbone, 32, manifest)


def _throughput(forward, x: np.ndarray, seconds: float = 3.0) -> float:
    forward(x)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        forward(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def _contenders(model, shape: list[int], calibration: np.ndarray, folder: Path, threads: int) -> dict:
    """Each runtime as pixels -> probabilities."""
    onnx_path, int8_path = folder / "m.onnx", folder / "m.int8.onnx"
    export_onnx(model, shape, onnx_path)
    runtimes.quantize_int8(onnx_path, calibration, int8_path)
    onnx = runtimes.OnnxModel(onnx_path, runtimes.ONNX, threads)
    int8 = runtimes.OnnxModel(int8_path, runtimes.INT8, threads)
    return {
        "torch (eager)": lambda x: model_io.predict_proba(model, x).numpy(),
        "onnx": lambda x: onnx.predict(x)[0],
        "onnx-int8": lambda x: int8.predict(x)[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"| model | input | runtime | batch-1 p50 ms | p99 ms | images/s, batch {args.batch} | agreement |")
    print("|---|---|---|---|---|---|---|")
    for backbone, shape in CASES:
        model = model_io.build(_meta(backbone, shape)).eval()
        images = rng.integers(0, 256, (64, *shape), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            contenders = _contenders(model, shape, images, Path(tmp), args.threads)
            reference = contenders["torch (eager)"](images).argmax(1)
            for name, forward in contenders.items():
                lat = batch1_latencies_ms(forward, shape, args.runs, np.uint8)
                ips = _throughput(forward, images[: args.batch])
                agree = float((forward(images).argmax(1) == reference).mean())
                print(f"| {backbone} | {'x'.join(map(str, shape))} | {name} | {np.percentile(lat, 50):.2f} "
                      f"| {np.percentile(lat, 99):.2f} | {ips:.0f} | {agree:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
