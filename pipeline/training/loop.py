"""train: fit the classifier on the prepared train split, watching the val split.

`train()` returns the model and its per-epoch history; the stage adapter decides what to persist and log.
Batches come from `pipeline.training.batches` (on the device when the split fits, streamed when not) and
are augmented there. Every epoch ends with an atomic checkpoint (`pipeline.training.checkpoint`), so a
killed run picks up where it stopped and finishes exactly as an uninterrupted one would. Under torchrun
the same loop runs as DistributedDataParallel, each process taking its share of every batch.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.config import TrainConfig
from pipeline.data.prepared import Dataset
from pipeline.training import backbones, checkpoint
from pipeline.training.batches import Batches, augment
from pipeline.training.calibration import fit_temperature
from pipeline.training.model import Classifier, build


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict]  # one row per epoch: loss/accuracy for train and val, lr, images/s
    device: str
    resumed_from: int  # epochs taken from a checkpoint (0: a fresh start)
    best_epoch: int  # the epoch whose weights were kept (early stopping keeps the best, not the last)

    def report(self, run_id: str | None, world_size: int, wall: float) -> dict:
        """reports/train.json: what the train stage hands on."""
        last = self.history[-1] if self.history else {}
        return {
            "run_id": run_id,
            "device": self.device,
            "world_size": world_size,
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            "temperature": round(float(self.model.temperature), 4),  # train.calibrate's; 1 = none
            "resumed_from": self.resumed_from,
            "wall_s": round(wall, 3),
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in self.history] or [0.0])), 1),
            "val_accuracy": last.get("val_accuracy"),
            "val_loss": last.get("val_loss"),
        }


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if preference == "mps" or (preference == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless running under an initialised torch.distributed group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Speed:
    """What the hardware choices came to: decided once, recorded in the checkpoint and the run."""

    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def choose(cls, cfg: TrainConfig, local_rank: int) -> Speed:
        device = pick_device(cfg.device, local_rank)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
            # Fixed input shapes: let cuDNN pick the fastest kernels once.
            torch.backends.cudnn.benchmark = not cfg.deterministic
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        return cls(device, bf16, channels_last)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def set_threads(cfg: TrainConfig, local_world: int) -> None:
    """One process per node by default gets every core; under torchrun each gets its share."""
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps, pct_start=cfg.warmup
        )
    warm = max(1, int(cfg.warmup * total_steps))
    return torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm)),
        ],
        milestones=[warm],
    )


def _param_groups(model: Classifier, cfg: TrainConfig, pretrained: bool) -> list[dict]:
    """One group at lr; with pretrained weights, the backbone gets its own at lr x backbone_lr
    (discriminative learning rates: the new head learns fast, the features it reads move gently)."""
    if not pretrained:
        return [{"params": list(model.parameters()), "lr": cfg.lr}]
    head = backbones.head_parameters(model.net)
    params = list(model.parameters())
    return [
        {"params": [p for p in params if id(p) not in head], "lr": cfg.lr * cfg.backbone_lr},
        {"params": [p for p in params if id(p) in head], "lr": cfg.lr},
    ]


def _optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def _evaluate(model: nn.Module, batches: Batches, batch_size: int, speed: Speed) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for x, y in batches(torch.arange(batches.n), batch_size):
        with speed.autocast():
            logits = model(x).float()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / max(batches.n, 1), correct / max(batches.n, 1)


@dataclass
class _Progress:
    """What the epochs so far have come to: what a checkpoint carries on."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(
        default_factory=lambda: {"val_loss": float("inf"), "epoch": 0, "weights": None, "stale": 0}
    )
    done: int = 0  # epochs finished


class _Trainer:
    """One run of the loop: the network, its optimiser and schedule, the data, and the random streams."""

    def __init__(self, cfg: TrainConfig, seed: int, train_set: Dataset, val_set: Dataset, meta: dict,
                 weights: backbones.Weights | None):  # fmt: skip
        self.cfg, self.seed, self.meta = cfg, seed, meta
        self.pretrained = meta.get("pretrained", {}).get("source", backbones.NONE) != backbones.NONE
        self.rank, self.world_size = world()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        if cfg.deterministic:  # off is torch's default; setting it at all imports torch's compiler (~1.4 s)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.speed = Speed.choose(cfg, self.local_rank)
        torch.manual_seed(seed)
        self.shuffle = torch.Generator().manual_seed(seed)  # batch order, identical on every process
        self.aug_gen = torch.Generator().manual_seed(seed + 1 + self.rank)  # one stream per process
        self.model, self.net = self._network(weights)
        self.train_batches = Batches(train_set, cfg, self.speed.device)
        self.val_batches = Batches(val_set, cfg, self.speed.device)
        self.steps_per_epoch = -(-self.train_batches.n // cfg.batch_size)
        groups = _param_groups(self.model, cfg, self.pretrained)
        self.opt = _optimizer(groups, cfg)
        # Frozen warm-up: the backbone does not learn, so a random head cannot wreck its features.
        self.backbone = groups[0]["params"] if self.pretrained else []
        self.frozen = False
        self.sched = _schedule(self.opt, cfg, max(1, cfg.epochs * self.steps_per_epoch))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _network(self, weights: backbones.Weights | None) -> tuple[Classifier, nn.Module]:
        model = build(self.meta, weights).to(self.speed.device)
        if self.speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
        net: nn.Module = model
        if self.world_size > 1:
            ids = [self.speed.device.index] if self.speed.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            net = torch.compile(net)
        return model, net

    def restore(self, resume: dict, run_key: str) -> _Progress:
        if resume["fingerprint"] != run_key:
            raise ValueError("the checkpoint to resume is from another run (see checkpoint.fingerprint)")
        self.model.load_state_dict(resume["model"])
        self.opt.load_state_dict(resume["optimizer"])
        self.sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"]["torch"])
        self.shuffle.set_state(resume["rng"]["shuffle"])
        self.aug_gen.set_state(resume["rng"]["augment"][self.rank])
        return _Progress(resume["history"], resume["best"], resume["epoch"])

    def epoch(self, epoch: int, bar) -> dict:
        """One pass over the training split, then the val split: the epoch's row of the history."""
        self.net.train()
        self.frozen = self.pretrained and epoch <= self.cfg.freeze_epochs
        # No backward through a frozen backbone: its warm-up costs about a forward pass. DDP fixes at wrapping
        # which parameters take gradients; there the backbone's are dropped after each backward instead.
        if self.world_size == 1:
            for p in self.backbone:
                p.requires_grad_(not self.frozen)
        start = time.perf_counter()
        # Running sums stay on the device: reading them every step would stall a GPU on each batch.
        totals = torch.zeros(3, dtype=torch.float64, device=self.speed.device)  # seen, loss sum, correct
        order = torch.randperm(self.train_batches.n, generator=self.shuffle)
        for x, y in self.train_batches(order, self.cfg.batch_size):
            x, y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]  # this process's share
            if len(y):
                self._step(x, y, totals)
                _show(bar, epoch, totals, self.world_size, start)
        if self.world_size > 1:
            self._synchronise(totals)
        elapsed = time.perf_counter() - start
        val_loss, val_acc = _evaluate(self.model, self.val_batches, 4 * self.cfg.batch_size, self.speed)
        n_seen, loss_sum, correct = totals.tolist()
        seen = max(n_seen, 1)
        return {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": self.opt.param_groups[-1]["lr"],  # the head's (a backbone learns at a share)
            "images_per_s": n_seen / elapsed,
            "epoch_s": elapsed,
        }

    def _step(self, x: torch.Tensor, y: torch.Tensor, totals: torch.Tensor) -> None:
        x = augment(x, self.cfg, self.aug_gen)
        with self.speed.autocast():
            logits = self.net(x)
            loss = self.loss_fn(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.frozen:
            for p in self.backbone:
                p.grad = None  # the optimiser skips these: no step, no weight decay
        self.opt.step()
        self.sched.step()
        totals[0] += len(y)
        totals[1] += loss.detach() * len(y)
        totals[2] += (logits.argmax(1) == y).sum()

    def _synchronise(self, totals: torch.Tensor) -> None:
        torch.distributed.all_reduce(totals)
        # DDP syncs buffers at the start of each forward, so after the last step each process holds its own
        # batch-norm statistics: take rank 0's, so every process (and every node's saved model) evaluates
        # and keeps the same network.
        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def keep_best(self, progress: _Progress, row: dict) -> None:
        if row["val_loss"] < progress.best["val_loss"]:
            # Only early stopping goes back to the best epoch: otherwise a copy per epoch is wasted.
            weights = (
                {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if self.cfg.early_stopping
                else None
            )
            progress.best = {
                "val_loss": row["val_loss"],
                "epoch": row["epoch"],
                "weights": weights,
                "stale": 0,
            }
        else:
            progress.best["stale"] += 1

    def checkpoint_state(self, progress: _Progress, run_key: str, extra: dict) -> dict:
        rngs = checkpoint.gather_rng(self.aug_gen, self.world_size)  # every process takes part
        return {
            "fingerprint": run_key,
            "config": {"seed": self.seed, "train": self.cfg.model_dump(mode="json"), "meta": self.meta},
            "epoch": progress.done,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(), "augment": rngs},
            "history": progress.history,
            "best": progress.best,
            "extra": extra,
        }


def train(
    cfg: TrainConfig,
    seed: int,
    train_set: Dataset,
    val_set: Dataset,
    meta: dict,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_path: Path | None = None,
    resume: dict | None = None,
    extra_state: dict | None = None,
    run_key: str = "",
    weights: backbones.Weights | None = None,
) -> TrainResult:
    """Fit from scratch, or from `resume`: a checkpoint of this same run, as `checkpoint.load` returns it
    for `run_key` (see `checkpoint.fingerprint`). Every epoch ends with a checkpoint written to
    `checkpoint_path`, holding `run_key` and `extra_state` for the caller (e.g. its MLflow run id).
    `weights` (pretrained, see `backbones.resolve`) start a fresh run; a resumed one has its own."""
    t = _Trainer(cfg, seed, train_set, val_set, meta, weights if resume is None else None)
    progress = _Progress() if resume is None else t.restore(resume, run_key)
    resumed_from = progress.done
    bar = _progress_bar((cfg.epochs - resumed_from) * t.steps_per_epoch) if t.rank == 0 else None
    for epoch in range(resumed_from + 1, cfg.epochs + 1):
        if cfg.early_stopping and progress.best["stale"] >= cfg.early_stopping:
            break
        row = t.epoch(epoch, bar)
        progress.history.append(row)
        progress.done = epoch
        t.keep_best(progress, row)
        state = t.checkpoint_state(progress, run_key, extra_state or {})
        if checkpoint_path is not None and t.local_rank == 0:  # every node keeps its own, to resume from
            checkpoint.save(checkpoint_path, state)
        if on_epoch is not None and t.rank == 0:
            on_epoch(row)
    if bar is not None:
        bar.close()
    if cfg.early_stopping and progress.best["weights"] is not None:
        t.model.load_state_dict(progress.best["weights"])
    best_epoch = progress.best["epoch"] if cfg.early_stopping else len(progress.history)
    if cfg.calibrate:
        fit_temperature(t.model.eval(), val_set)
    return TrainResult(t.model.eval(), progress.history, str(t.speed.device), resumed_from, best_epoch)


def _show(bar, epoch: int, totals: torch.Tensor, world_size: int, start: float) -> None:
    if bar is None:
        return
    seen, loss_sum, correct = totals.tolist()
    bar.update(1)
    bar.set_postfix(
        epoch=epoch,
        loss=f"{loss_sum / seen:.4f}",
        acc=f"{correct / seen:.3f}",
        img_s=f"{seen * world_size / (time.perf_counter() - start):.0f}",
    )


def _progress_bar(total: int):
    """A progress bar on a terminal; None elsewhere (CI logs get one line per epoch from the caller)."""
    if not sys.stderr.isatty() or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
