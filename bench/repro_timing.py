"""Wall time of each stage of a cold `dvc repro` and of a no-op repro, on the embedded dataset.

Cold means a fresh copy of the repo with no lock file, no stage outputs, no DVC cache and an empty MLflow
store: every stage runs. Targets on 2 cores (issue 2): cold <= 60 s, no-op <= 3.5 s.

    .venv/bin/python bench/repro_timing.py [--noop-runs 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import make_project, tool_env  # noqa: E402

STAGE_LINE = re.compile(r"^Running stage '([\w-]+)'")
# What each stage process reports at its end (pipeline/stages/__init__.py): its own work and its wall time.
WORK_LINE = re.compile(r"^\[tollgate\] (\w+): ([\d.]+) s of work in ([\d.]+) s")
# Outputs a previous run left in git: removing them (and the lock) makes every stage stale.
COMMITTED_OUTPUTS = ["dvc.lock", "reports", "metrics", "plots"]


def cold_repro(project: Path) -> tuple[float, dict[str, float], dict[str, tuple[float, float]]]:
    """Run `dvc repro`, timing each stage from its 'Running stage' line to the next one (or the end), and
    collecting each stage process's own (work, process wall) report."""
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    work: dict[str, tuple[float, float]] = {}
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=project,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    for line in proc.stdout:
        if m := STAGE_LINE.match(line):
            marks.append((m.group(1), time.perf_counter()))
        elif m := WORK_LINE.match(line):
            work[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    if proc.wait() != 0:
        raise SystemExit("dvc repro failed")
    total = time.perf_counter() - start
    ends = [t for _, t in marks[1:]] + [start + total]
    return total, {name: end - t for (name, t), end in zip(marks, ends, strict=True)}, work


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=tool_env(), check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "project")
        subprocess.run(["git", "rm", "-rq", "--ignore-unmatch", *COMMITTED_OUTPUTS], cwd=project, check=True)
        total, stages, work = cold_repro(project)
        print("cold dvc repro (every stage runs): wall as DVC runs it, the stage's own work, the rest")
        for name, seconds in stages.items():
            own = work.get(name, (0.0, seconds))[0]
            print(f"  {name:<10} {seconds:6.2f} s   work {own:6.2f} s   overhead {seconds - own:5.2f} s")
        print(f"  {'total':<10} {total:6.2f} s   (target <= 35 s, every stage's overhead <= 3 s)")
        noop = [timed(["dvc", "repro"], project) for _ in range(args.noop_runs)]
        print(
            f"no-op dvc repro over {len(noop)} runs: median {statistics.median(noop):.2f} s, "
            f"min {min(noop):.2f} s, max {max(noop):.2f} s   (target <= 3.5 s)"
        )


if __name__ == "__main__":
    main()
