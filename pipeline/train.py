"""train: fit the classifier on the prepared train split, watching the val split.

`train()` returns the model and its per-epoch history; the stage adapter decides what to persist and log.
Datasets that fit in memory live on the device as uint8 tensors and are batched by index: no per-sample
Python work, no DataLoader processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import Dataset
from pipeline.model import Classifier, build


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict]  # one row per epoch: loss/accuracy for train and val, lr, images/s
    device: str


def pick_device(preference: str) -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@torch.inference_mode()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size])
        loss += nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    return loss / max(len(x), 1), correct / max(len(x), 1)


def train(
    cfg: TrainConfig,
    seed: int,
    train_set: Dataset,
    val_set: Dataset,
    meta: dict,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)  # batch order independent of model init draws

    model = build(meta).to(device)
    x_train = torch.tensor(train_set.x, device=device)
    y_train = torch.tensor(train_set.y, device=device)
    x_val = torch.tensor(val_set.x, device=device)
    y_val = torch.tensor(val_set.y, device=device)

    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
        if cfg.epochs
        else None
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bar = _progress(cfg.epochs * steps_per_epoch)

    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        order = torch.randperm(len(x_train), generator=shuffle).to(device)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = model(x_train[idx])
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        elapsed = time.perf_counter() - start
        val_loss, val_acc = _evaluate(model, x_val, y_val, 4 * cfg.batch_size)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": seen / elapsed,
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    if bar is not None:
        bar.close()
    return TrainResult(model=model.eval(), history=history, device=str(device))


def _progress(total: int):
    """A progress bar on a terminal; None elsewhere (CI logs get one line per epoch from the caller)."""
    if not sys.stderr.isatty() or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
