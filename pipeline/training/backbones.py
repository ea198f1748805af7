"""Backbones: tollgate's two small-image networks, or any timm model, from scratch or from pretrained weights.

`train.backbone` names the network: `small_cnn` and `resnet18` are tollgate's own (built for small inputs,
always from scratch); any other name is a timm model (`timm.list_models()`: resnet, efficientnet,
mobilenetv3, convnext, vit ...). `train.pretrained` says where its starting weights come from: `none`,
`hub` (timm's Hugging Face / URL weights for that name, read from the local cache — HF_HOME, TORCH_HOME —
and fetched only when `train.download_weights` allows), or a weights file (timm's format: a state dict as
.safetensors, .pth or .bin). Whatever the source, the weights are found before any training starts, and a
missing file says where it was looked for and how to provide it.

A pretrained backbone brings its own input expectations (size, interpolation, mean/std): they are saved in
`model.json`, and the normalisation inside the model is the backbone's, so the weights see the pixel
statistics they were trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.core.files import file_sha256

OWN = ("small_cnn", "resnet18")  # tollgate's networks; every other name is timm's
NONE, HUB = "none", "hub"


class WeightsUnavailable(RuntimeError):
    """The pretrained weights asked for cannot be had without training from scratch: never done silently."""


@dataclass(frozen=True)
class Weights:
    """Where a backbone's starting weights are, resolved before training."""

    source: str  # none | hub | file
    file: str | None  # the local file timm loads (None: from scratch, or a hub download still to come)
    name: str  # what the user asked for: the hub's id or the file as written in params.yaml

    def describe(self) -> dict:
        """What model.json, the run and the checkpoint fingerprint record: other weights, another run."""
        digest = file_sha256(self.file) if self.file else None
        return {"source": self.source, "weights": self.name, "sha256": digest}


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


def resnet18(in_channels: int, n_classes: int) -> nn.Module:
    """torchvision's ResNet-18, no pretrained weights, with the CIFAR-style stem: a 3x3 stride-1 first conv
    and no max-pool, so 28x28 or 32x32 inputs are not shrunk to 7x7 before the first block."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=n_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _timm():
    import timm

    return timm


def check_name(backbone: str) -> None:
    if backbone not in OWN and not _timm().is_model(backbone):
        raise ValueError(
            f"train.backbone: {backbone!r} is neither {' nor '.join(OWN)} nor a timm model "
            "(timm.list_models() lists them; e.g. resnet18.a1_in1k, mobilenetv3_small_100, convnext_nano)"
        )


def pretrained_config(backbone: str) -> dict | None:
    """The input a timm backbone's pretrained weights expect: size (h, w), interpolation, mean and std (in
    0..1 units); None for tollgate's own networks. Read from timm's registry: no weights are touched."""
    if backbone in OWN:
        return None
    cfg = _timm().get_pretrained_cfg(backbone)
    if cfg is None:
        return None
    return {
        "id": cfg.hf_hub_id or cfg.url or backbone,
        "input_size": list(cfg.input_size[1:]),
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }


def _hub_cache_candidates(backbone: str) -> list[Path]:
    """Files where timm would have left this backbone's hub weights: Hugging Face's cache, then torch's."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _timm().get_pretrained_cfg(backbone)
    found: list[Path] = []
    if cfg.hf_hub_id:
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                found.append(Path(hit))
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            found.append(cached)
    return found


def _cache_folders() -> str:
    from huggingface_hub import constants

    return f"{constants.HF_HUB_CACHE} (HF_HOME) and {Path(torch.hub.get_dir()) / 'checkpoints'} (TORCH_HOME)"


def resolve(backbone: str, pretrained: str, download: bool, root: Path) -> Weights:
    """Where `backbone`'s starting weights are, or WeightsUnavailable saying where they were looked for."""
    if pretrained == NONE:
        return Weights(NONE, None, NONE)
    if backbone in OWN:
        raise WeightsUnavailable(
            f"train.pretrained: {backbone} is tollgate's from-scratch network for small images and has no "
            f"pretrained weights; for ImageNet weights name a timm backbone, e.g. train.backbone: "
            f"{'resnet18.tv_in1k' if backbone == 'resnet18' else 'mobilenetv3_small_100'}"
        )
    if pretrained != HUB:
        path = Path(os.path.expanduser(pretrained))
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise WeightsUnavailable(
                f"train.pretrained: no weights file at {path}. Put {backbone}'s weights there (a state dict "
                "saved as .safetensors, .pth or .bin, e.g. with timm or torch.save(model.state_dict())), or "
                "set train.pretrained: hub to use timm's published weights"
            )
        return Weights("file", str(path), pretrained)
    expects = pretrained_config(backbone)
    if expects is None:
        raise WeightsUnavailable(f"train.pretrained: timm publishes no pretrained weights for {backbone}")
    hub_id = expects["id"]
    cached = _hub_cache_candidates(backbone)
    if cached:
        return Weights(HUB, str(cached[0]), hub_id)
    if not download:
        raise WeightsUnavailable(
            f"train.pretrained: hub weights for {backbone} ({hub_id}) are not in the local caches "
            f"{_cache_folders()}, and train.download_weights is false. Fetch them once where the network "
            f"is reachable (set train.download_weights: true, or run `python -c \"import timm; "
            f"timm.create_model('{backbone}', pretrained=True)\"` with the same HF_HOME), or download the "
            "file yourself and set train.pretrained to its path"
        )
    return Weights(HUB, None, hub_id)


def create(backbone: str, in_channels: int, n_classes: int, width: int, side: int,
           weights: Weights | None = None) -> nn.Module:  # fmt: skip
    """The network, with `weights` loaded when given (a new head either way: the class count is ours)."""
    if backbone == "small_cnn":
        return SmallCNN(in_channels, n_classes, width, side)
    if backbone == "resnet18":
        return resnet18(in_channels, n_classes)
    load = weights is not None and weights.source != NONE
    overlay = {"file": weights.file} if load and weights.file else None
    try:
        return _timm().create_model(
            backbone, pretrained=load, num_classes=n_classes, in_chans=in_channels,
            pretrained_cfg_overlay=overlay,
        )  # fmt: skip
    except (OSError, RuntimeError) as err:  # a download that failed, a file of another network
        if not load:
            raise
        what = f"train.pretrained: {backbone} could not load {weights.name}: {err}"
        raise WeightsUnavailable(what) from None


def head_parameters(net: nn.Module) -> set[int]:
    """Ids of the parameters of the new classification head (timm's `get_classifier()`): the rest is the
    backbone, which fine-tuning treats gently."""
    get = getattr(net, "get_classifier", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Module):
        return {id(p) for p in net.parameters()}
    return {id(p) for p in head.parameters()}
