"""Fine-tuning speed at 224x224x3: tollgate's training loop against a plain timm fine-tuning loop on the
same arrays, same model, batch and optimiser, measured back to back in one run (images/s of the second
epoch, so start-up and the frozen warm-up are not counted; CPU here, CUDA when present).

    .venv/bin/python bench/finetune_speed.py [--backbones resnet18.tv_in1k ...] [--images 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.training.loop import train  # noqa: E402
from pipeline.training.model import make_meta  # noqa: E402
from tests.support import config  # noqa: E402

SIDE, CLASSES = 224, 10


class _Split:
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y, self.classes = x, y, [str(c) for c in range(CLASSES)]


def plain_timm(backbone: str, x: np.ndarray, y: np.ndarray, batch: int, device: str) -> float:
    """What a practitioner writes by hand: timm model, normalise, AdamW, bf16 autocast on CUDA."""
    import timm

    net = timm.create_model(backbone, num_classes=CLASSES).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    xs, ys = torch.tensor(x, device=device), torch.tensor(y, device=device)
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for idx in torch.randperm(len(ys), device=device).split(batch):
            inputs = (xs[idx].permute(0, 3, 1, 2).float() / 255 - mean) / std
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(net(inputs).float(), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(len(ys) / (time.perf_counter() - start))
    return rates[-1]


def tollgate_loop(backbone: str, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    manifest = {
        "image_shape": [SIDE, SIDE, 3],
        "classes": [str(c) for c in range(CLASSES)],
        "data_version": "bench",
        "normalization": {"mean": [0.45] * 3, "std": [0.25] * 3},
    }
    cfg = config("train", backbone=backbone, epochs=2, batch_size=batch, lr=1e-3, threads=0, freeze_epochs=0)
    split = _Split(x, y)
    result = train(cfg, 0, split, _Split(x[:batch], y[:batch]), make_meta(backbone, 8, manifest))
    return result.history[-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # timm's resnet18 (a tag, not the bare name: train.backbone resnet18 is tollgate's small-image one)
    ap.add_argument("--backbones", nargs="+", default=["resnet18.tv_in1k", "mobilenetv3_large_100"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, SIDE, SIDE, 3), dtype=np.uint8)
    y = rng.integers(0, CLASSES, args.images)
    print(f"{args.images} images {SIDE}x{SIDE}x3, batch {args.batch}, on {device}")
    for backbone in args.backbones:
        ours = tollgate_loop(backbone, x, y, args.batch)
        plain = plain_timm(backbone, x, y, args.batch, device)
        print(
            f"{backbone:24s} tollgate {ours:7.1f} img/s | plain timm loop {plain:7.1f} img/s "
            f"| {ours / plain:.2f}x"
        )


if __name__ == "__main__":
    main()
