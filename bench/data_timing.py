"""Wall time and peak memory of the prepare and validate stages on the real MNIST (70,000 images).

Each stage runs as `dvc repro` runs it, `tollgate <stage>` in its own process (imports included), in a fresh
copy of the repo whose params select `data.source: mnist` over the original files in ../shared/data/mnist.
Target on 2 cores (issue 3): prepare + validate <= 20 s and <= 2 GB.

    .venv/bin/python bench/data_timing.py [--mnist ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import MNIST_FILES, link_source_files, make_project, set_param, tool_env  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one process, measured by the kernel."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, default=MNIST_FILES)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        link_source_files(project / "data" / "raw", "mnist", args.mnist)
        set_param(project, "data.source", "mnist")
        figures = {stage: timed(["tollgate", stage], project) for stage in ("prepare", "validate")}
    for stage, (wall, mb) in figures.items():
        print(f"{stage:<9} {wall:6.1f} s   peak {mb:6.0f} MB")
    total = sum(w for w, _ in figures.values())
    peak = max(mb for _, mb in figures.values())
    print(f"{'total':<9} {total:6.1f} s   peak {peak:6.0f} MB   (target <= 20 s, <= 2048 MB)")


if __name__ == "__main__":
    main()
