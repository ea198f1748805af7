"""The network and its on-disk form.

A model is two files: `model.pt` (a state dict, loadable with `weights_only=True`, so loading never
unpickles code) and `model.json` (architecture, input shape, classes, normalisation). Preprocessing lives
inside the module as buffers, so whoever holds the weights feeds raw 0..255 pixels exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.core.files import write_json
from pipeline.data import arrays
from pipeline.data.images import interpolation_of
from pipeline.training import backbones
from pipeline.training.model_folder import META, WEIGHTS, backbone_name, read_meta


class Classifier(nn.Module):
    """Raw NHWC pixels in 0..255 → logits. Normalisation statistics are buffers, saved with the weights."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # 1 unless train.calibrate fitted one (pipeline/training/calibration.py): the logits are divided by it
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255.0)
        return self.net((x - self.mean) / self.std) / self.temperature


def build(meta: dict, weights: backbones.Weights | None = None) -> Classifier:
    """The model described by `meta` (see `make_meta`): untrained, or starting from `weights`."""
    h, w, c = meta["input_shape"]
    net = backbones.create(backbone_name(meta), c, len(meta["classes"]), meta["width"], min(h, w), weights)
    return Classifier(net, meta["normalization"]["mean"], meta["normalization"]["std"])


def make_meta(backbone: str, width: int, manifest: dict, weights: backbones.Weights | None = None) -> dict:
    """model.json: the network, its input, its classes and its data. A pretrained backbone normalises with
    the statistics its weights were trained with (not this dataset's), and records what it expects."""
    meta = {
        "backbone": backbone,
        "width": width,
        "input_shape": manifest["image_shape"],
        "classes": manifest["classes"],
        "normalization": manifest["normalization"],
        "interpolation": interpolation_of(manifest),  # serving resizes uploads as prepare did
        "data_version": manifest["data_version"],
        "pretrained": (weights or backbones.Weights(backbones.NONE, None, backbones.NONE)).describe(),
    }
    expects = backbones.pretrained_config(backbone) if weights and weights.source != backbones.NONE else None
    if expects is not None:
        meta["pretrained"]["expects"] = expects
        c = manifest["image_shape"][2]
        # grey images into RGB weights: timm sums the first conv over channels, so one averaged statistic
        meta["normalization"] = {k: _channels(expects[k], c) for k in ("mean", "std")}
    return meta


def _channels(values: list[float], channels: int) -> list[float]:
    return values if len(values) == channels else [sum(values) / len(values)] * channels


def save(model: Classifier, meta: dict, out_dir: str | Path) -> None:
    """Write into `out_dir` (the caller makes it atomic)."""
    out_dir = Path(out_dir)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    write_json(out_dir / META, meta)


def load(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    model = build(meta)
    state = torch.load(model_dir / WEIGHTS, map_location=device, weights_only=True)
    state.setdefault("temperature", torch.ones(1))  # weights saved before temperature scaling came
    model.load_state_dict(state)
    return model.to(device).eval(), meta


@torch.inference_mode()
def logits_of(model: Classifier, pixels, batch_size: int = 1024) -> torch.Tensor:
    """The logits for uint8/float NHWC pixels (array, memory map or tensor), batched to bound memory: at
    most `batch_size` images and about 16 MB of pixels a pass (1024 photos at 224x224 would hold gigabytes
    of activations)."""
    device = next(model.parameters()).device
    step = min(batch_size, arrays.rows_per_chunk(pixels, 16))
    tensor = isinstance(pixels, torch.Tensor)
    out = []
    for i in range(0, len(pixels), step):
        rows = range(i, min(i + step, len(pixels)))
        part = pixels[i : rows.stop] if tensor else torch.from_numpy(arrays.take(pixels, rows))
        out.append(model(part.to(device)).float().cpu())
    return torch.cat(out)


def predict_proba(model: Classifier, pixels, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities, as `logits_of`."""
    return torch.softmax(logits_of(model, pixels, batch_size), dim=1)


def last_linear(model: Classifier) -> nn.Linear:
    """The classification layer: what it reads is the embedding drift monitoring compares."""
    return [m for m in model.net.modules() if isinstance(m, nn.Linear)][-1]


@torch.inference_mode()
def predict_with_embeddings(
    model: Classifier, pixels, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and the penultimate layer's output (what the last linear layer reads), in one
    pass: drift monitoring compares these embeddings with the ones saved at training."""
    head = last_linear(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].float().cpu()))
    try:
        probs = predict_proba(model, pixels, batch_size)
    finally:
        handle.remove()
    return probs, torch.cat(seen)
