"""Several training processes (torch DDP): relaunching the train stage under torchrun, on one machine or
several, and the process group each worker joins. The training loop itself (pipeline/training/loop.py)
only asks `loop.world()` who it is.

Several machines: every node runs `tollgate train` (or `dvc repro`) in its own checkout with the same
params and data, `train.torchrun_args` naming the rendezvous (`--nnodes=2 --rdzv-endpoint=head:29400`).
c10d rendezvous hands out ranks in the order nodes join, so any node may turn out to be rank 0: that one
logs to MLflow; the first process of every node writes the stage's outputs into its own checkout (all
processes hold identical weights after each step), so `dvc repro` completes wherever it ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


class LaunchError(RuntimeError):
    """torchrun's arguments are unusable, or the distributed job failed; the message says which."""


def is_worker() -> bool:
    """True inside a process torchrun started (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def needs_torchrun(nproc_per_node: int, torchrun_args: list[str]) -> bool:
    return nproc_per_node > 1 or bool(torchrun_args)


def _flags(args: list[str]) -> dict[str, str]:
    """torchrun's flags as {name: value}, names with dashes: `--rdzv_id x`, `--rdzv-id=x` alike."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise LaunchError(
                f"train.torchrun_args: {arg!r} is not a --flag (each item is one torchrun flag)"
            )
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        found[name.replace("_", "-")] = value
        i += 1
    return found


def _nodes(spec: str) -> int:
    """The most nodes `--nnodes` allows ("2" or "1:4")."""
    try:
        return int(spec.rpartition(":")[2])
    except ValueError:
        raise LaunchError(f"train.torchrun_args: --nnodes={spec} is neither N nor MIN:MAX") from None


def torchrun_args(nproc_per_node: int, args: list[str], job_key: str) -> tuple[list[str], list[str]]:
    """torchrun's arguments for this job, checked and completed, and warnings for the log.

    Across nodes: c10d is the rendezvous when an endpoint is given without a backend; a missing
    `--rdzv-id` is derived from `job_key` (the same on every node that trains the same params, data and
    code, different for another job); `--node-rank` means nothing to c10d (ranks follow join order)."""
    flags = _flags(args)
    out = [f"--nproc-per-node={nproc_per_node}", *args]
    warnings: list[str] = []
    if _nodes(flags.get("nnodes", "1")) <= 1:
        return out, warnings
    backend = flags.get("rdzv-backend", "c10d" if "rdzv-endpoint" in flags else "static")
    if "rdzv-backend" not in flags:
        out.append(f"--rdzv-backend={backend}")
    if backend == "static":
        if "node-rank" not in flags or "master-addr" not in flags:
            raise LaunchError(
                "train.torchrun_args: several nodes need a rendezvous: --rdzv-endpoint=HOST:PORT (c10d, "
                "the same on every node) or, for static rendezvous, --node-rank and --master-addr"
            )
        return out, warnings
    if "rdzv-endpoint" not in flags:
        raise LaunchError(f"train.torchrun_args: --rdzv-backend={backend} needs --rdzv-endpoint=HOST:PORT")
    if "rdzv-id" not in flags:
        out.append(f"--rdzv-id=tollgate-{job_key[:16]}")
    if "node-rank" in flags:
        warnings.append(
            f"--node-rank is ignored by {backend} rendezvous: ranks follow the order nodes join, and "
            "whichever node becomes rank 0 logs to MLflow"
        )
    return out, warnings


def job_key(seed: int, train: dict, data_version: str, code: str) -> str:
    """What identifies one training job across nodes: the same settings, data and code."""
    blob = repr((seed, sorted(train.items()), data_version, code)).encode()
    return hashlib.sha256(blob).hexdigest()


def launch(module: str, nproc_per_node: int, args: list[str], key: str, root: Path) -> None:
    """Run `module` (the train stage) again as `torchrun [args] -m <module>`, echoing its output: each
    worker trains its share. Raises LaunchError if the job fails, saying why when torchrun's output shows
    it (a rendezvous no other node joined)."""
    full, warnings = torchrun_args(nproc_per_node, args, key)
    for warning in warnings:
        print(f"[tollgate] WARNING: {warning}", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *full, "-m", module]
    print("[tollgate] launching " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = False
    for line in proc.stdout:
        sys.stdout.write(line)
        timed_out = timed_out or "RendezvousTimeoutError" in line
    sys.stdout.flush()
    if proc.wait() == 0:
        return
    if timed_out:
        endpoint = _flags(args).get("rdzv-endpoint", "?")
        raise LaunchError(
            f"not enough nodes joined the rendezvous at {endpoint} within its join timeout: start "
            f"`tollgate train` with the same params and data on every node ({' '.join(args)})"
        )
    raise LaunchError(f"distributed training failed ({' '.join(cmd[1:])}); see the worker logs above")


@contextlib.contextmanager
def process_group(backend: str) -> Iterator[None]:
    """Join the torchrun job's process group for the duration (nothing to do for a single process)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _group() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def from_rank0(value):
    """Rank 0's `value`, on every process: a decision all workers must share (rank 0 alone talks to the
    tracking server)."""
    import torch

    if not _group():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def everyone(flag: bool) -> bool:
    """True when `flag` is true on every process (each node has its own disk and checkpoint)."""
    import torch

    if not _group():
        return flag
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, flag)
    return all(flags)


def writes_outputs() -> bool:
    """The first process of each node writes the stage's outputs into that node's checkout."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0
