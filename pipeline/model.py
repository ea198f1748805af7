"""The network and its on-disk form.

A model is two files: `model.pt` (a state dict, loadable with `weights_only=True`, so loading never
unpickles code) and `model.json` (architecture, input shape, classes, normalisation). Preprocessing lives
inside the module as buffers, so whoever holds the weights feeds raw 0..255 pixels exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.io import read_json, write_json

WEIGHTS = "model.pt"
META = "model.json"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SmallCNN(nn.Module):
    """Three conv blocks and global pooling: fits any input size >= 2x2, so one definition serves 8x8 digits
    and 32x32 photos alike."""

    def __init__(self, in_channels: int, n_classes: int, width: int):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Classifier(nn.Module):
    """Raw NHWC pixels in 0..255 → logits. Normalisation statistics are buffers, saved with the weights."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255.0)
        return self.net((x - self.mean) / self.std)


def build(meta: dict) -> Classifier:
    """The untrained model described by `meta` (see `make_meta`)."""
    h, w, c = meta["input_shape"]
    archs = {"small_cnn": lambda: SmallCNN(c, len(meta["classes"]), meta["width"])}
    return Classifier(archs[meta["arch"]](), meta["normalization"]["mean"], meta["normalization"]["std"])


def make_meta(arch: str, width: int, manifest: dict) -> dict:
    return {
        "arch": arch,
        "width": width,
        "input_shape": manifest["image_shape"],
        "classes": manifest["classes"],
        "normalization": manifest["normalization"],
        "data_version": manifest["data_version"],
    }


def save(model: Classifier, meta: dict, out_dir: str | Path) -> None:
    """Write into `out_dir` (the caller makes it atomic)."""
    out_dir = Path(out_dir)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    write_json(out_dir / META, meta)


def load(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    model_dir = Path(model_dir)
    meta = read_json(model_dir / META)
    model = build(meta)
    model.load_state_dict(torch.load(model_dir / WEIGHTS, map_location=device, weights_only=True))
    return model.to(device).eval(), meta


@torch.inference_mode()
def predict_proba(model: Classifier, pixels, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities for uint8/float NHWC pixels (array or tensor), batched to bound memory."""
    device = next(model.parameters()).device
    x = pixels if isinstance(pixels, torch.Tensor) else torch.tensor(pixels)  # copies read-only mmaps
    return torch.cat(
        [
            torch.softmax(model(x[i : i + batch_size].to(device)), dim=1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    )
