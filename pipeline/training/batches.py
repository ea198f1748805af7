"""Batches of one split for the training loop, and the augmentation applied to them on the device.

Splits that fit in `train.in_memory_mb` live on the device as uint8 tensors and are batched by index (no
per-sample Python work, no DataLoader processes); larger ones stream from the prepared memory maps through a
DataLoader, in the same order, so both train the very same model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.data.prepared import Dataset


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random shift (zero fill) and horizontal flip of a whole NHWC uint8 batch, one draw per image."""
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
        return torch.from_numpy(np.ascontiguousarray(self.x[idx])), torch.from_numpy(self.y[idx])


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
