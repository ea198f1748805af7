"""Several training processes (torch DDP): relaunching the train stage under torchrun, and the process group
each worker joins. The training loop itself (pipeline/train.py) only asks `train.world()` who it is."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import TrainConfig

STAGE = "pipeline.stages.train"  # what each torchrun worker runs


def is_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launch(cfg: TrainConfig, root: Path) -> None:
    """Run the train stage again as `torchrun --nproc-per-node=N [torchrun_args] -m pipeline.stages.train`:
    each worker trains its share, rank 0 logs and writes the outputs. Raises RuntimeError if any fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={cfg.nproc_per_node}",
        *cfg.torchrun_args,
        "-m",
        STAGE,
    ]
    print("[tollgate] launching " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=root).returncode != 0:
        raise RuntimeError(f"distributed training failed ({' '.join(cmd[1:])}); see the worker logs above")


@contextlib.contextmanager
def process_group(cfg: TrainConfig) -> Iterator[None]:
    """Join the torchrun job's process group for the duration (nothing to do for a single process)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    backend = cfg.backend if cfg.backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def from_rank0(value):
    """Rank 0's `value`, on every process: a decision all workers must share (one process alone can reach
    the tracking server)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
