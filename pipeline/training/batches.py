"""Batches of one split for the training loop, and the augmentation applied to them on the device.

Splits that fit in `train.in_memory_mb` live on the device as uint8 tensors and are batched by index (no
per-sample Python work, no DataLoader processes); larger ones stream from the prepared memory maps through a
DataLoader, in the same order, so both train the very same model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.data import arrays
from pipeline.data.prepared import Dataset


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random shift (zero fill), horizontal flip, resized crop and colour jitter of a whole NHWC batch of
    0..255 pixels, one draw per image, on the batch's device. Returns uint8 unless crop or jitter ran
    (then float, still 0..255: rounding back would only lose information)."""
    x = _shift_and_flip(x, cfg, gen)
    if cfg.crop_scale < 1.0:
        x = _resized_crop(x, cfg.crop_scale, gen)
    if cfg.color_jitter > 0.0:
        x = _color_jitter(x, cfg.color_jitter, gen)
    return x


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=gen)).to(device)


def _resized_crop(x: torch.Tensor, min_scale: float, gen: torch.Generator) -> torch.Tensor:
    """Inception-style crops: a random share (min_scale..1) of the area at a random aspect (3:4..4:3),
    anywhere inside the image, resized back to the batch's size (bilinear), all in one grid_sample."""
    n = len(x)
    area = _uniform(n, min_scale, 1.0, gen, x.device)
    aspect = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), gen, x.device))
    sx, sy = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    cx, cy = (1 - sx) * _uniform(n, -1, 1, gen, x.device), (1 - sy) * _uniform(n, -1, 1, gen, x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    nchw = x.permute(0, 3, 1, 2).float()
    grid = nn.functional.affine_grid(theta, list(nchw.shape), align_corners=False)
    out = nn.functional.grid_sample(nchw, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and (colour images) saturation, each scaled by a factor in 1 ± strength."""
    n, c = len(x), x.shape[3]
    x = x.float()
    factors = [_uniform(n, 1 - strength, 1 + strength, gen, x.device)[:, None, None, None] for _ in range(3)]
    x = x * factors[0]
    grey = x.mean(dim=3, keepdim=True)
    x = (x - grey.mean(dim=(1, 2), keepdim=True)) * factors[1] + grey.mean(dim=(1, 2), keepdim=True)
    if c == 3:
        grey = x.mean(dim=3, keepdim=True)
        x = grey + (x - grey) * factors[2]
    return x.clamp(0.0, 255.0)


def _shift_and_flip(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    n, h, w, _ = x.shape
    if cfg.shift_pixels:
        s = cfg.shift_pixels
        padded = nn.functional.pad(x.permute(0, 3, 1, 2), (s, s, s, s)).permute(0, 2, 3, 1)
        dy, dx = (torch.randint(0, 2 * s + 1, (2, n), generator=gen)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    if cfg.flip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
    return x


class _Rows(torch.utils.data.Dataset):
    """Rows of a prepared .npy memory map, fetched a batch at a time in DataLoader workers."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.path, self.y, self.x = x.filename, y, None

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, idx: list[int]):
        if self.x is None:  # opened in the worker, not pickled from the parent
            self.x = np.load(self.path, mmap_mode="r")
        # Same order as in memory, so streaming trains the very same model.
        return torch.from_numpy(arrays.take(self.x, idx)), torch.from_numpy(self.y[idx])


def _collate(batch):
    return batch


class Batches:
    """Index-batched access to one split: on-device tensors when it fits, a streaming loader when not."""

    def __init__(self, part: Dataset, cfg: TrainConfig, device: torch.device):
        self.n = len(part.y)
        self.cfg, self.device = cfg, device
        self.in_memory = part.x.nbytes <= cfg.in_memory_mb * 2**20 or not isinstance(part.x, np.memmap)
        self.y = torch.as_tensor(np.asarray(part.y), device=device)
        if self.in_memory:
            self.x = torch.tensor(np.asarray(part.x), device=device)
        else:
            self.rows = _Rows(part.x, np.asarray(part.y))

    def __call__(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if self.in_memory:
            for idx in chunks:
                idx = idx.to(self.device)
                yield self.x[idx], self.y[idx]
            return
        loader = torch.utils.data.DataLoader(
            self.rows,
            batch_sampler=[c.tolist() for c in chunks],
            num_workers=self.cfg.loader_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
