"""The training checkpoint: written atomically after every epoch, resumed only by the very same run.

A run is its training config, seed, model and data, process count and code (`fingerprint`); a checkpoint of
another run, or one that cannot be read, is never continued from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.core.config import TrainConfig


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


def save(path: Path, state: dict) -> None:
    """torch.save beside the target, then rename: a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, key: str) -> dict | None:
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


def gather_rng(gen: torch.Generator, world_size: int) -> list[torch.Tensor]:
    """Every process's augmentation RNG state, so a resumed DDP run continues each stream exactly."""
    state = gen.get_state()
    if world_size == 1:
        return [state]
    states = [torch.empty_like(state) for _ in range(world_size)]
    torch.distributed.all_gather_object(states, state)
    return states
