"""The network and its on-disk form.

A model is two files: `model.pt` (a state dict, loadable with `weights_only=True`, so loading never
unpickles code) and `model.json` (architecture, input shape, classes, normalisation). Preprocessing lives
inside the module as buffers, so whoever holds the weights feeds raw 0..255 pixels exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.core.files import load_json, write_json

WEIGHTS = "model.pt"
META = "model.json"
# Name of this folder inside a logged MLflow pyfunc model (see pipeline/registry/pyfunc.py).
MLFLOW_ARTIFACT = "model_dir"


def _block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A stem, a 2x2 max-pool, two conv blocks and global max-pooling: any input size >= 2x2 works.

    Inputs of 16 pixels or more get a 5x5 stride-2 stem, so the two wide blocks run at a quarter of the
    resolution (7x7 for MNIST): that is where the compute goes, and at 28x28 it would be 16x as much.
    Small inputs (8x8 digits) keep full resolution with a 3x3 stem."""

    def __init__(self, in_channels: int, n_classes: int, width: int, side: int):
        super().__init__()
        kernel, stride = (5, 2) if side >= 16 else (3, 1)
        self.features = nn.Sequential(
            _block(in_channels, width, kernel, stride),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            _block(2 * width, 4 * width),
            nn.AdaptiveMaxPool2d(1),
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


def resnet18(in_channels: int, n_classes: int) -> nn.Module:
    """torchvision's ResNet-18, no pretrained weights, with the CIFAR-style stem: a 3x3 stride-1 first conv
    and no max-pool, so 28x28 or 32x32 inputs are not shrunk to 7x7 before the first block."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=n_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build(meta: dict) -> Classifier:
    """The untrained model described by `meta` (see `make_meta`)."""
    h, w, c = meta["input_shape"]
    n = len(meta["classes"])
    archs = {
        "small_cnn": lambda: SmallCNN(c, n, meta["width"], min(h, w)),
        "resnet18": lambda: resnet18(c, n),
    }
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
    meta = load_json(model_dir / META)
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


@torch.inference_mode()
def predict_with_embeddings(
    model: Classifier, pixels, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and the penultimate layer's output (what the last linear layer reads), in one
    pass: drift monitoring compares these embeddings with the ones saved at training."""
    head = [m for m in model.net.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float().cpu()))
    try:
        probs = predict_proba(model, pixels, batch_size)
    finally:
        handle.remove()
    return probs, torch.cat(seen)
