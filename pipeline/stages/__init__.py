"""The six DVC stages as thin adapters, one module each (`pipeline.stages.<stage>`), each with
`run(params, root) -> dict`: read the stage's inputs, call the pure step, persist its outputs, hand the
results to the registry. What a stage computes lives in its domain's folder (pipeline/data,
pipeline/training, pipeline/evaluation, pipeline/release).

Every stage runs in its own process (`tollgate <stage>`, as dvc.yaml says), so a module imports only what
its stage needs: `tollgate prepare` never pays for torch or mlflow. Each stage process holds
`.tollgate/stage.lock` while it runs: a stage orphaned by a killed flow keeps it until it ends, and the next
run's stage waits instead of working beside it on the same outputs and MLflow run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.core import paths
from pipeline.core.config import STAGES, Params
from pipeline.core.errors import Failure
from pipeline.core.files import locked


class StageFailed(Failure):
    """A stage refuses to continue (bad data, failed promotion); the message names the cause."""


def log(msg: str) -> None:
    print(f"[tollgate] {msg}", flush=True)


_work_s = [0.0]  # seconds this process spent in its stage's own step (see `work`)


@contextlib.contextmanager
def work() -> Iterator[None]:
    """Count the time of a stage's own step (prepare's split, the training loop, the evaluation, ...): what
    the stage reports as its work; the rest of the process (start-up, imports, tracking) is overhead."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _work_s[0] += time.perf_counter() - start


def run(name: str, params: Params, root: Path) -> dict:
    """Run stage `name` as `tollgate <name>` does."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    stage = importlib.import_module(f"{__name__}.{name}")
    waiting = f"waiting for another stage process of this checkout to finish ({paths.STAGE_LOCK} is held)"
    with locked(root / paths.STAGE_LOCK, waiting):
        result = stage.run(params, root)
    import psutil

    wall = time.time() - psutil.Process().create_time()
    log(f"{name}: {_work_s[0]:.2f} s of work in {wall:.2f} s (overhead {wall - _work_s[0]:.2f} s)")
    return result


def worker_main(name: str) -> None:
    """`python -m pipeline.stages.<name>` without the stage lock: for processes that a stage process
    started itself and that hold no lock of their own (torchrun's training workers)."""
    from pipeline.core.config import ConfigError, load_params

    root = Path.cwd()
    try:
        importlib.import_module(f"{__name__}.{name}").run(load_params(root / paths.PARAMS), root)
    except (ConfigError, StageFailed) as err:
        print(f"tollgate {name} (pid {os.getpid()}): {err}", file=sys.stderr)
        sys.exit(1)
