"""train: fit the classifier on the prepared train split, watching the val split.

`train()` returns the model and its per-epoch history; the stage adapter decides what to persist and log.
Datasets that fit in memory live on the device as uint8 tensors and are batched by index (no per-sample
Python work, no DataLoader processes); larger ones stream from the prepared memory maps through a
DataLoader. Augmentation runs on whole batches on the device. Every epoch ends with an atomic checkpoint,
so a killed run picks up where it stopped and finishes exactly as an uninterrupted one would. Under
torchrun the same loop runs as DistributedDataParallel, each process taking its share of every batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    resumed_from: int  # epochs taken from a checkpoint (0: a fresh start)
    best_epoch: int  # the epoch whose weights were kept (early stopping keeps the best, not the last)


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


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup
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


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def fingerprint(cfg: TrainConfig, seed: int, meta: dict, world_size: int, code: str) -> str:
    """What a checkpoint must match to be resumed: the training config, seed, model and data, the number of
    processes, and `code` (a digest of the source the stage runs): a network changed in between must not
    be continued from the old one's weights. Anything else starts afresh."""
    keep = {
        "seed": seed,
        "world": world_size,
        "train": cfg.model_dump(mode="json"),
        "meta": meta,
        "code": code,
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save beside the target, then rename: a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at `path` if it belongs to the run `key` names (see `fingerprint`), else None. One
    that cannot be read (truncated, corrupt) is removed: it could only fail every later run."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        print(f"[tollgate] discarding unreadable checkpoint {path} ({type(err).__name__}: {err})", flush=True)
        path.unlink(missing_ok=True)
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == key else None


def train(
    cfg: TrainConfig,
    seed: int,
    train_set: Dataset,
    val_set: Dataset,
    meta: dict,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    resume: dict | None = None,
    extra_state: dict | None = None,
    run_key: str = "",
) -> TrainResult:
    """Fit from scratch, or from `resume`: a checkpoint of this same run, as `load_checkpoint` returns it
    for `run_key` (see `fingerprint`). Every epoch ends with a checkpoint written to `checkpoint`, holding
    `run_key` and `extra_state` for the caller (e.g. its MLflow run id)."""
    rank, world_size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if cfg.deterministic:  # off is torch's default; setting it at all imports torch's compiler (~1.4 s)
        torch.use_deterministic_algorithms(True, warn_only=True)
    speed = Speed.choose(cfg, local_rank)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)  # batch order, identical on every process
    aug_gen = torch.Generator().manual_seed(seed + 1 + rank)  # augmentation draws, one stream per process

    model = build(meta).to(speed.device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world_size > 1:
        ids = [speed.device.index] if speed.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)

    train_batches = Batches(train_set, cfg, speed.device)
    val_batches = Batches(val_set, cfg, speed.device)
    steps_per_epoch = -(-train_batches.n // cfg.batch_size)
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, cfg, max(1, cfg.epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    history: list[dict] = []
    best = {"val_loss": float("inf"), "epoch": 0, "weights": None, "stale": 0}
    start_epoch = 1
    if resume is not None:
        if resume["fingerprint"] != run_key:
            raise ValueError("the checkpoint to resume is from another run (see train.fingerprint)")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"]["torch"])
        shuffle.set_state(resume["rng"]["shuffle"])
        aug_gen.set_state(resume["rng"]["augment"][rank])
        history, best = resume["history"], resume["best"]
        start_epoch = resume["epoch"] + 1
    resumed_from = start_epoch - 1
    bar = _progress((cfg.epochs - resumed_from) * steps_per_epoch) if rank == 0 else None

    for epoch in range(start_epoch, cfg.epochs + 1):
        if cfg.early_stopping and best["stale"] >= cfg.early_stopping:
            break
        net.train()
        start = time.perf_counter()
        # Running sums stay on the device: reading them every step would stall a GPU on each batch.
        totals = torch.zeros(3, dtype=torch.float64, device=speed.device)  # seen, loss sum, correct
        order = torch.randperm(train_batches.n, generator=shuffle)
        for x, y in train_batches(order, cfg.batch_size):
            x, y = x[rank::world_size], y[rank::world_size]  # this process's share of the global batch
            if len(y) == 0:
                continue
            x = augment(x, cfg, aug_gen)
            with speed.autocast():
                logits = net(x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            totals[0] += len(y)
            totals[1] += loss.detach() * len(y)
            totals[2] += (logits.argmax(1) == y).sum()
            if bar is not None:
                seen, loss_sum, correct = totals.tolist()
                bar.update(1)
                bar.set_postfix(
                    epoch=epoch,
                    loss=f"{loss_sum / seen:.4f}",
                    acc=f"{correct / seen:.3f}",
                    img_s=f"{seen * world_size / (time.perf_counter() - start):.0f}",
                )
        if world_size > 1:
            torch.distributed.all_reduce(totals)
            # DDP syncs buffers at the start of each forward, so after the last step each process holds
            # its own batch-norm statistics: take rank 0's, so every process (and every node's saved
            # model) evaluates and keeps the same network.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        elapsed = time.perf_counter() - start
        val_loss, val_acc = _evaluate(model, val_batches, 4 * cfg.batch_size, speed)
        n_seen, loss_sum, correct = totals.tolist()
        seen = max(n_seen, 1)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": n_seen / elapsed,
            "epoch_s": elapsed,
        }
        history.append(row)
        if val_loss < best["val_loss"]:
            # Only early stopping goes back to the best epoch: otherwise a copy per epoch is wasted.
            weights = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if cfg.early_stopping
                else None
            )
            best = {"val_loss": val_loss, "epoch": epoch, "weights": weights, "stale": 0}
        else:
            best["stale"] += 1
        rngs = _gather_rng(aug_gen, world_size)  # every process takes part, only rank 0 writes
        if checkpoint is not None and local_rank == 0:  # every node keeps its own, to resume from
            _save_checkpoint(
                checkpoint,
                {
                    "fingerprint": run_key,
                    "config": {"seed": seed, "train": cfg.model_dump(mode="json"), "meta": meta},
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "augment": rngs},
                    "history": history,
                    "best": best,
                    "extra": extra_state or {},
                },
            )
        if on_epoch is not None and rank == 0:
            on_epoch(row)
    if bar is not None:
        bar.close()
    if cfg.early_stopping and best["weights"] is not None:
        model.load_state_dict(best["weights"])
    best_epoch = best["epoch"] if cfg.early_stopping else len(history)
    return TrainResult(model.eval(), history, str(speed.device), resumed_from, best_epoch)


def _gather_rng(gen: torch.Generator, world_size: int) -> list[torch.Tensor]:
    """Every process's augmentation RNG state, so a resumed DDP run continues each stream exactly."""
    state = gen.get_state()
    if world_size == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world_size)]
    torch.distributed.all_gather_object(states, state)
    return states


def _progress(total: int):
    """A progress bar on a terminal; None elsewhere (CI logs get one line per epoch from the caller)."""
    if not sys.stderr.isatty() or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
